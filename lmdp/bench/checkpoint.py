"""Random-weight checkpoints of real shapes (Llama; Qwen3-MoE), with a word-level tokenizer, written offline.

The tokenizer maps the words 't0'..'tN' to single tokens, so a prompt of n words is n tokens in every engine. The
Llama folder names match the ones lmdeploy's bench script looks for, and the MoE folder is passed to it by path,
so both engines read the very same files.
"""
import json
import os
import time

from .shapes import LlamaShape, MoeShape


def checkpoint_dir(shape, workdir: str = '/tmp') -> str:
    family = 'qwen3moe' if isinstance(shape, MoeShape) else 'llama'
    return os.path.join(workdir, f'lmd_random_{family}_{shape.name}')


def write_tokenizer(out_dir: str, vocab_size: int):
    """The word-level tokenizer: '<s>', '</s>', '<unk>', then 't0', 't1', ... one token each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ['<s>', '</s>', '<unk>']
    vocab = {w: i for i, w in enumerate(specials + [f't{i}' for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix='##', cleanup=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                            unk_token='<unk>').save_pretrained(out_dir)


def write_random_llama(shape: LlamaShape, out_dir: str, dtype: str = 'bfloat16', seed: int = 0) -> float:
    """Write the checkpoint (on the GPU when there is one: the 8B shape is 16 GB); returns seconds taken."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(out_dir, shape.vocab)

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch_dtype = getattr(torch, dtype)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02, generator=gen)   # small weights keep 32 layers of random activations finite
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, 'generation_config.json'), 'w') as f:
        json.dump({'bos_token_id': 0, 'eos_token_id': 1}, f)
    del model
    if device == 'cuda':
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def write_random_moe(shape: MoeShape, out_dir: str, seed: int = 0) -> float:
    """A bf16 Qwen3-MoE checkpoint in transformers' per-expert layout (what released checkpoints hold), written
    one layer per file straight from random tensors (a 30B-parameter transformers model would not be built just
    to be saved); returns seconds taken. Weights N(0, 0.02), norms 1, untied lm_head."""
    import torch
    from safetensors.torch import save_file

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(out_dir, shape.vocab)
    h, d, e, inter = shape.hidden, shape.head_dim, shape.experts, shape.moe_intermediate
    config = dict(architectures=['Qwen3MoeForCausalLM'], model_type='qwen3_moe', hidden_size=h,
                  intermediate_size=3 * h, moe_intermediate_size=inter, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=d, num_experts=e,
                  num_experts_per_tok=shape.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  vocab_size=shape.vocab, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=8192,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, hidden_act='silu', attention_bias=False,
                  torch_dtype='bfloat16', output_router_logits=False, router_aux_loss_coef=0.001)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, 'generation_config.json'), 'w') as f:
        json.dump({'bos_token_id': 0, 'eos_token_id': 1}, f)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, device=device, dtype=torch.bfloat16, generator=gen) * 0.02).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)
    index = {}

    def save(tensors, name):
        save_file(tensors, os.path.join(out_dir, name), metadata={'format': 'pt'})
        index.update({k: name for k in tensors})
    save({'model.embed_tokens.weight': rand(shape.vocab, h), 'model.norm.weight': ones(h),
          'lm_head.weight': rand(shape.vocab, h)}, 'model-embed.safetensors')
    for layer in range(shape.layers):
        p = f'model.layers.{layer}.'
        t = {p + 'input_layernorm.weight': ones(h), p + 'post_attention_layernorm.weight': ones(h),
             p + 'self_attn.q_proj.weight': rand(shape.heads * d, h),
             p + 'self_attn.k_proj.weight': rand(shape.kv_heads * d, h),
             p + 'self_attn.v_proj.weight': rand(shape.kv_heads * d, h),
             p + 'self_attn.o_proj.weight': rand(h, shape.heads * d),
             p + 'self_attn.q_norm.weight': ones(d), p + 'self_attn.k_norm.weight': ones(d),
             p + 'mlp.gate.weight': rand(e, h)}
        gate_up, down = rand(e, 2 * inter, h), rand(e, h, inter)
        for x in range(e):
            t[p + f'mlp.experts.{x}.gate_proj.weight'] = gate_up[x, :inter].clone()
            t[p + f'mlp.experts.{x}.up_proj.weight'] = gate_up[x, inter:].clone()
            t[p + f'mlp.experts.{x}.down_proj.weight'] = down[x].clone()
        save(t, f'model-layer{layer:03d}.safetensors')
    with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {}, 'weight_map': index}, f)
    return time.perf_counter() - start


def ensure_checkpoint(shape, workdir: str = '/tmp') -> str:
    path = checkpoint_dir(shape, workdir)
    if not os.path.isfile(os.path.join(path, 'config.json')):
        writer = write_random_moe if isinstance(shape, MoeShape) else write_random_llama
        seconds = writer(shape, path)
        print(f'wrote {path} in {seconds:.0f} s', flush=True)
    return path


#: `lmdp bench --quant`: the formats a bench checkpoint can be quantised to, and `lmdp quantize`'s method for each
QUANT_METHODS = {'fp8': 'fp8-block', 'awq': 'awq'}


def quantized_dir(path: str, quant: str) -> str:
    """Where the `quant` copy of the bench checkpoint `path` goes: `<path>-<quant>` (lmdeploy's bench script names
    its results after the folder, so the two engines' figures pair up by that name)."""
    return f'{os.path.normpath(path)}-{quant}'


def ensure_quantized(path: str, quant: str, device: str | None = None) -> str:
    """The bench checkpoint `path` quantised by `lmdp quantize` to `quant` ('fp8': 128x128 block-scaled FP8;
    'awq': 4-bit AWQ, group 128), written once next to it."""
    from ..quantize import quantize_checkpoint
    if quant not in QUANT_METHODS:
        raise ValueError(f'bench: quant must be one of {sorted(QUANT_METHODS)}, got {quant!r}')
    dst = quantized_dir(path, quant)
    if not os.path.isfile(os.path.join(dst, 'config.json')):
        start = time.perf_counter()
        quantize_checkpoint(path, dst, QUANT_METHODS[quant], group_size=128, device=device)
        print(f'wrote {dst} in {time.perf_counter() - start:.0f} s', flush=True)
    return dst


def step_bytes(model_path: str) -> int:
    """Bytes a batch-1 decode step of a dense checkpoint reads: every tensor once (weights, scales, zero points,
    norms, lm_head), except the input embedding table, of which it gathers one row. Read from the headers."""
    from ..weight_loader import scan_checkpoint
    total = 0
    for name, info in scan_checkpoint(model_path).tensors.items():
        size = info.nbytes
        if size is None:
            raise ValueError(f'bench: tensor {name} of {model_path} has dtype {info.dtype}, of no known width')
        total += size // info.shape[0] if 'embed_tokens' in name else size
    return total
