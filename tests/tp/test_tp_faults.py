"""A rank that dies or hangs mid-generation: the caller gets a clear error naming it, in bounded time, and no rank
process is left running."""
import os
import signal
import time

import pytest
from tp_helpers import alive, make_pipe, random_prompts

from lmdp import GenerationConfig
from lmdp.errors import PipelineClosedError, TensorParallelError


def _generate_until_broken(pipe, victim_pid, sig):
    """Stream a long generation, send `sig` to the victim after the first tokens; (error, seconds from the
    signal to the error)."""
    prompts = random_prompts(4, 5, 20, seed=3)
    sent = None
    with pytest.raises(TensorParallelError) as caught:
        for _ in pipe.stream_infer(prompts, GenerationConfig(max_new_tokens=400, ignore_eos=True)):
            if sent is None:
                os.kill(victim_pid, sig)
                sent = time.monotonic()
    assert sent is not None, 'the generation ended before the rank was signalled'
    return caught.value, time.monotonic() - sent


def test_killing_a_rank_mid_generation_is_a_clear_error_and_ends_every_rank(tiny_llama2):
    pipe = make_pipe(tiny_llama2, tp=2)
    worker = pipe.engine.ranks.procs[1]
    error, seconds = _generate_until_broken(pipe, worker.pid, signal.SIGKILL)
    assert seconds < 30
    message = str(error)
    assert f'rank 1 (pid {worker.pid})' in message and 'SIGKILL' in message, message
    assert not alive(worker.pid)
    # the pipeline says why it can't go on, instead of hanging on a group that is gone
    with pytest.raises(PipelineClosedError, match='rank 1'):
        pipe(['hello'], GenerationConfig(max_new_tokens=2))
    pipe.close()


@pytest.mark.parametrize('when', ['idle', 'mid-generation'])
def test_a_rank_that_hangs_is_named_within_the_step_timeout(tiny_llama2, monkeypatch, when):
    """SIGSTOP: the rank neither answers nor dies. Stopped while idle, it blocks rank 0's very first send (gloo's
    send waits for the receiver); stopped mid-generation, a collective inside the step."""
    monkeypatch.setenv('LMDP_TP_TIMEOUT', '4')
    pipe = make_pipe(tiny_llama2, tp=2)
    worker = pipe.engine.ranks.procs[1]
    try:
        if when == 'idle':
            os.kill(worker.pid, signal.SIGSTOP)
            sent = time.monotonic()
            with pytest.raises(TensorParallelError) as caught:
                pipe([[1, 5, 6]], GenerationConfig(max_new_tokens=3))
            error, seconds = caught.value, time.monotonic() - sent
        else:
            error, seconds = _generate_until_broken(pipe, worker.pid, signal.SIGSTOP)
    finally:
        left_running = alive(worker.pid)     # the engine must have ended it; the kill only cleans up after a bug
        if left_running:
            os.kill(worker.pid, signal.SIGKILL)
        pipe.close()
    assert not left_running
    assert seconds < 30
    assert f'rank 1 (pid {worker.pid})' in str(error) and 'step' in str(error), str(error)
