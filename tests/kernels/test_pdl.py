"""Programmatic dependent launch (LMDP_PDL): which launches ask for it, that each kernel so launched waits before
it reads what earlier kernels wrote, and (on a Hopper GPU, tests marked gpu) that it changes no bit of a step."""
import importlib
import inspect
import re
from types import SimpleNamespace

import pytest
import torch

from lmdp.kernels.triton import _common

# the modules themselves (the package exports some functions under their module's name)
PDL_MODULES = [importlib.import_module(f'lmdp.kernels.triton.{name}')
               for name in ('gemv', 'rms_norm', 'rotary_fill_kv_cache', 'decode_attention', 'moe_router',
                                'fused_moe')]


def test_off_by_default_and_off_the_gpu(monkeypatch):
    monkeypatch.setattr(_common, '_PDL', False)
    monkeypatch.setattr(_common, '_capability', lambda device: (9, 0))
    assert _common.pdl_launch(torch.device('cuda', 0)) == {'USE_PDL': False}
    monkeypatch.setattr(_common, '_PDL', True)
    assert _common.pdl_launch(torch.device('cpu')) == {'USE_PDL': False}


@pytest.mark.parametrize('capability, interpret, on', [((9, 0), False, True), ((10, 0), False, True),
                                                        ((8, 9), False, False), ((9, 0), True, False)])
def test_on_for_hopper_and_newer_outside_the_interpreter(monkeypatch, capability, interpret, on):
    monkeypatch.setattr(_common, '_PDL', True)
    monkeypatch.setattr(_common, '_INTERPRET', interpret)
    monkeypatch.setattr(_common, '_capability', lambda device: capability)
    expected = {'USE_PDL': True, 'launch_pdl': True} if on else {'USE_PDL': False}
    assert _common.pdl_launch(torch.device('cuda', 0)) == expected


def _kernels(module):
    """(name, source) of the module's jit kernels that take USE_PDL."""
    for name, obj in vars(module).items():
        fn = getattr(obj, 'fn', None)
        if fn is not None and 'USE_PDL' in inspect.signature(fn).parameters:
            yield name, inspect.getsource(fn)


@pytest.mark.parametrize('module', PDL_MODULES, ids=lambda m: m.__name__.rsplit('.', 1)[-1])
def test_every_kernel_launched_as_a_dependent_waits_before_reading_activations(module):
    kernels = list(_kernels(module))
    assert kernels, f'{module.__name__} has no kernel with USE_PDL'
    for name, source in kernels:
        body = source.split('):\n', 1)[1]
        assert re.search(r'if USE_PDL:\n\s+pdl_wait\(\)', body), f'{name} takes USE_PDL but never waits'
        before = re.split(r'if USE_PDL:\n\s+pdl_wait\(\)', body, maxsplit=1)[0]
        # before the wait only weights may be read (no kernel of the step writes them): W, and the GEMV's first
        # chunk of it through _load_w
        loads = re.findall(r'tl\.load\((\w+)|(_load_x)\(', before)
        assert all(ptr in ('W', '') and helper != '_load_x' for ptr, helper in loads), \
            f'{name} reads {loads} before it waits'
        assert '_load_w(' in before or 'tl.load(W' in before or not loads
    # and the host side launches each of them with pdl_launch (USE_PDL and launch_pdl agree)
    host = inspect.getsource(module)
    for name, _ in kernels:
        start = host.index(name + '[')
        end = min([i for i in (host.find('\n\n', start), host.find('return', start)) if i > 0] + [len(host)])
        assert 'pdl_launch(' in host[start:end], f'{name} is launched without pdl_launch'


def test_a_missing_wait_is_caught(monkeypatch):
    """The check above fails for a kernel that takes USE_PDL and reads activations first."""
    src = 'def k(X, W, USE_PDL: tl.constexpr):\n    x = tl.load(X)\n    if USE_PDL:\n        pdl_wait()\n'
    body = src.split('):\n', 1)[1]
    before = re.split(r'if USE_PDL:\n\s+pdl_wait\(\)', body, maxsplit=1)[0]
    loads = re.findall(r'tl\.load\((\w+)|(_load_x)\(', before)
    assert loads == [('X', '')]


# -- on the GPU ------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason='needs a Hopper (sm_90+) GPU')


def _decode_chain(pdl: bool, monkeypatch):
    """A decode layer's kernel chain (norm, qkv GEMV, rotary + cache write, attention, o_proj GEMV, add-norm,
    gate_up GEMV, down GEMV with the activation), captured in a CUDA graph and replayed; its outputs."""
    monkeypatch.setattr(_common, '_PDL', pdl)
    return _run_chain(device='cuda', dtype=torch.bfloat16, hidden=2048, heads=32, kv_heads=8, d=64, inter=8192)


def _run_chain(device, dtype, hidden, heads, kv_heads, d, inter, graph=True):
    from lmdp.kernels import triton as tk
    gemv_fn = PDL_MODULES[0].gemv
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=0.05):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
    batch, page = 2, 64
    x, res = rand(batch, hidden, scale=1.0), rand(batch, hidden, scale=1.0)
    w_norm = (1 + rand(hidden)).contiguous()
    w_qkv, w_o = rand((heads + 2 * kv_heads) * d, hidden), rand(hidden, heads * d)
    w_gu, w_down = rand(2 * inter, hidden), rand(hidden, inter)
    blocks = 64
    k_cache = rand(blocks, page, kv_heads, d, scale=1.0)
    v_cache = rand(blocks, page, kv_heads, d, scale=1.0)
    kv_lens = torch.tensor([700, 1500], dtype=torch.int32, device=device)
    block_offsets = torch.arange(blocks, dtype=torch.int32, device=device).view(batch, blocks // batch)
    q_start = torch.arange(batch, dtype=torch.int32, device=device)
    q_lens = torch.ones(batch, dtype=torch.int32, device=device)
    pos = (kv_lens - 1).long()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    cos, sin = torch.cos(pos[:, None] * inv).to(torch.bfloat16), torch.sin(pos[:, None] * inv).to(torch.bfloat16)
    out = {}

    def step():
        h = tk.rms_norm(x, w_norm, 1e-5)
        qkv = gemv_fn(h, w_qkv, None)
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k, v = q.view(batch, heads, d), k.view(batch, kv_heads, d), v.view(batch, kv_heads, d)
        tk.rotary_fill_kv_cache(q, k, v, cos, sin, k_cache, v_cache, q_start, q_lens, kv_lens, block_offsets)
        attn = tk.paged_attention_fwd(q, k_cache, v_cache, block_offsets, q_start, q_lens, kv_lens,
                                      scale=d ** -0.5, is_decoding=True, max_q_seqlen=1)
        o = gemv_fn(attn.view(batch, heads * d), w_o, None)
        h2, r2 = tk.rms_norm(o, w_norm, 1e-5, residual=res)
        gu = gemv_fn(h2, w_gu, None)
        out.update(y=gemv_fn(gu, w_down, None, act='silu'), r=r2, k=k_cache.clone())
    if not graph:
        step()
        return SimpleNamespace(**out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    return SimpleNamespace(**{k: v.clone() for k, v in out.items()})


@gpu
@needs_hopper
def test_the_decode_chain_gives_the_same_bits_with_pdl(monkeypatch):
    off, on = _decode_chain(False, monkeypatch), _decode_chain(True, monkeypatch)
    assert torch.equal(off.y, on.y) and torch.equal(off.r, on.r) and torch.equal(off.k, on.k)


@gpu
@needs_hopper
@pytest.mark.parametrize('family', ['llama', 'qwen3_moe'])
def test_the_engine_decodes_the_same_tokens_with_pdl(monkeypatch, tmp_path, family):
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    from lmdp.tiny import make_tiny
    path = str(make_tiny(family, tmp_path / family, dtype='bfloat16'))
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 64, 30)]
    gen = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    tokens = {}
    for pdl in (False, True):
        monkeypatch.setattr(_common, '_PDL', pdl)
        cfg = PytorchEngineConfig(dtype='bfloat16', session_len=512, max_batch_size=8, num_gpu_blocks=64,
                                  cudagraph_capture_batch_sizes=[1, 2, 4, 8])
        pipe = pipeline(path, backend_config=cfg)
        graphs = pipe.engine.runner.graphs      # PDL launches must be capturable, not a silent fall back to eager
        assert graphs is not None and all(r.captured for r in graphs.results.values()), graphs.results
        tokens[pdl] = [r.token_ids for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
        pipe.close()
    assert tokens[True] == tokens[False]
