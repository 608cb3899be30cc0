"""Bad options to the parity harness fail before any work, naming the option and what to do: the same check and
the same words from `pytest parity`, `lmdp parity` and `parity.compare` (parity/options.py)."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from lmdp.cli import build_parser
from parity.options import OPTIONS, OptionError, check_options

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))


def _unwritable_report_parent(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    return str(blocker / 'report')


# (flag, value, what the message must say): each is a mistake a user makes
BAD = [
    ('--decode-steps', '-1', 'must be 0 or more'),
    ('--prompts', '-2', 'a count of random prompts must be 1 or more'),
    ('--prompts', '0', 'a count of random prompts must be 1 or more'),
    ('--prompts', 'no_such_prompts.txt', 'neither a count nor an existing file'),
    ('--block-size', '0', 'must be 1 or more'),
    ('--block-size', '12', 'must be a power of two'),
    ('--device', 'tpu', 'not a device name; use auto, cpu, cuda or cuda:N'),
    ('--device', 'meta', 'lmdp runs on cpu or cuda'),
    ('--model', 'no/such/checkpoint', 'no such folder; pass the checkpoint folder'),
    ('--custom-module-map', 'no_such_map.py', 'no such file; pass the .py file that defines MODULE_MAP'),
    ('--report', None, 'so no folder can be made under it'),
]
KEYWORD = {o.flags[0]: o.keyword for o in OPTIONS}


def _value(flag, value, tmp_path):
    return _unwritable_report_parent(tmp_path) if flag == '--report' else value


def _convert(flag, value):
    option = next(o for o in OPTIONS if o.flags[0] == flag)
    return option.convert(value) if option.convert else value


@pytest.mark.parametrize('flag,value,says', BAD, ids=[f'{f}={v}' for f, v, _ in BAD])
def test_check_options_names_the_flag_and_the_fix(flag, value, says, tmp_path):
    value = _value(flag, value, tmp_path)
    with pytest.raises(OptionError) as err:
        check_options(**{KEYWORD[flag]: _convert(flag, value)})
    assert err.value.command_line().startswith(f'{flag} {value}: ')
    assert says in err.value.command_line()
    assert str(err.value).startswith(f'{KEYWORD[flag]}=')     # compare()'s keyword in the API's message


def test_a_folder_without_write_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip('root writes anywhere; the file-in-the-way case covers this check')
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OptionError, match='cannot write in'):
            check_options(report_dir=str(locked / 'out'))
    finally:
        locked.chmod(0o700)


def test_a_read_only_filesystem_is_unwritable_even_for_root():
    if not os.path.isdir('/proc/self'):
        pytest.skip('needs Linux /proc')
    with pytest.raises(OptionError, match=r'cannot write in /proc/self'):
        check_options(report_dir='/proc/self/parity-report')


def test_a_checkpoint_folder_without_config(tmp_path):
    with pytest.raises(OptionError, match='has no config.json'):
        check_options(model_path=str(tmp_path))


def test_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip('a GPU is present')
    with pytest.raises(OptionError, match=r'no CUDA device is visible here'):
        check_options(device='cuda:0')


def test_defaults_and_good_values_pass(tmp_path, tiny_llama):
    check_options()
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('1 2 3\n')
    check_options(model_path=tiny_llama, dtype='bfloat16', device='cpu', prompts=str(prompts), decode_steps=0,
                  block_size=1, report_dir=str(tmp_path / 'new' / 'deeper'), qkv_taps=True)
    assert not (tmp_path / 'new').exists()          # checking a report folder creates nothing


@given(steps=st.integers(-1000, 1000), count=st.integers(-1000, 1000), log2=st.integers(0, 12),
       odd=st.integers(1, 4095).filter(lambda n: n & (n - 1)))
def test_the_rules_over_all_values(steps, count, log2, odd):
    """decode steps >= 0, prompt counts >= 1 (as ints or the command line's strings), block sizes powers of two."""
    def ok(**kw):
        try:
            check_options(**kw)
            return True
        except OptionError:
            return False
    assert ok(decode_steps=steps) == (steps >= 0)
    assert ok(prompts=count) == ok(prompts=str(count)) == (count >= 1)
    assert ok(block_size=2 ** log2) and not ok(block_size=odd) and not ok(block_size=-2 ** log2)


def test_compare_rejects_before_any_model_loads(tiny_llama, monkeypatch):
    import parity.run

    def must_not_run(*a, **k):
        raise AssertionError('the reference ran before the options were checked')
    monkeypatch.setattr(parity.run, 'run_references', must_not_run)
    monkeypatch.setattr(parity.run, 'run_port_ranks', must_not_run)
    with pytest.raises(OptionError, match=r"decode_steps=-1: must be 0 or more"):
        parity.run.compare(tiny_llama, decode_steps=-1)
    with pytest.raises(OptionError, match=r"model_path='nowhere': no such folder"):
        parity.run.compare('nowhere')


def _run(argv, cwd):
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('flag,value,says', [BAD[0], BAD[8]], ids=['decode-steps', 'model'])
def test_pytest_parity_and_lmdp_parity_stop_at_a_bad_option(flag, value, says, tmp_path):
    """Exit status 4 (pytest's usage error) with the message, from both commands, before collection: no item
    ran and nothing says PASS or FAIL (today's negative --decode-steps ran, exited 0 and printed FAIL)."""
    value = _value(flag, value, tmp_path)
    pytest_run = _run([sys.executable, '-m', 'pytest', os.path.join(REPO, 'parity'), '-p', 'no:cacheprovider',
                       flag, value], tmp_path)
    lmdp_run = _run([sys.executable, '-m', 'lmdp', 'parity', flag, value], tmp_path)
    for run in (pytest_run, lmdp_run):
        out = run.stdout + run.stderr
        assert run.returncode == 4, out
        assert f'lmdp parity: {flag} {value}: ' in out and says in out, out
        assert 'passed' not in out and 'PASS' not in out and 'FAIL' not in out and 'Repo id' not in out, out
    assert lmdp_run.stderr == pytest_run.stderr


@pytest.mark.parametrize('argv,says', [
    (['--decode-steps', '-1'], '--decode-steps -1: must be 0 or more'),
    (['--block-size', '0'], '--block-size 0: must be 1 or more'),
    (['--device', 'cuda:99'], '--device cuda:99: ' + ('there are' if torch.cuda.is_available() else 'no CUDA device')),
    (['--prompt-lengths', '4,0'], '--prompt-lengths 4,0: give one or more lengths, each 1 or more'),
    (['--custom-module-map', 'nope.py'], '--custom-module-map nope.py: no such file'),
])
def test_lmdp_compare_checks_its_options_first(argv, says, capsys):
    """Exit status 2 and the flag's name, before the tiny llama is even built (today a negative --decode-steps
    passed and --block-size 0 died in a ZeroDivisionError)."""
    from lmdp.cli import main
    assert main(['compare', *argv]) == 2
    out = capsys.readouterr()
    assert f'lmdp compare: error: {says}' in out.err, out.err
    assert 'built the tiny llama' not in out.out


def test_module_map_flag_is_one_name_with_one_alias_everywhere():
    """`--custom-module-map` (like the API's custom_module_map), `--module-map` its alias: in every lmdp command
    that takes a port, and in the pytest plugin."""
    commands = build_parser()._subparsers._group_actions[0].choices
    seen = []
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest == 'custom_module_map':
                seen.append(name)
                assert action.option_strings == ['--custom-module-map', '--module-map'], name
    assert set(seen) >= {'check', 'compare', 'parity', 'generate'}
    option = next(o for o in OPTIONS if o.keyword == 'custom_module_map')
    assert tuple(option.flags) == ('--custom-module-map', '--module-map')


def test_lmdp_parity_hands_pytest_the_same_options(monkeypatch):
    """What `lmdp parity` runs: pytest on the suite's folder with the options as given (the alias under its one
    name, the positional checkpoint as --model) and, after `--`, pytest's own arguments."""
    import subprocess

    import parity
    from lmdp.cli import main
    calls = []
    monkeypatch.setattr(subprocess, 'call', lambda argv: calls.append(argv) or 0)
    assert main(['-v', 'parity', 'ckpt', '--module-map', 'm.py', '--qkv-taps', '--decode-steps', '2', '--',
                 '-x', '-k', 'attn']) == 0
    suite = os.path.dirname(os.path.abspath(parity.__file__))
    assert calls == [[sys.executable, '-m', 'pytest', suite, '-p', 'no:cacheprovider', '--model', 'ckpt',
                      '--decode-steps', '2', '--custom-module-map', 'm.py', '--qkv-taps', '-x', '-k', 'attn']]
    assert main(['parity', 'a', '--model', 'b']) == 2      # two different checkpoints: an error, not a guess
