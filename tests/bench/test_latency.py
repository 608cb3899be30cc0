"""The 256-request run's latency figures: TTFT and ITL from token arrival times (lmdp.bench.latency)."""
import numpy as np
import pytest

from lmdp.bench import latency
from lmdp.bench.__main__ import table

pytest.importorskip('hypothesis', reason='the property tests need hypothesis (the [test] extra)')
from hypothesis import given, strategies as st  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


# per request: (delay before its first piece, [(gap to the next piece, tokens it brings), ...]); a piece may bring
# 0 tokens (a text-only piece) or several
requests = st.lists(st.tuples(st.integers(1, 500), st.lists(st.tuples(st.integers(0, 50), st.integers(0, 3)),
                                                               max_size=8)), min_size=1, max_size=6)


@given(requests)
def test_ttft_and_itl_follow_the_arrivals_of_pieces_that_bring_tokens(reqs):
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency.time, 'perf_counter', clock)
        _check_clock(clock, reqs)


def _check_clock(clock, reqs):
    tc = latency.TokenClock()
    # the pieces of all requests, interleaved by arrival time as a stream delivers them
    events, ttft, gaps, total = [], [], [], 0
    for index, (first, pieces) in enumerate(reqs):
        t, count, last = first, 1, first
        events.append((t, index, count))
        ttft.append(first)
        for gap, n in pieces:
            t += gap
            count += n
            events.append((t, index, count))
            if n:
                gaps.append(t - last)
                last = t
        total += count
    for t, index, count in sorted(events):
        clock.now = 100.0 + t / 1e3            # milliseconds after the start
        tc.seen(index, count)
    figures = tc.figures()
    assert tc.tokens == total
    assert figures['tp_ttft_p50_ms'] == pytest.approx(np.percentile(ttft, 50), abs=0.01)
    assert figures['tp_ttft_p99_ms'] == pytest.approx(np.percentile(ttft, 99), abs=0.01)
    if gaps:
        assert figures['tp_itl_p50_ms'] == pytest.approx(np.percentile(gaps, 50), abs=0.01)
        assert figures['tp_itl_p99_ms'] == pytest.approx(np.percentile(gaps, 99), abs=0.01)
    else:
        assert 'tp_itl_p50_ms' not in figures


def test_no_token_at_all_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match='no request produced a token'):
        latency.latency_figures(0.0, [[], []])


def test_streamed_run_on_a_tiny_pipeline(tiny_llama):
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    from lmdp.bench.measure import streamed_run
    pipe = pipeline(tiny_llama, backend_config=PytorchEngineConfig(device_type='cpu', dtype='float32'))
    prompts = [[1] + [7 + (i * 13 + j) % 300 for j in range(3 + 5 * i)] for i in range(6)]
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (1, 5, 9, 2, 7, 3)]
    figures = streamed_run(pipe.stream_infer, prompts, gens)
    assert figures['tp_stream_out_tokens'] == 27
    # the wall time is rounded to 10 ms, so the rate times it is 27 only within the rate times 5 ms
    assert figures['tp_stream_out_tok_s'] * figures['tp_stream_wall_s'] == pytest.approx(
        27, abs=figures['tp_stream_out_tok_s'] * 0.005 + 0.1)
    assert 0 < figures['tp_ttft_p50_ms'] <= figures['tp_ttft_p99_ms'] <= 1e3 * figures['tp_stream_wall_s']
    assert 0 < figures['tp_itl_p50_ms'] <= figures['tp_itl_p99_ms']


def test_the_table_puts_each_policy_under_the_columns():
    f = dict(bs1_decode_tok_s=1.0, roofline_tok_s=2.0, bs1_roofline_fraction=0.5, tp_out_tok_s=1234.5,
             tp_ttft_p50_ms=11.0, tp_ttft_p99_ms=22.0, tp_itl_p50_ms=3.5, tp_itl_p99_ms=44.25)
    f['tp_by_mixed_prefill'] = {'on': dict(f), 'off': dict(f, tp_out_tok_s=999.5, tp_itl_p99_ms=777.0)}
    lines = table({'device': 'X', 'copy_bandwidth_TBps': 1.0, 'shapes': {'1b': f}}).splitlines()
    header, row, on, off = lines[1], lines[2], lines[3], lines[4]
    end = header.index('256-req out tok/s') + len('256-req out tok/s')
    assert row[:end].endswith('1234.5') and on[:end].endswith('1234.5') and off[:end].endswith('999.5')
    end = header.index('ITL p99') + len('ITL p99')
    assert row[:end].endswith('44.2') and off[:end].endswith('777.0')
