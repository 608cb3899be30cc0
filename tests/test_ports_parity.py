"""The Qwen2, Qwen3, Phi-3 and Gemma 3 ports against transformers (float32, CPU), on `lmdp make-tiny` checkpoints
that keep each family's quirks, under the full tap harness; and the harness still names bugs planted in them:
the harness's own planted bugs (mixed into each port) and one per family quirk."""
import pytest
import torch

import parity
from lmdp.models.gemma3 import Gemma3ForCausalLM
from lmdp.models.phi3 import Phi3ForCausalLM
from lmdp.models.qwen2 import Qwen2ForCausalLM
from lmdp.models.qwen3 import Qwen3Attention, Qwen3ForCausalLM
from lmdp.nn import Attention
from parity.planted_bugs import PLANTED_BUGS

PORTS = {'qwen2': Qwen2ForCausalLM, 'qwen3': Qwen3ForCausalLM, 'phi3': Phi3ForCausalLM,
         'gemma3_text': Gemma3ForCausalLM}
ARCH = {'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM', 'phi3': 'Phi3ForCausalLM',
        'gemma3_text': 'Gemma3ForCausalLM'}
# what `pytest parity --model <tiny>` runs: 3 prompts (5, 17 and 64 tokens: past the 32-token windows, on both
# sides of Phi-3's LongRoPE switch at 48) and 4 decode steps
DECODE_STEPS = 4


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """family -> (checkpoint, transformers float32 references), built once per family."""
    from lmdp.tiny import make_tiny
    cache = {}

    def get(family):
        if family not in cache:
            path = str(make_tiny(family, tmp_path_factory.mktemp(family)))
            cache[family] = path, parity.run_references(path, device='cpu', decode_steps=DECODE_STEPS)
        return cache[family]
    return get


def _compare(tiny, family, port=None):
    path, refs = tiny(family)
    return parity.compare(path, references=refs, custom_module_map={ARCH[family]: port} if port else None)


@pytest.mark.parametrize('family', sorted(PORTS))
def test_port_passes_the_tap_harness_in_float32(tiny, family):
    """What `pytest parity --model <tiny>` computes (its plugin calls parity.compare with these defaults)."""
    report = _compare(tiny, family)
    assert report.passed, report.summary()
    assert report.port_class.endswith(PORTS[family].__name__)
    assert not [t for t in report.main_taps if t.error], 'every tap has a module on both sides'
    assert report.check('weight_coverage').passed
    if family in ('qwen3', 'gemma3_text'):   # per-head q/k norms are compared too (Gemma 3's in its heads-first layout)
        compared = {t.tap.split('.')[-1] for t in report.main_taps if t.port is not None}
        assert {'q_norm', 'k_norm'} <= compared, sorted(compared)


# --- the harness's planted bugs, mixed into each port ---


class _MLPDroppedInLayer1:
    """Layer 1's MLP runs but leaves the stream (the harness's planted bug, for any decoder layer class)."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        layer = self.model.layers[1]

        def forward(*args, **kwargs):
            mlp_out, residual = type(layer).forward(layer, *args, **kwargs)
            return torch.zeros_like(mlp_out), residual
        layer.forward = forward


BUGS = {b.name: b for b in PLANTED_BUGS}
GENERIC = [('wrong_norm_eps', BUGS['wrong_norm_eps'].port_class, 'prefill', 0),
           ('rotary_k_halves_swapped', BUGS['rotary_k_halves_swapped'].port_class, 'prefill', 0),
           ('mlp_dropped_layer1', _MLPDroppedInLayer1, 'prefill', 1),
           ('kv_swapped_in_qkv', BUGS['kv_swapped_in_qkv'].port_class, 'prefill', 0),
           ('decode_position_off_by_one', BUGS['decode_position_off_by_one'].port_class, 'decode', 0)]


def _cases():
    for family in sorted(PORTS):
        for name, bug, phase, layer in GENERIC:
            if family == 'phi3' and name == 'kv_swapped_in_qkv':
                continue   # Phi-3's checkpoint stores qkv fused: no stacking map to get wrong (see below)
            yield pytest.param(family, bug, phase, layer, id=f'{family}-{name}')


def _assert_named(report, phase, layer):
    first = report.first_divergence
    assert not report.passed and first is not None, report.summary()
    assert (first.phase, first.layer) == (phase, layer), report.summary()


@pytest.mark.parametrize('family,bug,phase,layer', list(_cases()))
def test_the_harness_planted_bugs_are_named_in_each_port(tiny, family, bug, phase, layer):
    port = type(f'{bug.__name__}{PORTS[family].__name__}', (bug, PORTS[family]), {})
    _assert_named(_compare(tiny, family, port), phase, layer)


# --- a bug per family quirk ---


class Qwen2WithoutQKVBias(Qwen2ForCausalLM):
    """q/k/v built without their biases (Llama's attention as it is): the checkpoint's biases go unused."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        for layer in self.model.layers:
            layer.self_attn.qkv_proj.bias = None


class Qwen3WithoutKNorm(Qwen3ForCausalLM):
    """The per-head k norm is built and loaded but never applied."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        for layer in self.model.layers:
            layer.self_attn.k_norm.forward = lambda x, residual=None: x


class Phi3LongRoPEPerStep(Phi3ForCausalLM):
    """LongRoPE's factors chosen once for the whole packed step (the bug issue 13 reports): the rotary is asked
    without the step's metadata, so the 5- and 17-token prompts get the 64-token prompt's long factors."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        rope = self.model.rotary_emb
        self.model.rotary_emb.forward = lambda x, position_ids, attn_metadata=None: type(rope).forward(
            rope, x, position_ids)


class Phi3KVSwappedInFusedQKV(Phi3ForCausalLM):
    """The fused qkv_proj tensor cut as q|v|k instead of q|k|v."""

    def load_weights(self, weights):
        hf = self.config
        head_dim = hf.hidden_size // hf.num_attention_heads
        q, kv = hf.num_attention_heads * head_dim, hf.num_key_value_heads * head_dim

        def swap(pairs):
            for name, t in pairs:
                if name.endswith('qkv_proj.weight'):
                    t = torch.cat([t[:q], t[q + kv:], t[q:q + kv]])
                yield name, t
        super().load_weights(swap(weights))


class Phi3FullRotary(Phi3ForCausalLM):
    """Every channel of each head rotated, not the config's 3/4 (partial_rotary_factor ignored)."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        from lmdp.nn import build_rotary_embedding_from_config
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        full = config.__class__.from_dict(config.to_dict())
        params = dict(full.rope_parameters)
        params.pop('partial_rotary_factor', None)
        full.rope_parameters, full.partial_rotary_factor = params, 1.0
        short = params['short_factor']
        params['short_factor'] = short + short[-2:]          # factors for 8 frequencies, not 6
        params['long_factor'] = params['long_factor'] + params['long_factor'][-2:]
        self.model.rotary_emb = build_rotary_embedding_from_config(full)


class Phi3WithoutWindow(Phi3ForCausalLM):
    """Full attention on every layer: Phi-3's 32-token window ignored."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        for layer in self.model.layers:
            layer.self_attn.attn_fwd.sliding_window = None


class Gemma3GlobalLayerOnLocalRope(Gemma3ForCausalLM):
    """The global layer (layer 1) rotated with the local layers' base (10k) instead of its own (1M, scaled by 8)."""

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        self.model.layers[1].layer_type = 'sliding_attention'


class Gemma3QNormUnfolded(Gemma3ForCausalLM):
    """The q norm's weight loaded as w, not Gemma's 1 + w."""

    def load_weights(self, weights):
        super().load_weights((n, t - 1 if n.endswith('q_norm.weight') else t) for n, t in weights)


QUIRK_BUGS = [('qwen2', Qwen2WithoutQKVBias, 'prefill', 0), ('qwen3', Qwen3WithoutKNorm, 'prefill', 0),
              ('phi3', Phi3LongRoPEPerStep, 'prefill', 0), ('phi3', Phi3KVSwappedInFusedQKV, 'prefill', 0),
              ('phi3', Phi3FullRotary, 'prefill', 0), ('phi3', Phi3WithoutWindow, 'prefill', 0),
              ('gemma3_text', Gemma3GlobalLayerOnLocalRope, 'prefill', 1),
              ('gemma3_text', Gemma3QNormUnfolded, 'prefill', 0)]


@pytest.mark.parametrize('family,bug,phase,layer', QUIRK_BUGS, ids=[b.__name__ for _, b, _, _ in QUIRK_BUGS])
def test_a_bug_in_each_family_quirk_is_named(tiny, family, bug, phase, layer):
    _assert_named(_compare(tiny, family, bug), phase, layer)


def test_qwen3_attention_exposes_the_steps_the_harness_taps():
    """q_norm, k_norm, the attention block with its rotary step, o_proj: the names the harness hooks."""
    from lmdp.tiny import tiny_config
    attn = Qwen3Attention(tiny_config('qwen3'), 0)
    names = dict(attn.named_modules())
    assert {'q_norm', 'k_norm', 'attn_fwd', 'attn_fwd.rotary', 'o_proj'} <= set(names)
    assert isinstance(names['attn_fwd'], Attention)


@pytest.mark.slow
def test_pytest_parity_passes_on_a_new_family_tiny(tiny):
    """`pytest parity --model <tiny>` as a user runs it, in a fresh interpreter, on the quirkiest new family
    (the others run the same computation in-process above)."""
    family = 'phi3'
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')]))
    path, _ = tiny(family)
    result = subprocess.run([sys.executable, '-m', 'pytest', 'parity', '-q', '-p', 'no:cacheprovider', '--model',
                             path, '--device', 'cpu'], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert 'first divergence: none' in result.stdout


def test_phi3_crossing_longrope_switch_while_decoding(tiny):
    """A 46-token prompt decoding past 48 tokens switches to the long factors mid-sequence, beside a short prompt
    that stays on the short ones; keys already cached keep their rotation, as in transformers."""
    path, _ = tiny('phi3')
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (46, 5)]
    # transformers runs each prompt step by step through its cache, as it would generate (one forward over
    # prompt + continuation would pick the long factors for the prompt too)
    report = parity.compare(path, prompts=prompts, decode_steps=5, device='cpu')
    assert report.passed, report.summary()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('prompts', [1, 3])
@pytest.mark.parametrize('family', sorted(PORTS))
def test_bf16_parity_on_cuda(tiny, family, prompts):
    """bfloat16 on the Triton kernels (one prompt: batch-1 decode, the GEMV and fused activation; three: cuBLAS),
    CUDA-graph replay against eager included."""
    path, _ = tiny(family)
    report = parity.compare(path, dtype='bfloat16', device='cuda', prompts=prompts)
    assert report.passed, report.summary()


# every dense port runs the same kernels per layer: rotary inside the cache write, the gated activation inside
# down_proj (what keeps a port that reads as math at the speed of a hand-fused one)
LAYER_OPS = {'llama': ['rms_norm', 'linear', 'rotary_fill_kv_cache', 'paged_attention_fwd', 'linear', 'rms_norm',
                       'linear', 'act_and_mul_linear']}
LAYER_OPS.update(qwen2=LAYER_OPS['llama'], phi3=LAYER_OPS['llama'],
                 qwen3=['rms_norm', 'linear', 'rms_norm', 'rms_norm', 'rotary_fill_kv_cache', 'paged_attention_fwd',
                        'linear', 'rms_norm', 'linear', 'act_and_mul_linear'],
                 gemma3_text=['rms_norm', 'linear', 'rms_norm', 'rms_norm', 'rotary_fill_kv_cache',
                              'paged_attention_fwd', 'linear', 'rms_norm', 'rms_norm', 'linear',
                              'act_and_mul_linear', 'rms_norm'])


@pytest.mark.parametrize('family', sorted(LAYER_OPS))
def test_a_decode_step_launches_the_fused_kernels(tiny, tiny_llama, family, monkeypatch):
    from lmdp.engine import StepRunner
    from lmdp.kernels import dispatch
    calls, real = [], dispatch.implementation

    def implementation(name, tensor):
        fn = real(name, tensor)
        return lambda *a, **kw: calls.append(name) or fn(*a, **kw)
    monkeypatch.setattr(dispatch, 'implementation', implementation)
    path = tiny_llama if family == 'llama' else tiny(family)[0]
    runner = StepRunner.from_pretrained(path, dtype='float32', num_blocks=16, block_size=16)
    out = runner.prefill([[1, 2, 3, 4, 5], [7, 8, 9]])
    calls.clear()
    runner.decode(out.seq_ids, [3, 4])
    layers = runner.model.config.num_hidden_layers
    assert calls[:-2] == LAYER_OPS[family] * layers and calls[-2:] == ['rms_norm', 'linear'], calls
