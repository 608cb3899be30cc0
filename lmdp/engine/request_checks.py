"""What a request may be, checked against the model before it is queued: its prompt and its settings.

Everything a step would trip over is refused here, with a TypeError or ValueError that names the field, so that a
bad request never reaches a step (where it could only fail the step, and the engine would have to find it).
"""
import random
from collections.abc import Sequence as Seq

from ..messages import GenerationConfig
from .sequence import SamplingParams


def sampling_params(gen_config: GenerationConfig, vocab_size: int, eos_token_ids: Seq[int] = ()) -> SamplingParams:
    """Check a GenerationConfig in full against the vocabulary and resolve it: stop ids merged with the eos ids
    (unless ignore_eos; eos ids outside the vocabulary, which can never be drawn, left out), a seed drawn for
    requests that give none."""
    if not isinstance(gen_config, GenerationConfig):
        raise TypeError(f'gen_config must be a GenerationConfig, got {type(gen_config).__name__}')
    g = gen_config.validate()          # a list field may have been changed in place since it was set
    bad = [t for t in g.stop_token_ids or () if t >= vocab_size]
    if bad:
        raise ValueError(f'stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size}) of this model')
    stop_ids = set(g.stop_token_ids or ())
    if not g.ignore_eos:
        stop_ids.update(t for t in eos_token_ids if 0 <= t < vocab_size)
    seed = g.random_seed if g.random_seed is not None else random.getrandbits(63)
    return SamplingParams(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens or 0,
                          greedy=g.is_greedy, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                          min_p=g.min_p, repetition_penalty=g.repetition_penalty, seed=seed,
                          stop_ids=frozenset(stop_ids), logprobs=g.logprobs or 0)


def check_prompt(token_ids: Seq[int], session_len: int, vocab_size: int):
    """Raise ValueError (TypeError for ids that are not ints), saying why, for a prompt no step could run."""
    if len(token_ids) == 0:
        raise ValueError('the prompt is empty; give at least one token')
    if len(token_ids) >= session_len:
        raise ValueError(f'the prompt has {len(token_ids)} tokens but session_len is {session_len}, which must hold '
                         'the prompt and at least one new token; shorten the prompt or raise session_len')
    not_int = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool)]
    if not_int:
        raise TypeError(f'token ids must be ints, got {type(not_int[0]).__name__} {not_int[0]!r}')
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f'token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})')


def check_params(params: SamplingParams, vocab_size: int):
    """Raise for resolved settings a step can't run with (SamplingParams built by hand skip `sampling_params`)."""
    bad = [t for t in params.stop_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f'stop ids {bad[:5]} are outside the vocabulary [0, {vocab_size}) of this model')
    if not isinstance(params.seed, int) or isinstance(params.seed, bool):
        raise TypeError(f'the seed must be an int, got {type(params.seed).__name__} {params.seed!r}')
