"""The request models and the metrics, without a server: what a request's fields mean to the engine."""
import pytest
from hypothesis import given, strategies as st

from lmdp.serve.metrics import ServerMetrics, parse
from lmdp.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

maybe = lambda s: st.none() | s  # noqa: E731
KNOBS = dict(temperature=maybe(st.floats(0, 2)), top_p=maybe(st.floats(0.01, 1)), top_k=maybe(st.integers(-1, 100)),
             min_p=maybe(st.floats(0, 1)), repetition_penalty=maybe(st.floats(0.5, 2)))


@given(fields=st.fixed_dictionaries(KNOBS), defaults=st.fixed_dictionaries(
    KNOBS).map(lambda d: {k: v for k, v in d.items() if v is not None}))
def test_request_values_win_then_checkpoint_defaults_then_openai(fields, defaults):
    openai_defaults = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
    g = CompletionRequest(model='m', prompt="x", **fields).generation_config(16, None, defaults)
    for name, fallback in openai_defaults.items():
        want = fields[name] if fields[name] is not None else defaults.get(name, fallback)
        if name == 'top_k':
            want = max(want, 0)                      # -1 is vLLM's "no limit", 0 is lmdp's
        assert getattr(g, name) == want, name
    assert g.is_greedy == (g.temperature == 0)


def test_stop_seed_and_extensions_map_to_the_generation_config():
    g = ChatCompletionRequest(model='m', messages=[{'role': 'user', 'content': 'hi'}], stop='END', seed=7,
                              min_tokens=3, ignore_eos=True, stop_token_ids=[5], include_stop_str_in_output=True,
                              skip_special_tokens=False).generation_config(32, 2, {})
    assert (g.stop_words, g.random_seed, g.min_new_tokens, g.ignore_eos, g.stop_token_ids) == \
        (['END'], 7, 3, True, [5])
    assert g.include_stop_str_in_output and not g.skip_special_tokens
    assert (g.max_new_tokens, g.logprobs) == (32, 2)


def test_completion_prompts_one_per_choice():
    assert CompletionRequest(model='m', prompt='a').prompts() == ['a']
    assert CompletionRequest(model='m', prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model='m', prompt=['a', 'b']).prompts() == ['a', 'b']
    assert CompletionRequest(model='m', prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(APIError, match='empty'):
        CompletionRequest(model='m', prompt=[]).prompts()


def test_chat_content_parts_join_and_non_text_is_refused():
    text = ChatCompletionRequest(model='m', messages=[{'role': 'user', 'content': [
        {'type': 'text', 'text': 'a'}, {'type': 'text', 'text': 'b'}]}]).messages[0].as_template_input()
    assert text == {'role': 'user', 'content': 'ab'}
    req = ChatCompletionRequest(model='m', messages=[{'role': 'user', 'content': [{'type': 'input_audio'}]}])
    with pytest.raises(APIError, match="'input_audio'"):
        req.messages[0].as_template_input()


def test_tokens_per_second_counts_only_the_window():
    now = [100.0]
    m = ServerMetrics('m', window=10, clock=lambda: now[0])
    now[0] = 105.0
    m.count_tokens(50)                      # 5 s after start: 50 tokens in 5 s
    assert m.tokens_per_second() == pytest.approx(10.0)
    now[0] = 112.0
    m.count_tokens(30)                      # the window is the last 10 s: 80 tokens
    assert m.tokens_per_second() == pytest.approx(8.0)
    now[0] = 116.0                          # the first 50 fell out of the window
    assert m.tokens_per_second() == pytest.approx(3.0)
    assert m.generation_tokens == 80


def test_metrics_text_parses_back():
    class Stub:
        pass
    engine, bm, sched = Stub(), Stub(), Stub()
    bm.num_used, bm.num_blocks, bm.stats = 3, 12, Stub()
    bm.stats.hit_tokens = 64
    sched.running, sched.waiting, sched.num_preemptions = [1, 2], [3], 0
    engine.block_manager, engine.scheduler, engine.stats = bm, sched, Stub()
    engine.stats.prefill_tokens, engine.stats.decode_steps, engine.stats.prefill_steps = 10, 4, 1
    m = ServerMetrics('a "quoted" name')
    m.count_finished('abort', 7)
    values = parse(m.render(engine))
    label = 'model_name="a \\"quoted\\" name"'
    assert values[f'lmdp_num_requests_running{{{label}}}'] == 2
    assert values[f'lmdp_kv_cache_usage_ratio{{{label}}}'] == 0.25
    assert values[f'lmdp_request_success_total{{{label},finished_reason="abort"}}'] == 1
    assert values[f'lmdp_prompt_tokens_total{{{label}}}'] == 7
