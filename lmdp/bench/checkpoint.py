"""Random-weight Llama checkpoints of real shapes, with a word-level tokenizer, written offline.

The tokenizer maps the words 't0'..'tN' to single tokens, so a prompt of n words is n tokens in every engine. The
folder name matches the one lmdeploy's bench script looks for, so both engines read the very same files.
"""
import json
import os
import time

from .shapes import LlamaShape


def checkpoint_dir(shape: LlamaShape, workdir: str = '/tmp') -> str:
    return os.path.join(workdir, f'lmd_random_llama_{shape.name}')


def write_random_llama(shape: LlamaShape, out_dir: str, dtype: str = 'bfloat16', seed: int = 0) -> float:
    """Write the checkpoint (on the GPU when there is one: the 8B shape is 16 GB); returns seconds taken."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    specials = ['<s>', '</s>', '<unk>']
    vocab = {w: i for i, w in enumerate(specials + [f't{i}' for i in range(shape.vocab - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix='##', cleanup=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                            unk_token='<unk>').save_pretrained(out_dir)

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


def ensure_checkpoint(shape: LlamaShape, workdir: str = '/tmp') -> str:
    path = checkpoint_dir(shape, workdir)
    if not os.path.isfile(os.path.join(path, 'config.json')):
        seconds = write_random_llama(shape, path)
        print(f'wrote {path} in {seconds:.0f} s', flush=True)
    return path
