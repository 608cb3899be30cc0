"""The pytest side of the harness: `pytest parity [--model PATH] [--dtype ...] [--report DIR] ...`.

The suite is one parity run (`parity.compare`), made once per session, and one pytest item per tap and phase
(`test_tap[prefill-layers.3.attn]`) plus one per whole-model check, so the first failing layer shows in pytest's
own summary. The console table and `first divergence: ...` come at the end of the session.

`parity/conftest.py` imports these hooks, so the plugin is active whenever pytest is pointed at the parity folder
(`pytest parity`, or `python -m pytest` from the repository root, whose testpaths include it); no install needed.
"""
import contextlib
import shutil
import sys
import tempfile

import pytest

from .capture_set import PHASES
from .checks import TOP_K

_TINY_DIR = pytest.StashKey[str]()
_REPORT = pytest.StashKey[object]()
_REPORT_PATHS = pytest.StashKey[dict]()

CHECKS = [('logprob_kl', 'prefill'), (f'top{TOP_K}', 'prefill'), ('logprob_kl', 'decode'), (f'top{TOP_K}', 'decode'),
          ('greedy', None), ('weight_coverage', None), ('cuda_graph', None),
          ('cuda_graph_padded', None)]


def pytest_addoption(parser):
    group = parser.getgroup('parity', 'lmdp parity harness (pytest parity --model PATH)')
    group.addoption('--model', dest='parity_model', default=None, metavar='PATH',
                    help='checkpoint folder to diff (default: the built-in tiny llama, built in a temporary folder)')
    group.addoption('--dtype', dest='parity_dtype', default='float32',
                    choices=['float32', 'bfloat16', 'float16', 'auto'],
                    help='dtype of the port under test (default float32; others are judged by the noise floor)')
    group.addoption('--device', dest='parity_device', default='auto',
                    help='cpu, cuda, cuda:1, ... (default auto: cuda when present)')
    group.addoption('--prompts', dest='parity_prompts', default='3', metavar='N|FILE',
                    help='a count of random prompts of different lengths, or a file (JSON or one prompt per line)')
    group.addoption('--decode-steps', dest='parity_decode_steps', type=int, default=4,
                    help='decode steps after the packed prefill (default 4)')
    group.addoption('--report', dest='parity_report', default=None, metavar='DIR',
                    help='write report.json and report.html into DIR')
    group.addoption('--module-map', dest='parity_module_map', default=None, metavar='FILE',
                    help='a .py file defining MODULE_MAP: the port under test, instead of the registered one')
    group.addoption('--block-size', dest='parity_block_size', type=int, default=16,
                    help='KV-cache block size of the port (default 16, so prompts span several blocks)')
    group.addoption('--qkv-taps', dest='parity_qkv_taps', action='store_true',
                    help='(kept for old command lines: q, k and v are always compared now)')


def _model_path(config) -> str:
    path = config.getoption('parity_model')
    if path:
        return path
    if _TINY_DIR not in config.stash:
        from lmdp.tiny import make_tiny
        tmp = tempfile.mkdtemp(prefix='parity-tiny-llama-')
        make_tiny('llama', tmp)
        config.stash[_TINY_DIR] = tmp
    return config.stash[_TINY_DIR]


def pytest_unconfigure(config):
    tmp = config.stash.get(_TINY_DIR, None)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def _taps(path: str):
    from .reference import checkpoint_taps
    try:
        return checkpoint_taps(path)
    except Exception as e:  # noqa: BLE001 - any unreadable config is a usage error here
        raise pytest.UsageError(f'parity: cannot read the config of --model {path!r}: {e}') from e


def pytest_generate_tests(metafunc):
    config = metafunc.config
    phases = [p for p in PHASES if p == 'prefill' or config.getoption('parity_decode_steps') > 0]
    if 'parity_tap' in metafunc.fixturenames:
        taps = _taps(_model_path(config))
        params = [(phase, tap.name) for phase in phases for tap in taps]
        metafunc.parametrize('parity_tap', params, ids=[f'{p}-{n}' for p, n in params])
    if 'parity_check' in metafunc.fixturenames:
        params = [(n, p) for n, p in CHECKS if p is None or p in phases]
        metafunc.parametrize('parity_check', params, ids=[f'{n}-{p}' if p else n for n, p in params])


@pytest.fixture(scope='session')
def parity_report(request):
    """The session's one parity run."""
    from .run import compare
    config = request.config
    capman = config.pluginmanager.getplugin('capturemanager')
    # the progress bar must reach the terminal, so output capture is off while the models load and run
    quiet = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with quiet:
        report = compare(_model_path(config), dtype=config.getoption('parity_dtype'),
                         device=config.getoption('parity_device'), prompts=config.getoption('parity_prompts'),
                         decode_steps=config.getoption('parity_decode_steps'),
                         custom_module_map=config.getoption('parity_module_map'),
                         block_size=config.getoption('parity_block_size'),
                         qkv_taps=config.getoption('parity_qkv_taps'), progress=sys.stderr.isatty())
    config.stash[_REPORT] = report
    directory = config.getoption('parity_report')
    if directory:
        config.stash[_REPORT_PATHS] = report.save(directory)
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = config.stash.get(_REPORT, None)
    if report is None:
        return
    terminalreporter.section('lmdp parity')
    for line in report.summary().splitlines():
        terminalreporter.write_line(line)
    paths = config.stash.get(_REPORT_PATHS, None)
    if paths:
        terminalreporter.write_line(f"report: {paths['json']}, {paths['html']}")
