"""The official openai client against `lmdp serve`: completions and chat, streaming and not, sync and async; the
server's greedy (and seeded) outputs are pipeline()'s for the same prompts and settings."""
import asyncio

import pytest

from lmdp import GenerationConfig

PROMPTS = ['Once upon a time', 'The capital of France is', 'def fibonacci(n):']
CHAT = [{'role': 'system', 'content': 'You are terse.'}, {'role': 'user', 'content': 'Why is the sky blue?'}]


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ['tiny']
    assert client.models.retrieve('tiny').id == 'tiny'


def test_completions_greedy_equal_pipeline(client, reference):
    got = client.completions.create(model='tiny', prompt=PROMPTS, max_tokens=12, temperature=0,
                                    extra_body={'ignore_eos': True})
    expected = reference(PROMPTS, GenerationConfig(max_new_tokens=12, ignore_eos=True), do_preprocess=False)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [r.text for r in expected]
    assert all(c.finish_reason == 'length' for c in got.choices)
    assert got.usage.prompt_tokens == sum(r.input_token_len for r in expected)
    assert got.usage.completion_tokens == 3 * 12


def test_completions_of_token_ids(client, reference):
    ids = [1, 40, 41, 42, 43, 44]
    got = client.completions.create(model='tiny', prompt=ids, max_tokens=10, temperature=0)
    expected = reference(ids, GenerationConfig(max_new_tokens=10))
    assert got.choices[0].text == expected.text
    assert got.usage.prompt_tokens == len(ids)


def test_completions_stream_joins_to_the_pipeline_text(client, reference):
    stream = client.completions.create(model='tiny', prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True,
                                       stream_options={'include_usage': True}, extra_body={'ignore_eos': True})
    chunks = list(stream)
    text = ''.join(c.choices[0].text for c in chunks if c.choices)
    expected = reference(PROMPTS[0], GenerationConfig(max_new_tokens=20, ignore_eos=True), do_preprocess=False)
    assert text == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1      # it did stream
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ['length']
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == expected.input_token_len


def test_chat_greedy_equal_pipeline_sync_and_async(client, aclient, reference):
    expected = reference([CHAT], GenerationConfig(max_new_tokens=16))[0]
    got = client.chat.completions.create(model='tiny', messages=CHAT, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == expected.text
    assert got.choices[0].message.role == 'assistant'
    assert got.choices[0].finish_reason == ('length' if expected.finish_reason == 'length' else 'stop')
    assert got.usage.prompt_tokens == expected.input_token_len

    async def stream():
        s = await aclient.chat.completions.create(model='tiny', messages=CHAT, max_completion_tokens=16,
                                                  temperature=0, stream=True)
        return [c async for c in s]

    chunks = asyncio.run(stream())
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_sampling_settings_reach_the_engine(client, reference):
    """Seeded sampling with every knob set: the server's draw is pipeline()'s draw with the same settings, and a
    knob the server dropped would change it."""
    kw = dict(temperature=0.7, top_p=0.9, seed=1234)
    extra = dict(top_k=20, min_p=0.05, repetition_penalty=1.1, ignore_eos=True)
    got = client.completions.create(model='tiny', prompt=PROMPTS[1], max_tokens=24, extra_body=extra, **kw)
    expected = reference(PROMPTS[1], GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9,
                                                      top_k=20, min_p=0.05, repetition_penalty=1.1, random_seed=1234,
                                                      ignore_eos=True), do_preprocess=False)
    assert got.choices[0].text == expected.text
    other = reference(PROMPTS[1], GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9,
                                                   random_seed=1234, ignore_eos=True), do_preprocess=False)
    assert other.text != expected.text, 'top_k/min_p/repetition_penalty make no difference here: pick other values'


def test_stop_strings_end_the_text_as_in_pipeline(client, reference):
    free = reference(PROMPTS[2], GenerationConfig(max_new_tokens=30, ignore_eos=True), do_preprocess=False).text
    stop = free[10:13]                 # a string the greedy output is known to contain
    assert stop.strip(), free
    got = client.completions.create(model='tiny', prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={'ignore_eos': True})
    expected = reference(PROMPTS[2], GenerationConfig(max_new_tokens=30, ignore_eos=True, stop_words=[stop]),
                         do_preprocess=False)
    assert got.choices[0].text == expected.text == free[:free.index(stop)]
    assert got.choices[0].finish_reason == 'stop'


@pytest.mark.parametrize('stream', [False, True])
def test_chat_logprobs_are_the_engine_logprobs(client, reference, stream):
    expected = reference([CHAT], GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=3))[0]
    got = client.chat.completions.create(model='tiny', messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3, stream=stream, extra_body={'ignore_eos': True})
    if stream:
        entries = [e for c in got if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        entries = got.choices[0].logprobs.content
    assert len(entries) == len(expected.token_ids) == 8
    for entry, token, lp in zip(entries, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(lp[token], abs=1e-4)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops == pytest.approx(sorted(lp.values(), reverse=True)[:3], abs=1e-4)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)        # greedy: the chosen token is the likeliest


def test_completion_logprobs_are_the_engine_logprobs(client, reference):
    expected = reference(PROMPTS[0], GenerationConfig(max_new_tokens=10, ignore_eos=True, logprobs=2),
                         do_preprocess=False)
    got = client.completions.create(model='tiny', prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=2,
                                    extra_body={'ignore_eos': True}).choices[0].logprobs
    decode = reference.tokenizer.model.decode
    assert got.tokens == [decode([t]) for t in expected.token_ids]
    assert got.token_logprobs == pytest.approx([lp[t] for t, lp in zip(expected.token_ids, expected.logprobs)],
                                               abs=1e-4)
    for top, lp in zip(got.top_logprobs, expected.logprobs):
        best = sorted(lp.items(), key=lambda kv: -kv[1])[:2]
        # keyed by text, as OpenAI's format is: two tokens that read the same share one key, the likeliest's
        assert set(top) == {decode([t]) for t, _ in best}
        assert max(top.values()) == pytest.approx(best[0][1], abs=1e-4)
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(10)]


def test_zero_max_tokens_gives_an_empty_length_finish(client):
    got = client.completions.create(model='tiny', prompt='Hello', max_tokens=0)
    assert got.choices[0].text == '' and got.choices[0].finish_reason == 'length'
    assert got.usage.completion_tokens == 0
