"""`lmdp generate MODEL PROMPT`."""
from lmdp.cli import main


def test_generate_prints_the_greedy_continuation(tiny2, pipe, capsys):
    from lmdp import GenerationConfig
    expected = pipe('Why is the sky blue?', GenerationConfig(max_new_tokens=6, ignore_eos=True)).text
    assert main(['generate', tiny2, 'Why is the sky blue?', '--max-new-tokens', '6', '--ignore-eos',
                 '--device', 'cpu', '--dtype', 'float32']) == 0
    assert capsys.readouterr().out == expected + '\n'


def test_generate_reports_bad_input(tiny2, tmp_path, capsys):
    assert main(['generate', tiny2, '', '--device', 'cpu']) == 2
    assert 'prompt is empty' in capsys.readouterr().err
    assert main(['generate', str(tmp_path), 'hi', '--device', 'cpu']) == 2
    assert 'has no config.json' in capsys.readouterr().err
    assert main(['generate', tiny2, 'hi', '--device', 'cpu', '--custom-module-map', str(tmp_path / 'x.py')]) == 2
    assert 'does not exist' in capsys.readouterr().err
