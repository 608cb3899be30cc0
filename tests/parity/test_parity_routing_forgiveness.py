"""parity/routing_checks.py on hand-made router logits and whole-model logits: which positions a router flip near a
tie forgives (its sequence, at or after it, prefill flips reaching decode), and that hard flips forgive nothing."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from parity.capture_set import CaptureSet
from parity.checks import greedy_check, logprob_checks
from parity.routing import compare_routing
from parity.routing_checks import RoutedPositions, phase_positions, routing_check

LENGTHS = [3, 5]          # two prompts: prefill rows 0-2 and 3-7
STEPS = 2                 # decode rows 0-1 (prompt 0, positions 3, 4) and 2-3 (prompt 1, positions 5, 6)


def _router(rows, flips, gap, experts=6, seed=0):
    """(reference, port, floor) router logits of one phase: at each row of `flips`, the port swaps the reference's
    2nd and 3rd experts, which the reference separates by `gap`; the floor is off by 0.05 everywhere."""
    ref = torch.randn(rows, experts, generator=torch.Generator().manual_seed(seed)) * 3
    port = ref.clone()
    for row in flips:
        order = ref[row].argsort(descending=True)
        a, b = order[1], order[2]
        ref[row, b] = ref[row, a] - gap
        port[row] = ref[row]
        port[row, a], port[row, b] = ref[row, b], ref[row, a]
    return ref, port, ref + 0.05


def _routed(prefill_flips=(), decode_flips=(), gap=0.01, layer=1):
    reports = {}
    for phase, rows, flips in (('prefill', sum(LENGTHS), prefill_flips), ('decode', len(LENGTHS) * STEPS,
                                                                          decode_flips)):
        ref, port, floor = _router(rows, flips, gap)
        reports[phase] = compare_routing({0: ref, layer: ref}, {0: ref, layer: port}, top_k=2,
                                         floor={0: floor, layer: floor}, phase=phase)
    return RoutedPositions.from_routing(reports, LENGTHS, STEPS), reports


def test_positions_of_rows():
    assert phase_positions(LENGTHS, 'prefill', STEPS) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3),
                                                           (1, 4)]
    assert phase_positions(LENGTHS, 'decode', STEPS) == [(0, 3), (0, 4), (1, 5), (1, 6)]


def test_a_near_tie_flip_forgives_its_sequence_from_its_position_on():
    routed, reports = _routed(prefill_flips=[5])           # prompt 1, position 2
    assert reports['prefill'].passed and reports['prefill'].layers[1].flips[0].near_tie
    flip = routed.flip_before(1, 2)
    assert flip is not None and (flip.seq, flip.position, flip.layer, flip.phase) == (1, 2, 1, 'prefill')
    assert routed.flip_before(1, 1) is None                # before the flip
    assert routed.flip_before(1, 6) == flip                # decode attends to the flipped token's cache
    assert all(routed.flip_before(0, p) is None for p in range(5))   # the other prompt never sees it


def test_a_decode_flip_forgives_that_step_and_the_later_ones():
    routed, _ = _routed(decode_flips=[2])                  # prompt 1, decode step 0 (position 5)
    assert routed.flip_before(1, 4) is None and routed.flip_before(1, 5).phase == 'decode'
    assert routed.flip_before(1, 6) is not None and routed.flip_before(0, 4) is None


def test_hard_flips_forgive_nothing_and_fail_the_routing_check():
    routed, reports = _routed(prefill_flips=[5], gap=2.0)
    assert not routed and routed.flip_before(1, 7) is None
    check = routing_check(reports['prefill'], LENGTHS, STEPS)
    assert check.status == 'failed' and check.data['hard'] == 1
    assert 'layer 1, prompt 1 position 2' in check.detail
    near = routing_check(_routed(prefill_flips=[5])[1]['prefill'], LENGTHS, STEPS)
    assert near.status == 'passed' and near.data['near_tie'] == 1 and 'HARD' not in near.detail


@settings(max_examples=40, deadline=None)
@given(flips=st.lists(st.integers(0, sum(LENGTHS) - 1), max_size=3, unique=True),
       seq=st.integers(0, 1), position=st.integers(0, 6))
def test_forgiven_exactly_when_the_sequence_flipped_at_or_before(flips, seq, position):
    routed, _ = _routed(prefill_flips=flips)
    positions = phase_positions(LENGTHS, 'prefill', STEPS)
    want = any(positions[r][0] == seq and positions[r][1] <= position for r in flips)
    assert (routed.flip_before(seq, position) is not None) == want


def _logits(rows):
    return CaptureSet(taps={'prefill': {'logits': [torch.tensor(r) for r in rows[:2]]},
                            'decode': {'logits': [torch.tensor(r) for r in rows[2:]]}})


# per prompt: prefill rows (3 and 5 tokens), then decode rows (2 steps); 6 tokens of vocabulary
_REF = [[[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 3, [[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 5,
        [[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 2, [[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 2]


def _port(seq_row):
    """The reference's logits, with token 5 jumping to the top at one (list index, row): far outside any noise."""
    rows = [[list(r) for r in part] for part in _REF]
    part, row = seq_row
    rows[part][row][5] = 9.0
    return rows


def test_the_whole_model_checks_forgive_a_position_after_a_near_tie_flip_and_no_other():
    ref, floor = _logits(_REF), _logits(_REF)
    tokens = [[0, 0, 0], [0, 0, 0]]
    routed, _ = _routed(prefill_flips=[5])                 # prompt 1 from position 2
    after = _logits(_port((1, 4)))                         # prompt 1, position 4
    kl, top = logprob_checks(ref, after, floor, torch.bfloat16, 'prefill', routed)
    assert kl.status == 'passed' and kl.data['routing_forgiven'] == 3 and kl.data['mean_kl'] > kl.data[
        'bound_all_positions']
    assert 'router flip near a tie' in kl.detail and 'prompt 1 position 2 (prefill), layer 1' in kl.detail
    assert top.status == 'passed' and top.data['routing_forgiven'] == 1
    unforgiven = logprob_checks(ref, after, floor, torch.bfloat16, 'prefill')
    assert [c.status for c in unforgiven] == ['failed', 'failed']
    for elsewhere in ((1, 1), (0, 2)):                     # before the flip; the other prompt
        kl, top = logprob_checks(ref, _logits(_port(elsewhere)), floor, torch.bfloat16, 'prefill', routed)
        assert kl.status == 'failed' and top.status == 'failed', elsewhere
        assert 'NOT forgiven' in kl.detail
    # decode positions of prompt 1 follow the prefill flip; greedy reads the last prefill row and the decode rows
    kl, top = logprob_checks(ref, _logits(_port((3, 1))), floor, torch.bfloat16, 'decode', routed)
    assert kl.status == top.status == 'passed'
    greedy = greedy_check(ref, _logits(_port((3, 1))), floor, torch.bfloat16, tokens, routed)
    assert greedy.status == 'passed' and 'forgiven' in greedy.detail and 'router flip' in greedy.detail
    greedy = greedy_check(ref, _logits(_port((2, 1))), floor, torch.bfloat16, tokens, routed)
    assert greedy.status == 'failed' and 'NOT forgiven' in greedy.detail


def test_a_kl_over_the_bound_at_unflipped_positions_still_fails():
    """Forgiving the flipped positions must not hide an error elsewhere: every row off, prompt 1 flipped."""
    ref, floor = _logits(_REF), _logits(_REF)
    port = _logits([[[r[0] + 0.0, r[1] + 0.5, *r[2:]] for r in part] for part in _REF])
    routed, _ = _routed(prefill_flips=[3])                 # prompt 1 from position 0: all of prompt 1
    kl, _ = logprob_checks(ref, port, floor, torch.bfloat16, 'prefill', routed)
    assert kl.status == 'failed' and kl.data['routing_forgiven'] == 5
    assert kl.value == pytest.approx(kl.data['mean_kl'])


def test_greedy_token_k_is_predicted_at_position_len_minus_one_plus_k():
    """Generated token 0 comes from the last prompt row (position n - 1), token k from decode step k - 1 (n + k - 1):
    a flip at decode step 0 (position n) forgives token 1, not token 0."""
    ref, floor, tokens = _logits(_REF), _logits(_REF), [[0, 0, 0], [0, 0, 0]]
    routed, _ = _routed(decode_flips=[2])                  # prompt 1, decode step 0: position 5
    token0 = greedy_check(ref, _logits(_port((1, 4))), floor, torch.bfloat16, tokens, routed)
    assert token0.status == 'failed' and 'prompt 1 token 0' in token0.detail
    token1 = greedy_check(ref, _logits(_port((3, 0))), floor, torch.bfloat16, tokens, routed)
    assert token1.status == 'passed' and 'prompt 1 token 1' in token1.detail


def test_the_routing_check_says_how_many_tokens_took_other_experts_end_to_end():
    """The accumulated view's MLP errors jump where tokens took other experts; the check line says how many."""
    _, clean = _routed()
    _, flipped = _routed(prefill_flips=[1, 5])
    check = routing_check(clean['prefill'], LENGTHS, STEPS, accumulated=flipped['prefill'])
    assert check.status == 'passed' and check.data['end_to_end_rows'] == 2
    assert 'end to end, 2 token(s) took other experts' in check.detail
    assert 'end to end' not in routing_check(clean['prefill'], LENGTHS, STEPS, accumulated=clean['prefill']).detail
