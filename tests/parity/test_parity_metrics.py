"""Metrics, the noise-floor rule, prompts and the progress bar."""
import json
import math
import re
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from parity.metrics import Metrics, diff
from parity.noise_floor import (
    EPS,
    GAIN,
    KL_EPS,
    MULTIPLE,
    SIGMAS,
    gain_tolerance,
    judge,
    kl_bound,
    noise_margin,
    rule_text,
    tolerance,
)
from parity.progress import Progress
from parity.prompts import make_prompts, random_prompts


def test_diff_locates_the_largest_error_by_sequence_token_and_channel():
    ref = [torch.ones(3, 4), torch.ones(2, 4)]
    port = [r.clone() for r in ref]
    port[1][1, 2] += 0.5                      # sequence 1, its second row, channel 2
    m = diff(port, ref, starts=[7, 10])       # decode: rows start at the prompt lengths
    assert m.where == (1, 11, 2)
    assert m.max_abs == pytest.approx(0.5)
    assert m.rel_l2 == pytest.approx(0.5 / torch.ones(5, 4).norm().item())
    assert m.rel_l2_per_seq[0] == 0.0 and m.rel_l2_per_seq[1] > 0
    assert m.cosine < 1.0


def test_diff_of_equal_tensors_is_zero_and_zero_rows_have_cosine_one():
    ref = [torch.zeros(2, 3), torch.randn(4, 3)]
    m = diff([r.clone() for r in ref], ref, starts=[0, 0])
    assert (m.max_abs, m.rel_l2) == (0.0, 0.0)
    assert m.cosine == pytest.approx(1.0, abs=1e-12)


def test_diff_flags_nan_and_shape_mismatch():
    ref = [torch.ones(2, 3)]
    port = [torch.full((2, 3), float('nan'))]
    assert not diff(port, ref, [0]).rel_l2 <= 1.0
    with pytest.raises(ValueError, match='shape'):
        diff([torch.ones(2, 4)], ref, [0])


def test_tolerance_is_a_multiple_of_the_floor_plus_eps():
    bf16, f32 = torch.bfloat16, torch.float32
    assert tolerance(f32, None) == EPS[f32] < 1e-7          # float32 is judged against its own floor, not 1e-5
    assert tolerance(bf16, 0.01) == pytest.approx(MULTIPLE[bf16] * 0.01 + EPS[bf16])
    assert tolerance(bf16, 0.0) < tolerance(bf16, 0.001)
    assert kl_bound(bf16, 1e-3) == pytest.approx(MULTIPLE[bf16]**2 * 1e-3 + 1e-4)


def test_noise_margin_grows_with_the_floor():
    row = torch.tensor([3.0, 1.0, -2.0])
    f32, bf16 = torch.float32, torch.bfloat16
    assert noise_margin(f32, row, None) == pytest.approx(3 * EPS[f32])
    assert noise_margin(bf16, row, row + 0.1) == pytest.approx(MULTIPLE[bf16] * 0.1 + 3 * EPS[bf16], rel=1e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), delta=st.floats(-0.05, 0.05), noise=st.floats(0.0, 0.02),
       rows=st.integers(1, 40), cols=st.integers(4, 96))
def test_gain_reads_a_planted_scale_through_noise(seed, delta, noise, rows, cols):
    """A port (1 + delta) times the truth, plus independent noise: the gain is delta, within its standard error."""
    truth = torch.randn(rows, cols, generator=_gen(seed), dtype=torch.float64)
    port = truth * (1 + delta) + noise * torch.randn(rows, cols, generator=_gen(seed + 1), dtype=torch.float64)
    m = diff([port], [truth], [0])
    assert abs(m.gain - delta) <= 6 * m.gain_se + 1e-12
    assert m.gain_se <= 3 * noise / (rows * cols) ** 0.5 + 1e-12


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       delta=st.sampled_from([0.0, 5e-3, -5e-3]))
def test_rounding_alone_passes_and_a_half_percent_scale_fails(seed, dtype, delta):
    """The rule on one tap: a port that rounds like the floor passes; the same port 0.5% too large fails on its
    scale, whatever the noise around it."""
    truth = [torch.randn(64, 256, generator=_gen(seed), dtype=torch.float64)]
    floor = [(truth[0].float() * 1.0).to(dtype).double()]
    jitter = 1 + 2.0**-12 * torch.randn(64, 256, generator=_gen(seed + 7), dtype=torch.float64)
    port = [((truth[0] * jitter * (1 + delta)).float()).to(dtype).double()]   # rounds elsewhere, like a kernel
    result = judge(dtype, diff(port, truth, [0]), diff(floor, truth, [0]), phase='prefill', tap='t', kind='t',
                   layer=None)
    assert result.passed == (delta == 0.0), result.describe()
    if delta:
        assert abs(result.port.gain - delta) < GAIN[dtype]
        # in bfloat16 the error itself hides in the rounding noise: the scale is what gives it away
        assert result.failed_rule == ('gain' if dtype == torch.bfloat16 else 'error')


def test_random_prompts_have_different_lengths_and_are_seeded():
    prompts = random_prompts(4, 100, seed=3)
    assert len({len(p) for p in prompts}) == 4
    assert prompts == random_prompts(4, 100, seed=3) != random_prompts(4, 100, seed=4)
    assert all(0 <= t < 100 for p in prompts for t in p)


def test_prompts_from_files(tmp_path, tiny_llama):
    ids = tmp_path / 'ids.txt'
    ids.write_text('1 2 3\n\n4, 5\n')
    assert make_prompts(str(ids), 100, tiny_llama) == [[1, 2, 3], [4, 5]]
    as_json = tmp_path / 'p.json'
    as_json.write_text(json.dumps([[7, 8], 'hello world']))
    prompts = make_prompts(str(as_json), 1000, tiny_llama)   # text goes through the checkpoint's tokenizer
    assert prompts[0] == [7, 8] and len(prompts[1]) > 1
    assert make_prompts('2', 100, tiny_llama) == random_prompts(2, 100)
    with pytest.raises(ValueError, match='outside the vocabulary'):
        make_prompts([[5, 500]], 100, tiny_llama)


def test_progress_without_tqdm_is_silent(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'tqdm.auto', None)    # makes `from tqdm.auto import tqdm` fail
    bar = Progress(3, enabled=True)
    bar.stage('x')
    bar.update(2)
    bar.close()
    assert capsys.readouterr() == ('', '')


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), channels=st.integers(8, 64))
def test_a_fixed_error_per_channel_widens_the_scale_band_instead_of_reading_as_a_scale(seed, channels):
    """A weight rounded once (a folded norm gain in bfloat16) gives every token of a channel the same relative
    error: the gain's standard error must count channels, not elements, or a correct port reads as 'scaled'."""
    truth = torch.randn(200, channels, generator=_gen(seed), dtype=torch.float64)
    per_channel = 2.0**-9 * torch.empty(channels, dtype=torch.float64).uniform_(-1, 1, generator=_gen(seed + 1))
    m = diff([truth * (1 + per_channel)], [truth], [0])
    # the per-element estimate would be ~sqrt(200) times smaller; the gain stays within 5 of the widened errors
    assert abs(m.gain) <= 5 * m.gain_se
    assert m.gain_se >= 0.2 * per_channel.std().item() / channels ** 0.5


def test_diff_names_the_sequence_and_position_whatever_the_layout():
    """The largest error in the first, a middle or the last sequence, at a sequence's first row, with more
    channels than rows, and with one channel."""
    sizes, starts = [3, 2, 4], [10, 20, 30]
    for seq, row in ((0, 2), (1, 0), (2, 0), (2, 3)):
        for channels in (5, 1):
            ref = [torch.ones(n, channels) for n in sizes]
            port = [r.clone() for r in ref]
            port[seq][row, channels - 1] += 0.5
            assert diff(port, ref, starts).where == (seq, starts[seq] + row, channels - 1), (seq, row, channels)


def test_diff_of_empty_taps_is_zero_with_cosine_one():
    for sizes in ([0], [0, 0, 0]):
        m = diff([torch.zeros(n, 4) for n in sizes], [torch.zeros(n, 4) for n in sizes], [7] * len(sizes))
        assert (m.max_abs, m.rel_l2, m.cosine, m.gain, m.gain_se) == (0.0, 0.0, 1.0, 0.0, 0.0)
        assert m.where == (len(sizes) - 1, 7, 0)


def test_diff_against_a_zero_reference():
    """Any error over a zero reference is infinitely large relatively, none is zero; no scale can be read."""
    zero = [torch.zeros(2, 3)]
    m = diff([torch.ones(2, 3)], zero, [0])
    assert (m.rel_l2, m.rel_l2_per_seq, m.gain, m.gain_se) == (math.inf, [math.inf], 0.0, 0.0)
    assert diff([torch.zeros(2, 3)], zero, [0]).rel_l2_per_seq == [0.0]


def test_cosine_is_per_token_exact_for_tiny_rows_and_zero_for_a_dropped_row():
    tiny = [1e-10 * torch.randn(3, 8, generator=_gen(0), dtype=torch.float64)]     # norms far below 1e-8
    assert diff([tiny[0].clone()], tiny, [0]).cosine == pytest.approx(1.0, abs=1e-12)
    ref = [torch.randn(3, 8, generator=_gen(1))]
    port = [ref[0].clone()]
    port[0][1] = 0.0                     # the port zeroed one token: its cosine is 0, not 1 as for two zero rows
    assert diff(port, ref, [0]).cosine == pytest.approx(0.0, abs=1e-12)


def test_a_unit_reference_reads_its_gain():
    m = diff([torch.tensor([[2.0]])], [torch.tensor([[1.0]])], [0])
    assert (m.gain, m.gain_se) == (1.0, 0.0)


def _gain_reference(d, b):
    """The gain and the largest of the three sandwich standard errors, by plain loops over Python floats."""
    d, b = d.tolist(), b.tolist()
    tokens, channels = len(b), len(b[0])
    bb = sum(x * x for row in b for x in row)
    g = sum(x * y for rd, rb in zip(d, b) for x, y in zip(rd, rb)) / bb
    w = [[b[t][c] * (d[t][c] - g * b[t][c]) for c in range(channels)] for t in range(tokens)]
    per_element = sum(x * x for row in w for x in row)
    per_channel = sum(sum(w[t][c] for t in range(tokens)) ** 2 for c in range(channels))
    per_token = sum(sum(row) ** 2 for row in w)
    return g, math.sqrt(max(per_element, per_channel, per_token)) / bb


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 12), channels=st.integers(1, 12),
       shared=st.sampled_from(['element', 'token', 'channel']))
def test_the_gain_and_its_error_are_the_least_squares_scale_and_the_widest_sandwich(seed, tokens, channels, shared):
    """Errors independent per element, shared within a token or within a channel: each estimate in turn is the
    largest, and the gain's standard error is it."""
    b = torch.randn(tokens, channels, generator=_gen(seed), dtype=torch.float64)
    shape = {'element': (tokens, channels), 'token': (tokens, 1), 'channel': (1, channels)}[shared]
    a = b * (1 + 1e-3 * torch.randn(shape, generator=_gen(seed + 1), dtype=torch.float64))
    m = diff([a], [b], [0])
    g, se = _gain_reference(a - b, b)
    assert m.gain == pytest.approx(g, rel=1e-9, abs=1e-15) and m.gain_se == pytest.approx(se, rel=1e-9, abs=1e-15)


def test_metrics_round_trip_through_a_dict_and_old_reports_load():
    m = Metrics(max_abs=0.5, where=(1, 7, 3), rel_l2=2e-3, cosine=0.99, rel_l2_per_seq=[1e-3, 3e-3], gain=4e-4,
                gain_se=1e-4)
    d = m.to_dict()
    assert d == {'max_abs': 0.5, 'where': (1, 7, 3), 'rel_l2': 2e-3, 'cosine': 0.99, 'rel_l2_per_seq': [1e-3, 3e-3],
                 'gain': 4e-4, 'gain_se': 1e-4}
    assert Metrics.from_dict(json.loads(json.dumps(d))) == m            # JSON turns `where` into a list
    old = {'max_abs': 0.5, 'where': [1, 7, 3], 'rel_l2': 2e-3, 'cosine': 0.99}    # before per-sequence errors, gain
    assert Metrics.from_dict(old) == Metrics(0.5, (1, 7, 3), 2e-3, 0.99, [], 0.0, 0.0)


def test_judge_passes_at_both_boundaries_and_fails_just_past_them():
    dt = torch.bfloat16
    floor = Metrics(0.0, (0, 0, 0), rel_l2=1e-3, cosine=1.0, gain=2e-3, gain_se=0.0)
    tol = tolerance(dt, floor.rel_l2)
    where = dict(phase='prefill', tap='t', kind='t', layer=None)

    def port(rel, gain):
        return Metrics(0.0, (0, 0, 0), rel_l2=rel, cosine=1.0, gain=gain, gain_se=0.0)

    at_edges = judge(dt, port(tol, floor.gain + GAIN[dt]), floor, **where)
    assert at_edges.passed and at_edges.failed_rule is None
    assert (at_edges.floor, at_edges.tolerance, at_edges.gain_tolerance) == (floor, tol, GAIN[dt])
    assert judge(dt, port(tol, floor.gain), floor, **where).passed          # the floor's own scale is no error
    over = judge(dt, port(tol * (1 + 1e-9), floor.gain), floor, **where)
    assert (over.passed, over.failed_rule) == (False, 'error')
    scaled = judge(dt, port(tol, floor.gain + GAIN[dt] * (1 + 1e-6)), floor, **where)
    assert (scaled.passed, scaled.failed_rule) == (False, 'gain')
    nan = judge(dt, port(math.nan, floor.gain), floor, **where)
    assert (nan.passed, nan.failed_rule) == (False, 'error')


def test_the_scale_band_widens_with_both_standard_errors():
    for dt in (torch.float32, torch.bfloat16):
        assert gain_tolerance(dt, 3e-4, 4e-4) == pytest.approx(GAIN[dt] + SIGMAS * 5e-4, rel=1e-12)
        assert gain_tolerance(dt, 0.0, 0.0) == GAIN[dt]
        assert kl_bound(dt, None) == kl_bound(dt, 0.0) == KL_EPS[dt]


@pytest.mark.parametrize('dtype,truth', [(torch.float32, 'float64'), (torch.bfloat16, 'float32'),
                                         (torch.float16, 'float32')])
def test_the_rule_line_states_the_constants_in_force(dtype, truth):
    m = re.fullmatch(r'a tap passes when, in the layer-local view, its relative L2 error against transformers (\w+) '
                     r'is <= (\S+) x floor \+ (\S+) and its scale error is within (\S+) \+ (\S+) standard errors of '
                     r"the floor's; floor = transformers (\w+) against transformers (\w+)", rule_text(dtype))
    assert m, rule_text(dtype)
    against, multiple, eps, gain, sigmas, name, truth_again = m.groups()
    assert (against, name, truth_again) == (truth, str(dtype).split('.')[-1], truth)
    assert [float(x) for x in (multiple, eps, gain, sigmas)] == pytest.approx(
        [MULTIPLE[dtype], EPS[dtype], GAIN[dtype], SIGMAS], rel=0.05)
