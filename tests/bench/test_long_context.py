"""`lmdp bench`'s long-context figures: longctx.py's definitions, run here on the tiny model on the CPU."""
import pytest

from lmdp.bench import long_context
from lmdp.bench.__main__ import table


@pytest.fixture(scope='module')
def bench_tiny(tmp_path_factory):
    """The bench's tiny shape: its tokenizer makes each prompt word one token, as on the real shapes."""
    from lmdp.bench.checkpoint import ensure_checkpoint
    from lmdp.bench.shapes import SHAPES
    return ensure_checkpoint(SHAPES['tiny'], str(tmp_path_factory.mktemp('bench')))


def test_each_length_is_a_prompt_of_that_many_tokens_on_a_real_engine(bench_tiny, monkeypatch):
    import lmdp.api as api
    real_call, seen = api.Pipeline.__call__, []

    def spy(self, prompts, gen_config=None, **kw):
        out = real_call(self, prompts, gen_config=gen_config, **kw)
        seen.append((out[0].input_token_len, gen_config.max_new_tokens, out[0].generate_token_len))
        return out
    monkeypatch.setattr(api.Pipeline, '__call__', spy)
    figures = long_context.long_context_figures(bench_tiny, lengths=(40, 100), new_tokens=6, repeats=3,
                                                device_type='cpu', dtype='float32')
    assert sorted(figures) == [40, 100]
    # warm-up, then per length: `repeats` one-token requests and one of new_tokens + 1, each of n tokens
    assert [(n, g) for _, n, g in seen] == [(8, 8)] + [(1, 1)] * 3 + [(7, 7)] + [(1, 1)] * 3 + [(7, 7)]
    assert [p for p, _, _ in seen[1:]] == [40] * 4 + [100] * 4
    for n, f in figures.items():
        assert f['ttft_s'] > 0 and f['decode_tok_s_at_ctx'] > 0
        assert f['prefill_tok_s'] == pytest.approx(n / f['ttft_s'], rel=0.01, abs=1)


def test_a_refused_request_is_an_error_not_a_figure(bench_tiny):
    # a session too short for the prompt: the request is refused, which must not be timed as a fast one
    with pytest.raises(RuntimeError, match='a prompt of 60 words gave 0 of 8 tokens.*session_len'):
        long_context.long_context_figures(bench_tiny, lengths=(60, ), new_tokens=2, repeats=1, device_type='cpu',
                                          dtype='float32', session_len=32)


def test_the_figures_follow_the_definitions(monkeypatch):
    # a fake engine whose requests take 1 ms per prompt word and 10 ms per new token, the first of several
    # one-token requests 5 ms slower (a cold start)
    class FakeOut:
        def __init__(self, n, prompt_tokens):
            self.generate_token_len, self.input_token_len = n, prompt_tokens
            self.finish_reason, self.error = 'length', None

    class FakePipe:
        def __init__(self):
            self.closed = False
            self.cold = True

        def __call__(self, prompts, gen_config, do_preprocess):
            words = len(prompts[0].split())
            seconds = 1e-3 * words + 1e-2 * gen_config.max_new_tokens + (5e-3 if self.cold else 0)
            self.cold = gen_config.max_new_tokens != 1
            clock.now += seconds
            return [FakeOut(gen_config.max_new_tokens, words + 1)]

        def close(self):
            self.closed = True

    class Clock:
        now = 0.0
    clock = Clock()
    pipe = FakePipe()

    def fake_timed(fn):
        start = clock.now
        out = fn()
        return clock.now - start, out
    monkeypatch.setattr(long_context, '_timed', fake_timed)
    import lmdp
    monkeypatch.setattr(lmdp, 'pipeline', lambda path, backend_config: pipe)
    figures = long_context.long_context_figures('unused', lengths=(1000, 3000), new_tokens=50, repeats=2)
    assert pipe.closed
    for n in (1000, 3000):
        ttft = 1e-3 * n + 1e-2            # the warm one-token request, not the cold first one
        assert figures[n]['ttft_s'] == pytest.approx(ttft, abs=1e-3)
        assert figures[n]['prefill_tok_s'] == pytest.approx(n / ttft, rel=1e-3)
        assert figures[n]['decode_tok_s_at_ctx'] == pytest.approx(50 / (1e-2 * 51 - 1e-2), rel=1e-3)   # 100 tok/s


@pytest.mark.parametrize('bad', [dict(lengths=(0, 10)), dict(new_tokens=0), dict(repeats=0)])
def test_bad_settings_are_refused_before_an_engine_is_built(bad, monkeypatch):
    import lmdp
    monkeypatch.setattr(lmdp, 'pipeline', lambda *a, **k: pytest.fail('an engine was built'))
    with pytest.raises(ValueError, match='must be positive'):
        long_context.long_context_figures('unused', **bad)


def test_no_lengths_build_no_engine(monkeypatch):
    import lmdp
    monkeypatch.setattr(lmdp, 'pipeline', lambda *a, **k: pytest.fail('an engine was built'))
    assert long_context.long_context_figures('unused', lengths=()) == {}


def test_the_row_puts_lmdeploy_beside_lmdp_by_length():
    ours = {4096: dict(ttft_s=0.1, prefill_tok_s=40960, decode_tok_s_at_ctx=200.0),
            16384: dict(ttft_s=0.5, prefill_tok_s=32768, decode_tok_s_at_ctx=150.0)}
    theirs = {'4096': dict(ttft_s=0.12), '16384': dict(ttft_s=0.4)}     # as read back from JSON
    row = long_context.long_context_row('8b', ours, theirs)
    assert '4k TTFT 0.100 s, decode 200.0 tok/s (lmdeploy 0.120 s; lmdp 1.20x as fast)' in row
    assert '16k TTFT 0.500 s, decode 150.0 tok/s (lmdeploy 0.400 s; lmdp 0.80x as fast)' in row
    assert row.index('4k') < row.index('16k')
    assert 'lmdeploy' not in long_context.long_context_row('8b', ours)


def test_the_bench_table_shows_the_long_context_line():
    f = dict(bs1_decode_tok_s=1.0, roofline_tok_s=2.0, bs1_roofline_fraction=0.5,
             long_context={'32768': dict(ttft_s=1.5, prefill_tok_s=21845, decode_tok_s_at_ctx=90.0)})
    lines = table({'device': 'X', 'copy_bandwidth_TBps': 1.0, 'shapes': {'8b': f}}).splitlines()
    assert any(line.strip().startswith('8b long context: 32k TTFT 1.500 s, decode 90.0 tok/s') for line in lines)
