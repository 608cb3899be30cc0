"""Fixtures for the hostile-input tests: a tiny llama, pipelines over it, and the check that nothing was lost."""
import json
import shutil

import pytest
import torch

from lmdp import GenerationConfig

BLOCK = 16
POOL = 96          # blocks: every request of these tests fits many times over


@pytest.fixture(scope='module', autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spinning threads
    slow each small op down a hundredfold (see tests/engine/conftest.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    """A two-layer tiny llama (vocab 512, eos 2)."""
    from lmdp.tiny import make_tiny
    return str(make_tiny('llama', tmp_path_factory.mktemp('robust_llama'), num_hidden_layers=2))


def _make_pipe(path, **config):
    from lmdp import PytorchEngineConfig, pipeline
    config = dict(dict(device_type='cpu', dtype='float32', block_size=BLOCK, num_gpu_blocks=POOL,
                       max_batch_size=32), **config)
    return pipeline(path, backend_config=PytorchEngineConfig(**config))


@pytest.fixture(scope='session')
def make_pipe():
    """make_pipe(path, **PytorchEngineConfig fields): a CPU float32 pipeline, 16-token blocks, a 96-block pool."""
    return _make_pipe


@pytest.fixture(scope='module')
def pipe(tiny):
    """One pipeline shared by a module's tests; each test checks it leaves the pipeline as it found it."""
    return _make_pipe(tiny)


GOOD_PROMPTS = [[1, 20, 21, 22, 23], 'Once upon a time', [1, 300, 301, 302, 303, 304, 305, 306, 307]]


@pytest.fixture(scope='session')
def good():
    """(prompts, gen_config) of three good requests: token ids, text through the chat template, token ids."""
    return list(GOOD_PROMPTS), GenerationConfig(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope='module')
def clean(pipe, good):
    """The good prompts' responses when nothing bad runs beside them."""
    return pipe(*good)


@pytest.fixture(scope='session')
def nothing_lost():
    """nothing_lost(pipe): assert every block is back, no sequence or request is left."""
    return _assert_nothing_lost


@pytest.fixture(scope='session')
def unharmed():
    """unharmed(responses, clean): assert the good prompts' responses equal a clean run's."""
    return _assert_good_ones_unharmed


@pytest.fixture
def ckpt_copy(tmp_path):
    """ckpt_copy(src, config_edit=None, files=None): a fresh copy of a checkpoint under tmp_path."""
    count = iter(range(1000))
    return lambda src, config_edit=None, files=None: _copy_checkpoint(src, tmp_path / f'ckpt{next(count)}',
                                                                      config_edit, files)


def _assert_nothing_lost(pipe):
    """Every block back in the pool, no sequence left in the engine's tables, no request left waiting."""
    engine = pipe.engine
    engine.step()                       # aborts sent by callers that stopped listening take effect here
    assert engine.block_manager.num_free == engine.block_manager.num_blocks, 'KV blocks leaked'
    assert engine.num_sequences == 0, 'a sequence was left in the engine'
    assert not engine.has_unfinished(), 'the scheduler still holds work'
    assert not pipe._active, 'the pipeline still waits on a request'


def _assert_good_ones_unharmed(responses, clean):
    """The good prompts' responses (wherever they sit among `responses`) equal a clean run's."""
    assert [(r.token_ids, r.text, r.finish_reason) for r in responses] == \
        [(c.token_ids, c.text, c.finish_reason) for c in clean]
    assert all(r.error is None for r in responses)


def _copy_checkpoint(src, dst, config_edit=None, files=None):
    """A copy of checkpoint `src` in `dst`; `config_edit(dict)` changes config.json, `files` {name: bytes or None}
    writes or removes files."""
    shutil.copytree(src, dst)
    if config_edit is not None:
        path = dst / 'config.json'
        cfg = json.loads(path.read_text())
        config_edit(cfg)
        path.write_text(json.dumps(cfg))
    for name, data in (files or {}).items():
        if data is None:
            (dst / name).unlink()
        else:
            (dst / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(dst)
