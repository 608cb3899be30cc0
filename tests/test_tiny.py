"""Pins lmdp.tiny: tiny random-weight checkpoints written by transformers."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdp import tiny_tokenizer
from lmdp.tiny import TINY_FAMILIES, make_tiny, tiny_config

FAMILIES = sorted(TINY_FAMILIES)
PROMPTS = ['The quick brown fox', 'Once upon a time there was', 'def main():', 'Why is the sky blue?']
STD_LO, STD_HI = 0.2, 5.0


@pytest.fixture(scope='module')
def ckpt_dirs(tmp_path_factory):
    """One default checkpoint per family, shared by the module (keeps it fast)."""
    root = tmp_path_factory.mktemp('tiny')
    return {mt: make_tiny(mt, root / mt) for mt in FAMILIES}


@pytest.fixture(scope='module')
def models(ckpt_dirs):
    return {mt: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for mt, d in ckpt_dirs.items()}


@pytest.fixture(scope='module')
def tok():
    return tiny_tokenizer.build_tokenizer()


def read_tensors(d):
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    out = {}
    for f in sorted(d.glob('*.safetensors')):
        with safe_open(str(f), 'pt') as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def hidden_stds(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return [h.float().std().item() for h in out.hidden_states], out.logits


# --- loading and metadata ---------------------------------------------------


@pytest.mark.parametrize('mt', FAMILIES)
def test_loads_and_ids_agree(mt, ckpt_dirs, models):
    d = ckpt_dirs[mt]
    for name in ('config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
                 'tokenizer_config.json'):
        assert (d / name).is_file(), name
    model, hf_tok = models[mt], AutoTokenizer.from_pretrained(d)
    cfg = model.config
    assert cfg.model_type == mt
    assert cfg.vocab_size == len(hf_tok) == tiny_tokenizer.VOCAB_SIZE
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    gen = json.loads((d / 'generation_config.json').read_text())
    assert (gen['bos_token_id'], gen['eos_token_id'], gen['pad_token_id']) == (
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    assert cfg.max_position_embeddings >= 512
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 3


# --- structural quirks --------------------------------------------------------

# family -> (heads, kv_heads, head_dim, tied)
SHAPES = {
    'llama': (4, 2, 16, False),
    'mistral': (4, 2, 16, False),
    'gemma': (4, 1, 32, True),   # MQA, head_dim != hidden/heads
    'gemma2': (4, 2, 32, True),
    'qwen2': (4, 2, 16, False),
    'qwen3': (4, 2, 32, True),
    'phi3': (4, 2, 16, False),
    'gemma3_text': (4, 2, 32, True),
    'mixtral': (4, 2, 16, False),
    'qwen2_moe': (4, 2, 16, False),
    'qwen3_moe': (4, 2, 32, False),
}


@pytest.mark.parametrize('mt', FAMILIES)
def test_attention_shapes_and_tying(mt, ckpt_dirs, models):
    heads, kv, hd, tied = SHAPES[mt]
    cfg, attn = models[mt].config, models[mt].model.layers[0].self_attn
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, 'head_dim', None) or 64 // heads) == (
        heads, kv, hd)
    if mt == 'phi3':   # q, k and v in one fused tensor
        assert attn.qkv_proj.weight.shape == ((heads + 2 * kv) * hd, 64)
    else:
        assert attn.q_proj.weight.shape == (heads * hd, 64)
        assert attn.k_proj.weight.shape == (kv * hd, 64)
    assert cfg.tie_word_embeddings is tied
    # A tied checkpoint has no lm_head tensor on disk; an untied one does.
    assert ('lm_head.weight' in read_tensors(ckpt_dirs[mt])) is (not tied)


def test_family_specific_quirks(models):
    g2 = models['gemma2'].config
    assert g2.layer_types == ['sliding_attention', 'full_attention', 'sliding_attention']
    assert g2.sliding_window == 32
    assert g2.attn_logit_softcapping and g2.final_logit_softcapping
    assert g2.query_pre_attn_scalar != g2.head_dim
    assert models['mistral'].config.sliding_window == 32
    assert models['llama'].config.to_dict().get('sliding_window') is None
    q2 = models['qwen2']
    assert q2.config.sliding_window == 32 and 'sliding_attention' in q2.config.layer_types
    assert q2.model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(models['qwen3'].model.layers[0].self_attn, 'q_norm')
    p3 = models['phi3'].config
    rope = p3.rope_parameters
    assert rope['rope_type'] == 'longrope' and rope['partial_rotary_factor'] == 0.75
    assert len(rope['short_factor']) == len(rope['long_factor']) == int(16 * 0.75) // 2
    assert p3.sliding_window == 32 and hasattr(models['phi3'].model.layers[0].mlp, 'gate_up_proj')
    g3 = models['gemma3_text'].config
    assert g3.layer_types == ['sliding_attention', 'full_attention', 'sliding_attention']
    bases = {t: g3.rope_parameters[t]['rope_theta'] for t in g3.layer_types}
    assert bases['sliding_attention'] != bases['full_attention']
    assert hasattr(models['gemma3_text'].model.layers[0].self_attn, 'k_norm')


def test_moe_quirks(ckpt_dirs, models):
    mixtral, q2, q3 = (models[m] for m in ('mixtral', 'qwen2_moe', 'qwen3_moe'))
    assert mixtral.config.num_local_experts == 4 and mixtral.config.sliding_window == 32
    assert any('block_sparse_moe.experts.3.w2.weight' in k for k in read_tensors(ckpt_dirs['mixtral']))
    assert q2.config.norm_topk_prob is False and q3.config.norm_topk_prob is True
    q2_tensors = read_tensors(ckpt_dirs['qwen2_moe'])
    assert q2_tensors['model.layers.0.mlp.shared_expert_gate.weight'].shape == (1, 64)
    assert q2_tensors['model.layers.0.mlp.shared_expert.up_proj.weight'].shape == (80, 64)
    assert q2_tensors['model.layers.2.mlp.up_proj.weight'].shape == (96, 64)       # the dense layer
    assert q2_tensors['model.layers.1.mlp.experts.7.up_proj.weight'].shape == (32, 64)
    assert q2.model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(q3.model.layers[0].self_attn, 'q_norm') and q3.config.num_experts == 16


@pytest.mark.parametrize('mt', ['mixtral', 'qwen2_moe', 'qwen3_moe'])
def test_routing_is_varied_and_decisive(mt, models, tok):
    """Tokens spread over the experts, and the k-th and (k+1)-th router logits are usually far apart, so that
    float32 parity routes as transformers does and a routing bug changes which experts run."""
    model = models[mt]
    k = model.config.num_experts_per_tok
    ids = tok(' '.join(PROMPTS), return_tensors='pt').input_ids
    logits = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: logits.append(out[0] if isinstance(out, tuple)
                                                                                  else out))
             for layer in model.model.layers if hasattr(layer.mlp, 'gate')]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert logits
    for layer_logits in logits:
        top = layer_logits.topk(k + 1, dim=-1).values
        experts = layer_logits.topk(k, dim=-1).indices
        assert experts.unique().numel() >= layer_logits.size(-1) // 2
        assert (top[:, k - 1] - top[:, k]).median() > 0.05


def test_quirks_bite(ckpt_dirs, models, tok):
    """Turning a quirk off must change the logits, or parity could not see it."""
    ids = tok(' '.join(PROMPTS * 3), return_tensors='pt').input_ids
    assert ids.shape[1] > 40  # longer than the sliding window
    for mt, off in [('gemma2', dict(attn_logit_softcapping=None)),
                    ('gemma2', dict(final_logit_softcapping=None)),
                    ('mistral', dict(sliding_window=None)),
                    ('qwen3_moe', dict(norm_topk_prob=False)),
                    ('qwen2_moe', dict(norm_topk_prob=True)),
                    ('phi3', dict(sliding_window=None)),
                    ('qwen2', dict(sliding_window=4096)),
                    ('gemma3_text', dict(sliding_window=4096))]:
        plain = AutoModelForCausalLM.from_pretrained(ckpt_dirs[mt], dtype=torch.float32, **off)
        with torch.no_grad():
            diff = (models[mt](ids).logits - plain(ids).logits).abs().max().item()
        assert diff > 1e-2, (mt, off, diff)


def test_norm_weights_and_biases_are_not_trivial(ckpt_dirs):
    llama = read_tensors(ckpt_dirs['llama'])
    gemma = read_tensors(ckpt_dirs['gemma'])
    qwen2 = read_tensors(ckpt_dirs['qwen2'])
    # llama norms are w*x (identity 1); gemma norms are (1+w)*x (identity 0).
    w = llama['model.layers.0.input_layernorm.weight']
    assert 0.9 < w.mean() < 1.1 and w.std() > 0.03
    w = gemma['model.layers.0.input_layernorm.weight']
    assert abs(w.mean()) < 0.1 and w.std() > 0.03
    b = qwen2['model.layers.0.self_attn.q_proj.bias']
    assert 0 < b.abs().mean() < 0.5


# --- activations ----------------------------------------------------------------


@pytest.mark.parametrize('mt', FAMILIES)
def test_activations_order_one(mt, models, tok):
    model = models[mt]
    ids = tok(PROMPTS[1], return_tensors='pt').input_ids
    stds, logits = hidden_stds(model, ids)
    assert len(stds) == model.config.num_hidden_layers + 1
    assert all(STD_LO <= s <= STD_HI for s in stds), stds
    assert logits.std() > 0.3
    greedy = set()
    for p in PROMPTS:
        x = tok(p, return_tensors='pt')
        out = model.generate(**x, max_new_tokens=8, do_sample=False)
        greedy.update(out[0, x.input_ids.shape[1]:].tolist())
    assert len(greedy) > 4, greedy


@pytest.mark.parametrize('mt', FAMILIES)
def test_hf_default_init_would_fail_the_bounds(mt, tok):
    """Guards the activation test itself: HF's std-0.02 init fades out."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(mt), dtype=torch.float32)
    stds, _ = hidden_stds(model, tok(PROMPTS[1], return_tensors='pt').input_ids)
    assert not all(STD_LO <= s <= STD_HI for s in stds), stds


# --- seeds, sharding, dtype --------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path, ckpt_dirs):
    a = make_tiny('llama', tmp_path / 'a')
    def digest(d):
        return hashlib.sha256((d / 'model.safetensors').read_bytes()).hexdigest()
    assert digest(a) == digest(ckpt_dirs['llama'])  # fixture also used seed 0
    ta, tb = read_tensors(a), read_tensors(make_tiny('llama', tmp_path / 'b', seed=1))
    assert ta.keys() == tb.keys()
    assert all(not torch.equal(ta[k], tb[k]) for k in ta)


def test_sharded_checkpoint(tmp_path, ckpt_dirs):
    d = make_tiny('gemma2', tmp_path, max_shard_size='200KB')
    assert not (d / 'model.safetensors').exists()
    index = json.loads((d / 'model.safetensors.index.json').read_text())
    weight_map = index['weight_map']
    shards = sorted(d.glob('model-*-of-*.safetensors'))
    assert len(shards) > 1 and set(weight_map.values()) == {s.name for s in shards}
    for s in shards:
        with safe_open(str(s), 'pt') as st:
            assert {k for k, f in weight_map.items() if f == s.name} == set(st.keys())
    # Same tensors as the single-file checkpoint of the same seed, and loadable.
    sharded, single = read_tensors(d), read_tensors(ckpt_dirs['gemma2'])
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)
    AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def test_bfloat16(tmp_path, ckpt_dirs):
    d = make_tiny('llama', tmp_path, dtype='bfloat16')
    assert json.loads((d / 'config.json').read_text())['dtype'] == 'bfloat16'
    bf, fp = read_tensors(d), read_tensors(ckpt_dirs['llama'])
    assert {t.dtype for t in bf.values()} == {torch.bfloat16}
    assert all(torch.equal(bf[k], fp[k].to(torch.bfloat16)) for k in fp)  # rounded fp32 weights
    assert AutoModelForCausalLM.from_pretrained(d).dtype == torch.bfloat16


def test_config_overrides(tmp_path):
    d = make_tiny('gemma2', tmp_path / 'g', num_hidden_layers=2, rope_theta=5e5)
    cfg = json.loads((d / 'config.json').read_text())
    assert cfg['num_hidden_layers'] == 2 and len(cfg['layer_types']) == 2
    assert cfg['rope_parameters']['rope_theta'] == 5e5  # transformers 5 folds rope_theta in
    d = make_tiny('llama', tmp_path / 'l', tie_word_embeddings=True, num_hidden_layers=2)
    assert 'lm_head.weight' not in read_tensors(d)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match='falcon') as e:
        make_tiny('falcon', tmp_path)
    assert all(mt in str(e.value) for mt in FAMILIES)
    with pytest.raises(ValueError, match='num_hidden_layer'):
        make_tiny('llama', tmp_path, num_hidden_layer=2)  # typo
    with pytest.raises(ValueError, match='float8'):
        make_tiny('llama', tmp_path, dtype='float8')


# --- tokenizer -----------------------------------------------------------------


def test_tokenizer_special_ids(ckpt_dirs):
    t = AutoTokenizer.from_pretrained(ckpt_dirs['llama'])
    assert len(t) == 512
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2, 3)
    assert t.convert_tokens_to_ids(['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']) == [4, 5, 6]
    assert t('hi').input_ids[0] == t.bos_token_id  # llama-style: <s> prepended


@pytest.mark.parametrize('text', [
    'Hello, world!', '  leading and  double  spaces\n\ttabs\r\n', 'naïve café déjà vu — “quotes”',
    '日本語のテキスト 你好 🙂👍🏽', '',
])
def test_tokenizer_round_trip(text, ckpt_dirs):
    t = AutoTokenizer.from_pretrained(ckpt_dirs['qwen2'])
    ids = t.encode(text, add_special_tokens=False)
    assert max(ids, default=0) < 512
    assert t.decode(ids) == text


def test_chat_template(ckpt_dirs):
    d = ckpt_dirs['gemma']
    assert 'chat_template' in json.loads((d / 'tokenizer_config.json').read_text())
    t = AutoTokenizer.from_pretrained(d)
    text = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, tokenize=False)
    assert text == ('<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>'
                    '<|start_header_id|>assistant<|end_header_id|>\n\n')
    ids = t(text, add_special_tokens=False).input_ids
    assert ids[:2] == [1, 4] and ids.count(6) == 1  # special tokens stay single ids


def test_tokenizer_training_is_deterministic():
    tiny_tokenizer.tokenizer_json.cache_clear()
    first = tiny_tokenizer.tokenizer_json()
    tiny_tokenizer.tokenizer_json.cache_clear()
    assert tiny_tokenizer.tokenizer_json() == first
