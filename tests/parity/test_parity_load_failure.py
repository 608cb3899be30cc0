"""A port that cannot be imported, built or loaded: one error with its cause and a `FAIL: the port could not be
loaded: ...` verdict, not a traceback per pytest item; from the API, a PortLoadError raised as early as it can be."""
import os
import subprocess
import sys
import textwrap

import pytest

import parity.run
from parity.load_failure import PortLoadError, failure_lines

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BROKEN_CONSTRUCTOR = '''from lmdp.models.llama import LlamaForCausalLM


class Broken(LlamaForCausalLM):
    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr, dtype=dtype, device=device)
        self.scale = config.no_such_setting     # line 7: the user's mistake
'''


def _port(folder, module_source, target='broken_port.Broken'):
    folder.mkdir(exist_ok=True)
    (folder / 'broken_port.py').write_text(module_source)
    (folder / 'module_map.py').write_text(f"MODULE_MAP = {{'LlamaForCausalLM': {target!r}}}\n")
    return str(folder / 'module_map.py')


@pytest.fixture()
def own_sys_path(monkeypatch):
    monkeypatch.setattr(sys, 'path', list(sys.path))


def test_pytest_parity_prints_the_error_once_with_a_verdict(tiny_llama, tmp_path):
    module_map = _port(tmp_path / 'port', BROKEN_CONSTRUCTOR)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-m', 'pytest', 'parity', '-p', 'no:cacheprovider', '--model', tiny_llama,
                             '--custom-module-map', module_map, '--prompts', '1', '--decode-steps', '1'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    verdict = ("FAIL: the port could not be loaded: AttributeError: 'LlamaConfig' object has no attribute "
               "'no_such_setting' (at broken_port.py:7)")
    assert out.count(verdict) == 1, out
    assert out.count('Traceback (most recent call last)') == 1, out       # the cause, once
    assert 'self.scale = config.no_such_setting' in out                  # ... down to the user's own line
    assert '1 error' in out and 'passed' not in out, out                 # the session stopped at the first item
    assert out.index('Traceback') > out.index('= lmdp parity =')         # printed in the harness's section


def test_an_unimportable_port_fails_before_transformers_runs(tiny_llama, tmp_path, monkeypatch, own_sys_path):
    def must_not_run(*a, **k):
        raise AssertionError('transformers ran before the port was imported')
    monkeypatch.setattr(parity.run, 'run_references', must_not_run)
    module_map = _port(tmp_path / 'port', BROKEN_CONSTRUCTOR, target='no_such_module.Broken')
    with pytest.raises(PortLoadError) as err:
        parity.run.compare(tiny_llama, custom_module_map=module_map)
    # lmdp's own message is the whole story (no user code ran): the verdict alone, no traceback
    assert failure_lines(err.value) == ["FAIL: the port could not be loaded: ArchitectureError: module map entry "
                                        "'no_such_module.Broken' cannot be imported: No module named 'no_such_module'"]


def test_a_syntax_error_names_the_file_and_line(tiny_llama, tmp_path, monkeypatch, own_sys_path):
    monkeypatch.setattr(parity.run, 'run_references', lambda *a, **k: pytest.fail('ran past a syntax error'))
    module_map = _port(tmp_path / 'port', 'class Broken(\n    pass\n')
    with pytest.raises(PortLoadError, match='the port could not be loaded: SyntaxError') as err:
        parity.run.compare(tiny_llama, custom_module_map=module_map)
    text = '\n'.join(failure_lines(err.value))
    assert 'broken_port.py", line 1' in text, text


def test_a_constructor_error_keeps_its_cause(tiny_llama, tmp_path, references, own_sys_path):
    module_map = _port(tmp_path / 'port', BROKEN_CONSTRUCTOR)
    with pytest.raises(PortLoadError) as err:
        parity.run.compare(tiny_llama, references=references(), custom_module_map=module_map)
    assert isinstance(err.value.__cause__, AttributeError)
    lines = failure_lines(err.value)
    assert lines[0] == 'Traceback (most recent call last):' and lines[-1].endswith('(at broken_port.py:7)')


def test_other_failures_are_reported_once_too():
    try:
        raise RuntimeError(textwrap.dedent('''\
            CUDA out of memory
            second line'''))
    except RuntimeError as e:
        lines = failure_lines(e)
    assert lines[-1].startswith('FAIL: the parity run stopped: RuntimeError: CUDA out of memory (at ')
    assert 'second line' in '\n'.join(lines[:-1])
