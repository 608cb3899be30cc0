"""The `lmdp` console script."""
import subprocess
import sys

from lmdp.cli import main


def test_make_tiny_then_compare(tmp_path, capsys):
    assert main(['make-tiny', 'llama', str(tmp_path / 'tl'), '--layers', '2']) == 0
    assert (tmp_path / 'tl' / 'config.json').is_file()
    assert main(['compare', str(tmp_path / 'tl'), '--prompt-lengths', '4,9', '--decode-steps', '3']) == 0
    out = capsys.readouterr().out
    assert 'PASS: max relative L2 error' in out and 'greedy tokens equal for 2/2 prompts' in out


def test_make_tiny_unknown_family_is_an_error(tmp_path, capsys):
    assert main(['make-tiny', 'nosuchfamily', str(tmp_path / 'x')]) == 2
    assert 'nosuchfamily' in capsys.readouterr().err


def test_console_entry_runs_as_module(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'lmdp', 'check', str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert 'has no config.json' in result.stdout
