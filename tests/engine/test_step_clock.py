"""The engine's step clock: each step() call's wall time goes to the kind of step it finished, and the bench
reads where a run's time went from it."""
import time
from types import SimpleNamespace

import pytest

from lmdp.bench.measure import step_split


def test_each_step_call_is_timed_under_the_kind_it_finished(tiny_llama):
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    pipe = pipeline(tiny_llama, backend_config=PytorchEngineConfig(device_type='cpu', dtype='float32',
                                                                  max_prefill_token_num=16))
    engine = pipe.engine
    prompts = [[1] + [5 + (7 * i + j) % 200 for j in range(20 + 3 * i)] for i in range(4)]
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True, do_sample=False)
    engine.stats = type(engine.stats)()
    start = time.perf_counter()
    pipe(prompts, gen_config=gen, do_preprocess=False)
    wall = time.perf_counter() - start
    stats = engine.stats
    # four prompts of 20-29 tokens in chunks of 16 take several prefill steps; five tokens each are decoded
    assert stats.prefill_steps >= 6 and stats.decode_steps >= 5
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert stats.prefill_seconds + stats.decode_seconds <= wall

    # a step that only drains the inbox (nothing scheduled) finishes no step and adds no time
    before = (stats.prefill_seconds, stats.decode_seconds)
    engine.step()
    assert (stats.prefill_seconds, stats.decode_seconds) == before
    pipe.close()


def test_a_slow_decode_step_is_charged_to_decode(tiny_llama, monkeypatch):
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    pipe = pipeline(tiny_llama, backend_config=PytorchEngineConfig(device_type='cpu', dtype='float32'))
    engine = pipe.engine
    finish = engine._finish

    def slow_finish(launched, batch=None):
        b = launched.batch if launched is not None else batch
        if b.is_decoding:
            time.sleep(0.05)
        return finish(launched, batch)
    monkeypatch.setattr(engine, '_finish', slow_finish)
    engine.stats = type(engine.stats)()
    pipe([[1, 5, 6, 7]], gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True, do_sample=False),
         do_preprocess=False)
    stats = engine.stats
    assert stats.decode_steps == 3
    assert stats.decode_seconds >= 3 * 0.05
    assert stats.prefill_seconds < 0.05
    assert 0.05 <= stats.decode_max_seconds <= stats.decode_seconds
    assert stats.prefill_max_seconds == stats.prefill_seconds      # one prefill step
    pipe.close()


@pytest.mark.parametrize('mixed', [0, 2])
def test_step_split_reads_the_clock(mixed):
    stats = SimpleNamespace(prefill_steps=4, decode_steps=10, prefill_seconds=0.5, decode_seconds=2.0,
                            prefill_max_seconds=0.3, decode_max_seconds=0.25, decode_tokens=300, mixed_steps=mixed)
    out = step_split(stats)
    assert out['tp_prefill_steps'] == 4 and out['tp_decode_steps'] == 10
    assert out['tp_prefill_s'] == 0.5 and out['tp_decode_s'] == 2.0
    assert out['tp_prefill_step_ms'] == 125.0 and out['tp_decode_step_ms'] == 200.0
    assert out['tp_prefill_step_max_ms'] == 300.0 and out['tp_decode_step_max_ms'] == 250.0
    # with mixed steps the decode rows are not all in decode-only steps: no mean batch is claimed
    assert ('tp_decode_batch_mean' in out) == (not mixed)
    if not mixed:
        assert out['tp_decode_batch_mean'] == 30.0


def test_step_split_with_no_steps_of_a_kind():
    stats = SimpleNamespace(prefill_steps=1, decode_steps=0, prefill_seconds=0.25, decode_seconds=0.0,
                            prefill_max_seconds=0.25, decode_max_seconds=0.0, decode_tokens=0, mixed_steps=0)
    out = step_split(stats)
    assert out['tp_decode_steps'] == 0 and 'tp_decode_step_ms' not in out and 'tp_decode_batch_mean' not in out
    assert 'tp_decode_step_max_ms' not in out and out['tp_prefill_step_max_ms'] == 250.0
