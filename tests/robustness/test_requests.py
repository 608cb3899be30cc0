"""Hostile requests: each bad one is refused (or failed) alone, with an error that names what was wrong, while the
good requests beside it give exactly what they give on their own and every KV block comes back."""
import math

import numpy as np
import pytest

from lmdp import GenerationConfig


def corrupted(**fields):
    """A GenerationConfig whose fields went bad after they were checked (a list changed in place, a field set
    through object.__setattr__): the engine must check again when the request is submitted."""
    g = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    for name, value in fields.items():
        object.__setattr__(g, name, value)
    return g


def appended(value):
    g = GenerationConfig(max_new_tokens=6, ignore_eos=True, stop_token_ids=[3])
    g.stop_token_ids.append(value)
    return g


OK = GenerationConfig(max_new_tokens=6, ignore_eos=True)

# (prompt, gen_config, the exception the check raises, words the message must hold)
BAD_REQUESTS = {
    'stop id outside the vocab with min_new_tokens (issue 12, point 1)':
        ([5, 6, 7], GenerationConfig(max_new_tokens=8, stop_token_ids=[99999], min_new_tokens=2), ValueError,
         ['stop_token_ids', '99999', 'outside the vocabulary']),
    'stop id one past the vocab': ([5, 6, 7], GenerationConfig(stop_token_ids=[512]), ValueError, ['[512]']),
    'stop id appended in place, not an int': ([5, 6, 7], appended('x'), TypeError, ['stop_token_ids[1]', "'x'"]),
    'stop id appended in place, out of vocab': ([5, 6, 7], appended(70000), ValueError, ['70000']),
    'random_seed 1.5 (issue 12, point 2)': ([5, 6, 7], corrupted(random_seed=1.5), TypeError, ['random_seed', '1.5']),
    "temperature '0.5'": ([5, 6, 7], corrupted(temperature='0.5'), TypeError, ['temperature', "'0.5'"]),
    'top_k -1': ([5, 6, 7], corrupted(top_k=-1), ValueError, ['top_k', '-1']),
    'top_p 0': ([5, 6, 7], corrupted(top_p=0.0), ValueError, ['top_p']),
    'top_p nan': ([5, 6, 7], corrupted(top_p=math.nan), ValueError, ['top_p', 'nan']),
    'min_p 2': ([5, 6, 7], corrupted(min_p=2.0), ValueError, ['min_p']),
    'repetition_penalty 0': ([5, 6, 7], corrupted(repetition_penalty=0), ValueError, ['repetition_penalty']),
    'logprobs -1': ([5, 6, 7], corrupted(logprobs=-1), ValueError, ['logprobs']),
    'max_new_tokens True': ([5, 6, 7], corrupted(max_new_tokens=True), TypeError, ['max_new_tokens', 'bool']),
    "do_sample 'yes'": ([5, 6, 7], corrupted(do_sample='yes'), TypeError, ['do_sample']),
    'min_new_tokens -1': ([5, 6, 7], corrupted(min_new_tokens=-1), ValueError, ['min_new_tokens']),
    "stop_words ['']": ([5, 6, 7], corrupted(stop_words=['']), ValueError, ['stop_words[0]', 'empty']),
    'stop_words [3]': ([5, 6, 7], corrupted(stop_words=[3]), TypeError, ['stop_words[0]', 'int']),
    'empty text': ('', OK, ValueError, ['prompt is empty']),
    'empty token list': ([], OK, ValueError, ['prompt is empty']),
    'prompt as long as session_len': ([1] * 1024, OK, ValueError, ['1024 tokens', 'session_len is 1024']),
    'token id past the vocab': ([1, 9999], OK, ValueError, ['[9999]', 'outside the vocabulary']),
    'negative token id': ([1, -5, 7], OK, ValueError, ['[-5]']),
    'bool token ids': ([1, True, 3], OK, TypeError, ['token id 1', 'bool']),
    'float token ids': ([1, 2.5], OK, TypeError, ['token id 1', 'float', '2.5']),
    'float numpy token ids': (np.array([1.0, 2.0]), OK, TypeError, ['token id 0', 'float']),
    'lone surrogate (issue 12, point 2)': ('ab\ud800cd', OK, ValueError, ['not valid Unicode', "'\\ud800'",
                                                                          'character 2']),
    'chat message without a role': ([{'content': 'hi'}], OK, ValueError, ['chat message 0', "'role'"]),
    'chat message with numeric content': ([{'role': 'user', 'content': 5}], OK, TypeError,
                                          ['chat message 0', 'content', 'int']),
    'chat message with a surrogate': ([{'role': 'user', 'content': 'x\udcff'}], OK, ValueError,
                                      ['chat message 0', 'not valid Unicode']),
    'a float as the prompt': (3.5, OK, TypeError, ['a prompt must be', 'float']),
    'a bare dict as the prompt': ({'role': 'user', 'content': 'hi'}, OK, TypeError, ['a prompt must be', 'dict']),
    'nested lists as one prompt': ([[1, 2], [3]], OK, TypeError, ['a prompt must be', 'list']),
    '2-D array as one prompt': (np.ones((2, 3), dtype=np.int64), OK, TypeError, ['1-D', '2 dimensions']),
}


def _refusal(pipe, prompt, gen):
    """The exception the submit-time checks raise for this request (the batch call turns it into a Response)."""
    try:
        ids = pipe._encode(prompt, do_preprocess=True)
        pipe.engine.check_prompt(ids)
        pipe.engine.sampling_params(gen)
    except (TypeError, ValueError) as e:
        return e
    return None


@pytest.mark.parametrize('case', list(BAD_REQUESTS))
def test_a_bad_request_in_a_batch_fails_alone(case, pipe, good, clean, nothing_lost, unharmed):
    prompt, gen, error_type, words = BAD_REQUESTS[case]
    prompts, ok = good
    raised = _refusal(pipe, prompt, gen)
    assert type(raised) is error_type, f'{case}: the check raised {raised!r}'

    out = pipe(prompts[:1] + [prompt] + prompts[1:], [ok, gen, ok, ok])
    assert len(out) == 4 and [r.index for r in out] == [0, 1, 2, 3]
    bad = out[1]
    assert bad.finish_reason == 'error' and bad.token_ids == [] and bad.text == ''
    assert bad.error == str(raised)
    for word in words:
        assert word in bad.error, f'{case}: {word!r} not in {bad.error!r}'
    unharmed(out[:1] + out[2:], clean)
    nothing_lost(pipe)


def test_a_bad_request_alone_is_one_error_response(pipe, nothing_lost):
    bad = pipe([1, 9999], OK)
    assert bad.finish_reason == 'error' and '[9999]' in bad.error
    nothing_lost(pipe)


def test_numpy_and_tensor_prompts_are_token_ids(pipe, good, clean, unharmed, nothing_lost):
    import torch
    prompts, ok = good
    as_numpy = np.array(prompts[0], dtype=np.int32)
    as_tensor = torch.tensor(prompts[2])
    out = pipe([as_numpy, prompts[1], as_tensor], ok)
    unharmed(out, clean)
    assert pipe(np.array([prompts[0], prompts[0]]), ok)[1].token_ids == clean[0].token_ids
    nothing_lost(pipe)


# -- failures inside a step: only the request behind it fails -----------------------------------------------------

def test_a_model_failure_in_prefill_fails_only_its_request(pipe, good, clean, unharmed, nothing_lost, monkeypatch):
    model = pipe.engine.agent.model
    forward = model.forward

    def poisoned(input_ids, *args, **kwargs):
        if (input_ids == 444).any():
            raise RuntimeError('poisoned forward: token 444')
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, 'forward', poisoned)
    prompts, ok = good
    out = pipe(prompts[:2] + [[1, 444, 9]] + prompts[2:], ok)
    assert out[2].finish_reason == 'error'
    assert 'RuntimeError: poisoned forward: token 444' in out[2].error
    unharmed(out[:2] + out[3:], clean)
    nothing_lost(pipe)


def test_a_sampler_failure_mid_decode_fails_only_its_request(pipe, good, clean, unharmed, nothing_lost,
                                                             monkeypatch):
    sampler = pipe.engine.sampler
    prepare = sampler.prepare

    def poisoned(seqs, ahead=0):
        if any(s.params.seed == 4242 and s.num_generated + ahead >= 2 for s in seqs):
            raise IndexError('poisoned sampler: seed 4242')
        return prepare(seqs, ahead)

    monkeypatch.setattr(sampler, 'prepare', poisoned)
    prompts, ok = good
    bad = GenerationConfig(max_new_tokens=6, ignore_eos=True, random_seed=4242)
    out = pipe([prompts[0], [1, 50, 51], prompts[1], prompts[2]], [ok, bad, ok, ok])
    assert out[1].finish_reason == 'error' and 'IndexError: poisoned sampler: seed 4242' in out[1].error
    assert out[1].token_ids == clean_tokens_of(pipe, [1, 50, 51])[:2], 'the tokens drawn before the failure'
    unharmed([out[0]] + out[2:], clean)
    nothing_lost(pipe)


def clean_tokens_of(pipe, prompt):
    return pipe(prompt, OK).token_ids


def test_a_failure_that_does_not_repeat_fails_that_steps_requests_only(pipe, good, clean, unharmed, nothing_lost,
                                                                        monkeypatch):
    """When re-running parts of the step no longer fails, no one can be blamed: that step's requests fail, the
    others (here: later ones) run on."""
    sampler = pipe.engine.sampler
    prepare = sampler.prepare
    calls = {'n': 0}

    def once(seqs, ahead=0):
        calls['n'] += 1
        if calls['n'] == 1:
            raise RuntimeError('a one-off failure')
        return prepare(seqs, ahead)

    monkeypatch.setattr(sampler, 'prepare', once)
    prompts, ok = good
    first = pipe(prompts, ok)
    assert [r.finish_reason for r in first] == ['error'] * 3
    assert all('RuntimeError: a one-off failure' in r.error for r in first)
    unharmed(pipe(prompts, ok), clean)
    nothing_lost(pipe)


def test_a_failing_detokeniser_fails_only_its_request(pipe, good, clean, unharmed, nothing_lost, monkeypatch):
    from lmdp import tokenizer as tok
    push = tok.TextStream.push

    def poisoned(self, token_ids):
        if 'STOP-HERE' in self.stop_words:
            raise UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'poisoned detokeniser')
        return push(self, token_ids)

    monkeypatch.setattr(tok.TextStream, 'push', poisoned)
    prompts, ok = good
    bad = GenerationConfig(max_new_tokens=6, ignore_eos=True, stop_words=['STOP-HERE'])
    out = pipe(prompts + [[1, 60, 61]], [ok, ok, ok, bad])
    assert out[3].finish_reason == 'error' and 'poisoned detokeniser' in out[3].error
    unharmed(out[:3], clean)
    nothing_lost(pipe)


def test_a_stream_with_a_bad_request_yields_its_error_and_the_rest(pipe, good, clean, nothing_lost):
    prompts, ok = good
    pieces = list(pipe.stream_infer(prompts + [[1, 9999]], ok))
    errors = [p for p in pieces if p.finish_reason == 'error']
    assert len(errors) == 1 and errors[0].index == 3 and '[9999]' in errors[0].error
    for i, c in enumerate(clean):
        assert [t for p in pieces if p.index == i for t in p.token_ids] == c.token_ids
    nothing_lost(pipe)


# -- calls that are wrong as a whole raise before anything runs ---------------------------------------------------

CALL_ERRORS = {
    'gen_config as a dict': (lambda p, ps: p(ps, {'max_new_tokens': 4}), TypeError,
                             ['gen_config must be a GenerationConfig', 'GenerationConfig(**your_dict)']),
    'a dict among the gen_configs': (lambda p, ps: p(ps, [OK, {'top_k': 3}, OK]), TypeError,
                                     ['gen_config[1]', 'dict']),
    'fewer gen_configs than prompts': (lambda p, ps: p(ps, [OK, OK]), ValueError,
                                       ['2 generation configs for 3 prompts']),
    'no prompts': (lambda p, ps: p([], OK), ValueError, ['no prompts given']),
    'an int as the prompts': (lambda p, ps: p(42, OK), TypeError, ['prompts must be', 'int']),
    'get_logits of bool ids': (lambda p, ps: p.get_logits([[1, True]]), TypeError, ['input_ids[0]', 'bool']),
    'get_ppl of float ids': (lambda p, ps: p.get_ppl([1, 2.5]), TypeError, ['token id 1', 'float']),
}


@pytest.mark.parametrize('case', list(CALL_ERRORS))
def test_a_wrong_call_raises_before_anything_runs(case, pipe, good, nothing_lost):
    call, error_type, words = CALL_ERRORS[case]
    prompts, _ = good
    steps = pipe.engine.stats.prefill_steps
    with pytest.raises(error_type) as info:
        call(pipe, prompts)
    for word in words:
        assert word in str(info.value), f'{word!r} not in {info.value}'
    assert pipe.engine.stats.prefill_steps == steps, 'a wrong call ran a step'
    nothing_lost(pipe)


def test_a_closed_pipeline_says_so(tiny, make_pipe, good):
    import asyncio

    from lmdp.errors import PipelineClosedError
    prompts, ok = good
    with make_pipe(tiny, num_gpu_blocks=16) as closing:
        closing(prompts[0], ok)
    uses = [lambda: closing(prompts[0], ok), lambda: list(closing.stream_infer(prompts, ok)),
            lambda: closing.get_ppl([1, 2, 3]),
            lambda: asyncio.run(closing.generate(prompts[0], ok).__anext__())]
    for use in uses:
        with pytest.raises(PipelineClosedError, match='this pipeline was closed'):
            use()
    closing.close()                     # closing twice is harmless


def test_a_backend_config_that_is_no_config(tiny):
    from lmdp import pipeline
    with pytest.raises(TypeError, match='backend_config must be a PytorchEngineConfig, got dict'):
        pipeline(tiny, backend_config={'device_type': 'cpu'})


def test_a_neighbours_min_new_tokens_masks_nothing_of_mine():
    """A row without stop ids shares the batch with one that masks its stop ids until min_new_tokens: the padding
    of the stop-id table (id 0) must not be masked in the first row (it was: the row could never draw token 0)."""
    import torch

    from lmdp.engine.sampler import Sampler
    from lmdp.engine.sequence import SamplingParams, Sequence
    mine = Sequence(0, [1, 2, 3], 3, SamplingParams(max_new_tokens=4, min_new_tokens=2))
    other = Sequence(1, [1, 2, 3], 3, SamplingParams(max_new_tokens=4, min_new_tokens=2, stop_ids=frozenset({5})))
    logits = torch.full((2, 16), -1.0)
    logits[:, 0] = 3.0                     # token 0: my best, and the other row's best once its stop id 5 is masked
    logits[1, 5] = 4.0
    sampler = Sampler(16, 'cpu')
    tokens, _ = sampler(logits, sampler.prepare([mine, other]))
    assert tokens.tolist() == [0, 0]
