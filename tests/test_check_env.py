"""check_model and `lmdp check`: each problem named in words a person can act on."""
import json
import shutil

from lmdp.check_env import check_model
from lmdp.cli import main


def _copy(tiny_llama, tmp_path, edit=None, text=None):
    dst = tmp_path / 'ckpt'
    shutil.copytree(tiny_llama, dst)
    if text is not None:
        (dst / 'config.json').write_text(text)
    elif edit is not None:
        cfg = json.loads((dst / 'config.json').read_text())
        edit(cfg)
        (dst / 'config.json').write_text(json.dumps(cfg))
    return str(dst)


def test_good_tiny_llama(tiny_llama):
    report = check_model(tiny_llama)
    assert report.ok, str(report)
    assert report.builder == 'LlamaModelConfigBuilder'
    assert report.model_class == 'lmdp.models.llama.LlamaForCausalLM'
    assert report.model_config.num_layers >= 2
    assert 'OK: lmdp can load this checkpoint' in str(report)


def test_config_that_is_not_json(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path, text='{"model_type": "llama", "hidden_size": 64,,}')
    report = check_model(path)
    assert not report.ok and not report.config_parsed
    assert 'is not valid JSON' in report.problems[0]
    assert 'line 1, column' in report.problems[0]


def test_config_missing_num_attention_heads(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path, edit=lambda c: c.pop('num_attention_heads'))
    report = check_model(path)
    assert not report.ok
    assert any('does not set num_attention_heads' in p and 'Add "num_attention_heads"' in p for p in report.problems)


def test_unregistered_architecture(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path, edit=lambda c: c.update(architectures=['FancyNewForCausalLM']))
    # model_impl='lmdp' wants a port: none is registered, and the problem says what is
    report = check_model(path, model_impl='lmdp')
    assert not report.ok
    problem = ' '.join(report.problems)
    assert "'FancyNewForCausalLM' is not registered" in problem
    assert 'LlamaForCausalLM' in problem and 'custom_module_map' in problem
    # by default it runs on its transformers code (model_type llama), and the report says so
    report = check_model(path)
    assert report.ok and report.model_impl == 'transformers'
    assert 'FancyNewForCausalLM has no lmdp port' in report.model_impl_reason


def test_missing_folder_and_missing_weights(tiny_llama, tmp_path):
    assert 'is not a folder' in check_model(str(tmp_path / 'nope')).problems[0]
    path = _copy(tiny_llama, tmp_path)
    for f in (tmp_path / 'ckpt').glob('*.safetensors'):
        f.unlink()
    assert any('holds no weights' in p for p in check_model(path).problems)


def test_cli_check_exit_codes(tiny_llama, tmp_path, capsys):
    assert main(['check', tiny_llama]) == 0
    assert 'LlamaForCausalLM' in capsys.readouterr().out
    bad = _copy(tiny_llama, tmp_path, text='not json')
    assert main(['check', bad]) == 1
    assert 'PROBLEM: config.json' in capsys.readouterr().out
