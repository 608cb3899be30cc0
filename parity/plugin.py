"""The pytest side of the harness: `pytest parity [--model PATH] [--dtype ...] [--report DIR] ...`.

The suite is one parity run (`parity.compare`), made once per session, and one pytest item per tap and phase
(`test_tap[prefill-layers.3.attn]`) plus one per whole-model check, so the first failing layer shows in pytest's
own summary. For a mixture of experts the run compares the routers too (a 'routing'
check per phase with the agreement rate per layer; parity/routing_checks.py). The console
table and `first divergence: ...` come at the end of the session.

This module is a pytest11 entry point named `parity`: once lmdp is installed pytest loads it wherever it
runs, and `pytest parity` (from a folder with no `parity` of its own, the argument means the installed suite),
`pytest --pyargs parity` and `lmdp parity` all run the suite. From a checkout that is not installed,
parity/conftest.py registers it. Every pytest session loads it, so it imports nothing heavy until the suite runs,
and it adds its options only to sessions that run the suite.
The options and their checks live in parity/options.py.
"""
import contextlib
import os
import shutil
import sys
import tempfile

import pytest

from .options import OPTIONS, OptionError, add_options, check_options

NAME = 'parity'
SUITE_DIR = os.path.dirname(os.path.abspath(__file__))
_PREFIX = 'parity_'

_TINY_DIR = pytest.StashKey[str]()
_REPORT = pytest.StashKey[object]()
_REPORT_PATHS = pytest.StashKey[dict]()
_FAILURE = pytest.StashKey[BaseException]()


def _checks(moe: bool = False):
    from .checks import TOP_K
    routing = [('routing', 'prefill'), ('routing', 'decode')] if moe else []
    return routing + [('logprob_kl', 'prefill'), (f'top{TOP_K}', 'prefill'), ('logprob_kl', 'decode'),
                      (f'top{TOP_K}', 'decode'), ('greedy', None), ('weight_coverage', None), ('cuda_graph', None),
                      ('cuda_graph_padded', None)]


def _is_moe(path: str) -> bool:
    """Whether the checkpoint routes tokens to experts (its runs then have 'routing' checks)."""
    from transformers import AutoConfig

    from .routing import is_moe
    try:
        return is_moe(AutoConfig.from_pretrained(path))
    except Exception:  # noqa: BLE001 - an unreadable config is reported by _taps, as a usage error
        return False


def _option(config, keyword):
    return config.getoption(_PREFIX + keyword)


def add_parity_options(parser):
    """The harness's options, once per session: from the hook below, or from parity/conftest.py when pytest
    collects the suite's folder."""
    group = parser.getgroup('parity', 'lmdp parity harness (pytest parity --model PATH)')
    if not group.options:
        add_options(group.addoption, dest_prefix=_PREFIX)


def _installed_suite(arg: str, invocation_dir) -> str:
    """`parity`, `parity/test_parity.py::...`: the installed suite, when the invocation folder has no such path."""
    path = arg.split('::', 1)[0]
    if not (path == NAME or path.startswith(NAME + '/')) or os.path.exists(os.path.join(invocation_dir, path)):
        return arg
    return SUITE_DIR + arg[len(NAME):]


def _targets_suite(early_config) -> bool:
    namespace = early_config.known_args_namespace
    invocation_dir = early_config.invocation_params.dir
    for arg in namespace.file_or_dir or []:
        path = str(arg).split('::', 1)[0]
        if namespace.pyargs and (path == NAME or path.startswith(NAME + '.')):
            return True
        if _installed_suite(path, invocation_dir) != path:
            return True
        full = os.path.realpath(os.path.join(invocation_dir, path))
        if full == SUITE_DIR or full.startswith(SUITE_DIR + os.sep):
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # Every pytest session in an environment with lmdp loads this plugin. Options named --model or --device there
    # would collide with a project's own conftest options, so they exist only in sessions that run this suite.
    if _targets_suite(early_config):
        add_parity_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not hasattr(config.option, _PREFIX + 'dtype'):     # a session that does not run the suite
        return
    if not config.option.pyargs:
        config.args[:] = [_installed_suite(a, config.invocation_params.dir) for a in config.args]
    # bad options stop the session here, before collection builds a model or reads a checkpoint
    try:
        check_options(**{o.keyword: _option(config, o.keyword) for o in OPTIONS})
    except OptionError as e:
        raise pytest.UsageError(f'lmdp parity: {e.command_line()}') from None


def _model_path(config) -> str:
    path = _option(config, 'model_path')
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
        raise pytest.UsageError(f'lmdp parity: cannot read the config of --model {path!r}: {e}') from e


def pytest_generate_tests(metafunc):
    if not {'parity_tap', 'parity_check'} & set(metafunc.fixturenames):
        return
    from .capture_set import PHASES
    config = metafunc.config
    phases = [p for p in PHASES if p == 'prefill' or _option(config, 'decode_steps') > 0]
    if 'parity_tap' in metafunc.fixturenames:
        taps = _taps(_model_path(config))
        params = [(phase, tap.name) for phase in phases for tap in taps]
        metafunc.parametrize('parity_tap', params, ids=[f'{p}-{n}' for p, n in params])
    if 'parity_check' in metafunc.fixturenames:
        params = [(n, p) for n, p in _checks(_is_moe(_model_path(config))) if p is None or p in phases]
        metafunc.parametrize('parity_check', params, ids=[f'{n}-{p}' if p else n for n, p in params])


@pytest.fixture(scope='session')
def parity_report(request):
    """The session's one parity run. If it raises (a port that cannot load, above all), the session stops after
    the first item and the error is printed once, at the end, with its cause and a FAIL verdict line."""
    from .run import compare
    config = request.config
    capman = config.pluginmanager.getplugin('capturemanager')
    # the progress bar must reach the terminal, so output capture is off while the models load and run
    quiet = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    try:
        with quiet:
            report = compare(_model_path(config), dtype=_option(config, 'dtype'), device=_option(config, 'device'),
                             prompts=_option(config, 'prompts'), decode_steps=_option(config, 'decode_steps'),
                             custom_module_map=_option(config, 'custom_module_map'),
                             block_size=_option(config, 'block_size'), qkv_taps=_option(config, 'qkv_taps'),
                             tp=_option(config, 'tp'),
                             progress=sys.stderr.isatty())
    except Exception as e:  # noqa: BLE001 - reported once, in full, by pytest_terminal_summary
        config.stash[_FAILURE] = e
    if _FAILURE in config.stash:   # outside the except block, so pytest shows no exception chain per item
        request.session.shouldfail = 'the parity run could not finish'
        pytest.fail('the parity run could not finish; its error is printed once, under "lmdp parity" below',
                    pytrace=False)
    config.stash[_REPORT] = report
    directory = _option(config, 'report_dir')
    if directory:
        config.stash[_REPORT_PATHS] = report.save(directory)
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    failure = config.stash.get(_FAILURE, None)
    report = config.stash.get(_REPORT, None)
    if failure is None and report is None:
        return
    terminalreporter.section('lmdp parity')
    if failure is not None:
        from .load_failure import failure_lines
        lines = failure_lines(failure)
        for line in lines[:-1]:
            terminalreporter.write_line(line)
        terminalreporter.write_line(lines[-1], red=True, bold=True)
        return
    for line in report.summary().splitlines():
        terminalreporter.write_line(line)
    paths = config.stash.get(_REPORT_PATHS, None)
    if paths:
        terminalreporter.write_line(f"report: {paths['json']}, {paths['html']}")
