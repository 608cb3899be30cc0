"""When a request stops: stop ids, stop words, max/min new tokens, eos and ignore_eos."""
import pytest

from lmdp import GenerationConfig

PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope='module')
def reference(pipe):
    """The greedy continuation of PROMPT with nothing to stop it."""
    return pipe(PROMPT, GenerationConfig(max_new_tokens=24, ignore_eos=True))


def _first_new(tokens, start):
    """An index >= start whose token has not appeared before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ids(pipe, reference):
    ref = reference.token_ids
    i = _first_new(ref, 3)
    out = pipe(PROMPT, GenerationConfig(max_new_tokens=24, stop_token_ids=[ref[i]], ignore_eos=True))
    assert out.finish_reason == 'stop' and out.token_ids == ref[:i]
    kept = pipe(PROMPT, GenerationConfig(max_new_tokens=24, stop_token_ids=[ref[i]], ignore_eos=True,
                                         include_stop_str_in_output=True))
    assert kept.token_ids == ref[:i + 1]


def test_stop_words_cut_the_text(pipe, reference):
    text = reference.text
    word = text[len(text) // 2:len(text) // 2 + 3]
    assert word.strip() and word not in text[:len(text) // 2]
    for stream in (False, True):
        gen = GenerationConfig(max_new_tokens=24, stop_words=[word], ignore_eos=True)
        if stream:
            pieces = list(pipe.stream_infer([PROMPT], gen))
            out_text, reason = ''.join(p.text for p in pieces), pieces[-1].finish_reason
            tokens = [t for p in pieces for t in p.token_ids]
        else:
            out = pipe(PROMPT, gen)
            out_text, reason, tokens = out.text, out.finish_reason, out.token_ids
        assert reason == 'stop' and out_text == text[:text.index(word)]
        assert tokens == reference.token_ids[:len(tokens)] and len(tokens) < 24
    kept = pipe(PROMPT, GenerationConfig(max_new_tokens=24, stop_words=[word], ignore_eos=True,
                                         include_stop_str_in_output=True))
    assert kept.text == text[:text.index(word) + len(word)]


def test_max_new_tokens(pipe, reference):
    for n in (0, 1, 5):
        out = pipe(PROMPT, GenerationConfig(max_new_tokens=n, ignore_eos=True))
        assert out.finish_reason == 'length' and out.token_ids == reference.token_ids[:n]


def test_min_new_tokens_keeps_stop_ids_from_being_drawn(pipe, reference):
    ref = reference.token_ids
    # make the first greedy token a stop id: without min_new_tokens the request ends at once
    early = pipe(PROMPT, GenerationConfig(max_new_tokens=8, stop_token_ids=[ref[0]], ignore_eos=True))
    assert early.finish_reason == 'stop' and early.token_ids == []
    held = pipe(PROMPT, GenerationConfig(max_new_tokens=8, stop_token_ids=[ref[0]], min_new_tokens=3,
                                         ignore_eos=True))
    assert ref[0] not in held.token_ids[:3] and len(held.token_ids) >= 3
    logits = pipe.get_logits(PROMPT)[0][-1]
    assert held.token_ids[0] == logits.topk(2).indices[1].item()    # the runner-up at the first position


def test_eos_stops_unless_ignore_eos(tmp_path, make_pipe, reference):
    from lmdp.tiny import make_tiny
    ref = reference.token_ids
    i = _first_new(ref, 4)
    # the same weights (same seed), with a token the greedy run produces as the checkpoint's eos
    path = str(make_tiny('llama', tmp_path / 'eos', num_hidden_layers=2, eos_token_id=ref[i]))
    pipe = make_pipe(path)
    out = pipe(PROMPT, GenerationConfig(max_new_tokens=24))
    assert out.finish_reason == 'stop' and out.token_ids == ref[:i]
    assert pipe(PROMPT, GenerationConfig(max_new_tokens=24, ignore_eos=True)).token_ids == ref


def test_session_len_ends_a_request(tiny2, make_pipe, reference):
    pipe = make_pipe(tiny2, session_len=len(PROMPT) + 5)
    out = pipe(PROMPT, GenerationConfig(max_new_tokens=24, ignore_eos=True))
    assert out.finish_reason == 'length' and out.token_ids == reference.token_ids[:5]
