"""After a plain `pip install` (here: a non-editable install into a temporary --target folder, put on PYTHONPATH),
from a folder outside the repository: `pytest parity --model DIR`, `pytest --pyargs parity --model DIR` and
`lmdp parity DIR` run the suite (the plugin is the installed `pytest11` entry point)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ['--prompts', '1', '--decode-steps', '1']


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """(site folder, environment, an empty working folder outside the repository)."""
    root = tmp_path_factory.mktemp('installed')
    src = root / 'src'     # a copy, so that the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ('lmdp', 'parity'):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns('__pycache__'))
    site = root / 'site'
    # setuptools already here: build with it, offline; otherwise pip fetches it into an isolated build env
    isolation = ['--no-build-isolation'] if importlib.util.find_spec('setuptools') else []
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check', '--no-deps',
                    *isolation, '--target', str(site), str(src)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTEST_ADDOPTS', 'PYTEST_PLUGINS',
                                                           'PYTEST_DISABLE_PLUGIN_AUTOLOAD')}
    env['PYTHONPATH'] = str(site)
    elsewhere = root / 'elsewhere'
    elsewhere.mkdir()
    found = subprocess.run([sys.executable, '-c', 'import lmdp, parity; print(lmdp.__file__); print(parity.__file__)'],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in found), found   # the install is what runs, not the checkout
    return site, env, elsewhere


def _run(argv, installed):
    site, env, elsewhere = installed
    return subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)


def _harness_section(out: str) -> list:
    """The harness's own lines (table, checks, verdict) without the timings."""
    lines = out[out.index('= lmdp parity ='):].splitlines()[1:]
    return [line for line in lines if not line.startswith('time:') and not line.startswith('=')]


def test_pytest_parity_from_any_folder_with_a_custom_module_map(installed, tiny_llama, tmp_path):
    module_map = tmp_path / 'buggy_map.py'
    module_map.write_text('from parity.planted_bugs import MLPDroppedInLayer1\n'
                          "MODULE_MAP = {'LlamaForCausalLM': MLPDroppedInLayer1}\n")
    run = _run([sys.executable, '-m', 'pytest', 'parity', '-q', '-p', 'no:cacheprovider', '--model', tiny_llama,
                '--custom-module-map', str(module_map), *FAST], installed)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert 'first divergence: layer 1, residual (prefill' in out, out


def test_pytest_pyargs_and_lmdp_parity_agree(installed, tiny_llama):
    site, _, _ = installed
    by_pytest = _run([sys.executable, '-m', 'pytest', '--pyargs', 'parity', '-p', 'no:cacheprovider', '--model',
                      tiny_llama, *FAST], installed)
    by_lmdp = _run([str(site / 'bin' / 'lmdp'), 'parity', tiny_llama, *FAST], installed)
    for run in (by_pytest, by_lmdp):
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(r'^PASS: (\d+)/\1 taps within tolerance', run.stdout, re.M), run.stdout
    assert _harness_section(by_lmdp.stdout) == _harness_section(by_pytest.stdout)


def test_other_projects_keep_their_own_options(installed, tmp_path):
    """pytest loads the installed plugin in every session; a project whose conftest has its own --model and
    --device options (common in ML code) must still run, and its sessions get none of the harness's options."""
    project = tmp_path / 'project'
    project.mkdir()
    (project / 'conftest.py').write_text(
        'def pytest_addoption(parser):\n'
        "    parser.addoption('--model', default='theirs')\n"
        "    parser.addoption('--device', default='cpu')\n")
    (project / 'test_theirs.py').write_text(
        'def test_options(request):\n'
        "    assert request.config.getoption('--model') == 'mine'\n"
        "    assert not hasattr(request.config.option, 'parity_dtype')\n")
    site, env, _ = installed
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--model', 'mine'],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    plugins = subprocess.run([sys.executable, '-m', 'pytest', '--trace-config', '--co', '-q', '-p', 'no:cacheprovider'],
                             cwd=project, env=env, capture_output=True, text=True, timeout=300).stdout
    assert f"PLUGIN registered: <module 'parity.plugin' from '{site / 'parity' / 'plugin.py'}'>" in plugins, plugins
