"""Broken configs, tokenizers and generation configs: `pipeline()` raises lmdp's own error naming the file and the
field, before the tokenizer or the model is loaded where the config is at fault, and `lmdp check` reports the same
problem in the same words."""
import json

import pytest

from lmdp.check_env import check_model
from lmdp.errors import ConfigError, TokenizerError


def _pop(*names):
    return lambda c: [c.pop(n) for n in names]


def _set(**values):
    return lambda c: c.update(values)


def _rope(**params):
    return lambda c: c.update(rope_parameters=dict(params), rope_scaling=None)


# (config.json edit or {file: text}, error type, words the message must hold, whether the tokenizer may have loaded)
CONFIGS = {
    'no config.json': ({'config.json': None}, ConfigError, ['has no config.json'], False),
    'config.json not JSON': ({'config.json': '{"model_type": "llama",,}'}, ConfigError,
                             ['config.json', 'is not valid JSON', 'line 1, column'], False),
    'config.json a list': ({'config.json': '[1, 2]'}, ConfigError, ['must hold a JSON object, found list'], False),
    'no model_type': (_pop('model_type'), ConfigError, ["has no 'model_type'"], False),
    'hidden_size a string': (_set(hidden_size='64'), ConfigError, ['"hidden_size" must be a positive integer',
                                                                   "'64'"], False),
    'zero attention heads': (_set(num_attention_heads=0), ConfigError, ['"num_attention_heads"', 'got 0'], False),
    'negative vocab': (_set(vocab_size=-3), ConfigError, ['"vocab_size" must be a positive integer'], False),
    'architectures a string': (_set(architectures='LlamaForCausalLM'), ConfigError,
                               ['"architectures" must be a list', "got 'LlamaForCausalLM'"], False),
    'eos a string': (_set(eos_token_id='</s>'), ConfigError, ['"eos_token_id" must be a token id', "'</s>'"], False),
    'kv heads not dividing heads': (_set(num_key_value_heads=3), ConfigError,
                                    ['num_attention_heads (4) is not a multiple of num_key_value_heads (3)'], False),
    'num_attention_heads unset': (_pop('num_attention_heads'), ConfigError,
                                  ['does not set num_attention_heads', 'Add "num_attention_heads"'], False),
    'num_key_value_heads unset (issue 12, point 6)': (
        _pop('num_key_value_heads'), ConfigError,
        ['num_key_value_heads is 4', "transformers' default", 'k_proj.weight', 'Set "num_key_value_heads": 2'], True),
    'intermediate_size unset (issue 12, point 6)': (
        _pop('intermediate_size'), ConfigError,
        ['intermediate_size is 11008', 'down_proj.weight', 'Set "intermediate_size": 128'], True),
    'more layers than the weights hold': (_set(num_hidden_layers=3), ConfigError,
                                          ['num_hidden_layers is 3', 'holds 2 layers'], True),
    'linear rope without a factor (issue 12, point 5)': (_rope(rope_type='linear', rope_theta=10000.0), ConfigError,
                                                         ['config.json', "'factor'"], False),
    'an unsupported rope type (issue 12, point 6)': (_rope(rope_type='warp', rope_theta=10000.0), ConfigError,
                                                     ['could not be built from config.json', "'warp'",
                                                      'supported rope types'], True),
    'rope_theta a string': (_rope(rope_type='default', rope_theta='1e4'), ConfigError,
                            ['rope_parameters["rope_theta"] must be a number', "'1e4'"], False),
    'yarn factor a string': (_rope(rope_type='yarn', rope_theta=10000.0, factor='4'), ConfigError,
                             ['"factor"', "'4'"], False),
    'no tokenizer (issue 12, point 6)': ({'tokenizer.json': None, 'tokenizer_config.json': None}, TokenizerError,
                                         ['could not load the tokenizer', 'tokenizer.json'], True),
    'tokenizer.json not JSON': ({'tokenizer.json': '{"version": '}, TokenizerError,
                                ['could not load the tokenizer'], True),
    'generation_config.json not JSON': ({'generation_config.json': '{"temperature": 0.7,'}, ConfigError,
                                        ['generation_config.json', 'not valid JSON'], True),
    'generation_config temperature a string': ({'generation_config.json': '{"temperature": "hot"}'}, ConfigError,
                                               ['generation_config.json', 'temperature must be a number', "'hot'",
                                                'fix or remove "temperature"'], True),
    'generation_config top_p 2': ({'generation_config.json': '{"top_p": 2.0}'}, ConfigError,
                                  ['generation_config.json', 'top_p must be in (0, 1]'], True),
    'generation_config eos a string': ({'generation_config.json': '{"eos_token_id": "</s>"}'}, ConfigError,
                                       ['generation_config.json', 'eos_token_id must be a token id'], True),
    # an unported architecture of a known model_type runs on the transformers fallback (tests/fallback); one that
    # transformers does not know either can't be served at all
    'architecture unknown everywhere': (_set(architectures=['FancyNewForCausalLM'], model_type='fancy_new'),
                                        ConfigError, ["model_type 'fancy_new'", 'trust_remote_code'], True),
}


@pytest.mark.parametrize('case', list(CONFIGS))
def test_a_broken_config_is_named_before_work_is_done(case, tiny, ckpt_copy, make_pipe, monkeypatch):
    edit, error_type, words, tokenizer_may_load = CONFIGS[case]
    path = ckpt_copy(tiny, files=edit) if isinstance(edit, dict) else ckpt_copy(tiny, config_edit=edit)
    import lmdp.engine.engine as engine_module
    import lmdp.tokenizer as tokenizer_module
    loaded = []
    init = tokenizer_module.Tokenizer.__init__
    monkeypatch.setattr(tokenizer_module.Tokenizer, '__init__',
                        lambda self, *a, **k: loaded.append(a) or init(self, *a, **k))
    monkeypatch.setattr(engine_module.ModelAgent, 'from_pretrained',
                        classmethod(lambda cls, *a, **k: pytest.fail('the model was built')))
    with pytest.raises(error_type) as info:
        make_pipe(path)
    message = str(info.value)
    for word in words:
        assert word in message, f'{case}: {word!r} not in {message!r}'
    if not tokenizer_may_load:
        assert not loaded, f'{case}: the tokenizer loaded before the config was found wrong'
    monkeypatch.undo()
    report = check_model(path)
    assert message in report.problems, f'{case}: lmdp check said {report.problems}'


def test_the_meta_build_in_check_costs_no_memory_and_matches(tiny):
    """`lmdp check` builds the model on the meta device: it names the class and finds nothing wrong."""
    report = check_model(tiny)
    assert report.ok, str(report)
    assert report.num_tensors == 2 + 2 * 9 + 1 and report.tokenizer


def test_an_eos_id_outside_the_vocab_is_a_note_not_a_problem(tiny, ckpt_copy):
    path = ckpt_copy(tiny, config_edit=_set(eos_token_id=[2, 900]))
    report = check_model(path)
    assert report.ok and any('900' in n and 'never be generated' in n for n in report.notes)


def test_check_reports_every_problem_at_once(tiny, ckpt_copy):
    """Independent problems are all listed, so one run of `lmdp check` shows everything to fix."""
    path = ckpt_copy(tiny, config_edit=_pop('num_key_value_heads'),
                     files={'tokenizer.json': None, 'tokenizer_config.json': None,
                            'generation_config.json': json.dumps({'top_k': -2})})
    problems = check_model(path).problems
    assert len(problems) == 3, problems
    assert any('num_key_value_heads' in p for p in problems)
    assert any('tokenizer' in p for p in problems)
    assert any('top_k' in p for p in problems)
