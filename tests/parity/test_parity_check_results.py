"""What the whole-model checks hand to reports and notebooks besides their verdict: each CheckResult's name, phase,
value, bound and data, on hand-made replays, routing reports and logits (parity/checks.py, routing_checks.py)."""
import math
import re

import pytest
import torch

from parity.capture_set import CaptureSet
from parity.checks import cuda_graph_checks, greedy_check, logprob_checks
from parity.graph_replay import GraphReplay, ReplayDiff
from parity.noise_floor import KL_EPS, kl_bound
from parity.routing import Flip, LayerRouting, RoutingReport
from parity.routing_checks import NearTieFlip, RoutedPositions, routing_check


def _diff(batch, bucket, **kw):
    base = dict(captured=True, max_abs=0.0, rel_l2=0.0, bitwise=True, vocab=256)
    base.update(kw)
    return ReplayDiff(batch=batch, bucket=bucket, **base)


def test_cuda_graph_results_carry_their_numbers_and_the_replay():
    exact, padded = _diff(3, 3), _diff(3, 4, bitwise=False, max_abs=2e-3, rel_l2=1e-3)
    ok, close = cuda_graph_checks('cuda', GraphReplay(exact, padded), 1e-3)     # exactly at the tolerance passes
    assert (ok.name, ok.phase, ok.status, ok.value, ok.bound, ok.data) == ('cuda_graph', None, 'passed', 0.0, 0.0,
                                                                           exact.to_data())
    assert (close.name, close.status, close.value, close.bound, close.data) == ('cuda_graph_padded', 'passed', 1e-3,
                                                                                1e-3, padded.to_data())
    off = _diff(3, 3, bitwise=False, max_abs=5e-6, rel_l2=1e-8)
    bad, _ = cuda_graph_checks('cuda', GraphReplay(off, padded), 1e-3)
    assert (bad.status, bad.value, bad.bound, bad.data) == ('failed', 5e-6, 0.0, off.to_data())


def test_a_capture_without_a_comparison_is_not_compared_and_says_which_stage_failed():
    for captured, stage in ((True, 'replaying'), (False, 'capturing')):
        broken = _diff(3, 3, captured=captured, bitwise=None, max_abs=None, rel_l2=None, reason='it raised')
        exact, padded = cuda_graph_checks('cuda', GraphReplay(broken, broken), 1e-3)
        for check in (exact, padded):
            assert check.status == 'failed' and check.data == broken.to_data()
            assert check.detail.split(' the batch-3 decode graph failed')[0] == stage, check.detail


def test_no_replay_on_cuda_fails_both_checks():
    for check in cuda_graph_checks('cuda', None, 1e-3):
        assert check.status == 'failed' and 'made no CUDA-graph comparison' in check.detail


def _flip(row, near):
    return Flip(row=row, dropped=[1], added=[2], margin=0.01 if near else 2.0, noise=0.05, near_tie=near)


def _layer(layer, flips=(), floor=0.98, tokens=6):
    return LayerRouting(layer, tokens, agreement=1 - len(flips) / tokens, floor_agreement=floor, logits_rel_l2=1e-3,
                        flips=list(flips))


def test_the_routing_result_carries_agreement_counts_and_the_first_hard_flip():
    report = RoutingReport('decode', 2, [_layer(1, [_flip(0, True), _flip(3, False)]),
                                         _layer(3, [_flip(1, True), _flip(4, False)], floor=0.5)])
    check = routing_check(report, prompt_lengths=[4, 9], decode_steps=3)
    assert (check.name, check.phase, check.status) == ('routing', 'decode', 'failed')
    assert check.value == 1 - 2 / 6 and check.bound is None
    assert check.data == {'agreement': {'1': 1 - 2 / 6, '3': 1 - 2 / 6}, 'floor_agreement': {'1': 0.98, '3': 0.5},
                          'near_tie': 2, 'hard': 2, 'first_hard': {'layer': 1, 'row': 3}}
    # decode row 3 is prompt 1's first step: position 9
    assert 'layer 1, prompt 1 position 9:' in check.detail
    assert 'of 6 tokens (transformers in the test dtype: 98.0%, 50.0%)' in check.detail
    assert '2 HARD flip(s)' in check.detail and '2 flip(s) forgiven' in check.detail


def test_a_routing_row_beyond_the_prompts_is_named_by_its_row():
    report = RoutingReport('prefill', 2, [_layer(0, [_flip(5, False)])])
    check = routing_check(report, prompt_lengths=[2, 3], decode_steps=0)           # rows 0-4
    assert 'layer 0, row 5:' in check.detail
    report = RoutingReport('prefill', 2, [_layer(0, [_flip(4, False)])])
    assert 'layer 0, prompt 1 position 2:' in routing_check(report, [2, 3], 0).detail


def test_the_routing_detail_keeps_every_part_and_no_floor_no_floor_text():
    hard = RoutingReport('prefill', 2, [_layer(0, [_flip(1, False)], floor=None)], unrouted=[2])
    moved = RoutingReport('prefill', 2, [_layer(0, [_flip(1, True), _flip(2, True)])])
    check = routing_check(hard, [6], 0, accumulated=moved)
    assert 'transformers in the test dtype' not in check.detail
    parts = [p.split(' ')[0:2] for p in check.detail.split('; ')]
    # the agreement, then end-to-end moves, the unrouted layers and the hard flips, each kept
    assert parts[0] == ['top-2', 'expert'] and ['end', 'to'] in parts and ['layers', '[2]'] in parts
    assert ['1', 'HARD'] in parts
    assert check.data['end_to_end_rows'] == 2


def test_without_layers_the_routing_check_fails_naming_what_is_missing():
    missing = {f'layers.{i}.router': f'reason {i}' for i in range(5)}
    check = routing_check(RoutingReport('decode', 2, [], missing=missing), [3], 2)
    assert (check.name, check.phase, check.status) == ('routing', 'decode', 'failed')
    named = [k for k in missing if k in check.detail]
    assert named == ['layers.0.router', 'layers.1.router', 'layers.2.router'] and 'reason 2' in check.detail
    empty = routing_check(RoutingReport('prefill', 2, []), [3], 0)
    assert empty.status == 'failed' and 'no MoE layers' in empty.detail


def _capture(prefill_rows, decode_rows=None):
    taps = {'prefill': {'logits': [torch.tensor(r) for r in prefill_rows]}}
    taps['decode'] = {'logits': [torch.tensor(r) for r in decode_rows]} if decode_rows else {}
    return CaptureSet(taps=taps)


def test_greedy_without_decode_steps_and_with_a_padded_vocabulary():
    """The port's lm_head may be padded past the vocabulary (a multiple of 64, say): the padding is not a token."""
    ref = _capture([[[0.0, 3.0, 1.0]], [[2.0, 0.0, 1.0]]])
    port = _capture([[[0.0, 3.0, 1.0, 9.0]], [[2.0, 0.0, 1.0, 9.0]]])     # a padding column that wins argmax
    check = greedy_check(ref, port, None, torch.float32, reference_tokens=[[1], [0]])
    assert check.status == 'passed' and check.data['port_tokens'] == [[1], [0]]
    assert (check.value, check.bound) == (2.0, 2.0)


def _kl_reference(ref, other):
    """KL(softmax(ref) || softmax(other)) per row by plain loops; a token the reference gives no mass adds nothing."""
    out = []
    for r, o in zip(ref.double().tolist(), other.double().tolist()):
        lr = torch.tensor(r, dtype=torch.float64).log_softmax(-1).tolist()
        lo = torch.tensor(o, dtype=torch.float64).log_softmax(-1).tolist()
        out.append(sum(math.exp(a) * (a - b) for a, b in zip(lr, lo) if a > -math.inf))
    return out


LENGTHS = [2, 3]                                   # prefill rows 0-1 (prompt 0) and 2-4 (prompt 1)
ROW = [4.0, 3.0, 2.0, 1.0, 0.0, -1.0]


def _rows(edit=None):
    rows = [list(ROW) for _ in range(sum(LENGTHS))]
    for r, c, v in edit or ():
        rows[r][c] = v
    return _capture([rows[:2], rows[2:]])


def _routed(*seqs):
    return RoutedPositions({s: NearTieFlip(s, 0, 1, 'prefill') for s in seqs})


def test_the_kl_result_carries_its_mean_max_floor_and_bound():
    dt = torch.bfloat16
    ref, port, floor = _rows(), _rows([(3, 5, -0.5)]), _rows([(0, 0, 4.2), (2, 1, 3.1)])
    kl, top = logprob_checks(ref, port, floor, dt, 'prefill')
    rows = _kl_reference(torch.tensor([ROW] * 5), torch.cat(port.get('prefill', 'logits')))
    floor_rows = _kl_reference(torch.tensor([ROW] * 5), torch.cat(floor.get('prefill', 'logits')))
    floor_kl = sum(floor_rows) / 5
    assert (kl.name, kl.phase, kl.status) == ('logprob_kl', 'prefill', 'passed' if kl.value <= kl.bound else 'failed')
    assert kl.value == pytest.approx(sum(rows) / 5, rel=1e-9) and kl.bound == pytest.approx(kl_bound(dt, floor_kl))
    assert kl.data == pytest.approx({'max_kl': max(rows), 'floor_kl': floor_kl, 'mean_kl': sum(rows) / 5,
                                     'bound_all_positions': kl_bound(dt, floor_kl)}, rel=1e-9)
    assert (top.name, top.phase, top.value, top.bound) == ('top5', 'prefill', 1.0, 1.0)
    assert top.data == {'forgiven': 0, 'unforgiven_rows': [], 'routing_forgiven': 0}
    no_floor, _ = logprob_checks(ref, port, None, dt, 'prefill')
    assert no_floor.bound == KL_EPS[dt] and no_floor.data['floor_kl'] is None


def test_a_token_the_reference_rules_out_adds_no_kl():
    masked = [list(ROW[:-1]) + [-math.inf] for _ in range(5)]
    ref = _capture([masked[:2], masked[2:]])
    kl, _ = logprob_checks(ref, _rows(), None, torch.float32, 'prefill')
    want = _kl_reference(torch.tensor(masked), torch.tensor([ROW] * 5))
    assert math.isfinite(kl.value) and kl.value == pytest.approx(sum(want) / 5, rel=1e-9)


def test_kl_forgiven_by_routing_reports_the_rest_and_its_bound():
    dt = torch.bfloat16
    ref, floor = _rows(), _rows([(0, 0, 4.01)])                      # a floor KL at row 0 only
    port = _rows([(3, 5, 9.0)])                                      # prompt 1 far off
    kl, _ = logprob_checks(ref, port, floor, dt, 'prefill', _routed(1))
    rest_floor = sum(_kl_reference(torch.tensor([ROW] * 2), torch.cat(floor.get('prefill', 'logits'))[:2])) / 2
    assert (kl.name, kl.phase, kl.status) == ('logprob_kl', 'prefill', 'passed')
    assert kl.value == 0.0 and kl.bound == pytest.approx(kl_bound(dt, rest_floor), rel=1e-9)
    assert kl.data['routing_forgiven'] == 3 and kl.data['rest_kl'] == 0.0
    assert kl.data['rest_bound'] == kl.bound and kl.data['mean_kl'] > kl.data['bound_all_positions']
    worse = _rows([(3, 5, 9.0), (0, 5, 9.0)])                        # prompt 0 off too: not forgiven
    kl, _ = logprob_checks(ref, worse, floor, dt, 'prefill', _routed(1))
    assert kl.status == 'failed' and kl.value == kl.data['mean_kl'] and kl.bound == kl.data['bound_all_positions']
    assert kl.data['rest_kl'] > kl.data['rest_bound']
    every = _rows([(3, 5, 9.0), (0, 5, 9.0)])                        # both prompts flipped: nothing left to judge
    kl, _ = logprob_checks(ref, every, floor, dt, 'prefill', _routed(0, 1))
    assert kl.status == 'passed' and (kl.value, kl.data['rest_kl'], kl.data['routing_forgiven']) == (0.0, 0.0, 5)
    assert kl.bound == kl_bound(dt, 0.0) and 'no other position' in kl.detail
    kl, _ = logprob_checks(ref, port, None, dt, 'prefill', _routed(1))
    assert kl.status == 'passed' and kl.bound == KL_EPS[dt]


def test_decode_checks_of_a_single_prompt():
    ref = _capture([[ROW] * 3], [[ROW] * 2])
    port = _capture([[ROW] * 3], [[ROW, ROW[::-1]]])
    kl, top = logprob_checks(ref, port, None, torch.float32, 'decode')
    assert (kl.phase, kl.status, top.status, top.data['unforgiven_rows']) == ('decode', 'failed', 'failed', [1])


def test_greedy_counts_prompts_and_lists_ten_notes():
    prompts = 12
    ref = _capture([[ROW]] * prompts)
    port = _capture([[ROW[::-1]]] * 11 + [[ROW]])                     # 11 prompts pick token 5, not 0
    check = greedy_check(ref, port, None, torch.float32, reference_tokens=[[0]] * prompts)
    assert (check.name, check.phase, check.status) == ('greedy', None, 'failed')
    assert (check.value, check.bound) == (1.0, 12.0) and len(check.data['notes']) == 11
    m = re.match(r'greedy tokens equal for (\d+)/(\d+) prompts over (\d+) generated tokens; (.*)$', check.detail)
    assert m and m.groups()[:3] == ('1', '12', '1')
    assert m.group(4) == '; '.join(check.data['notes'][:10])


def test_the_top_k_result_on_a_small_vocabulary_counts_every_forgiven_row():
    """With 4 tokens the set compared is the top 3; two rows swapped at a near tie are both forgiven."""
    ref_row, near = [3.0, 2.0, 1.0, 0.999], [3.0, 2.0, 0.999, 1.0]
    ref = _capture([[ref_row] * 2, [ref_row] * 3])
    port = _capture([[near, ref_row], [ref_row, near, ref_row]])
    floor = _capture([[[r + 0.01 for r in ref_row]] * 2, [[r + 0.01 for r in ref_row]] * 3])
    _, top = logprob_checks(ref, port, floor, torch.bfloat16, 'prefill')
    assert (top.name, top.phase, top.status, top.bound) == ('top3', 'prefill', 'passed', 1.0)
    assert top.value == pytest.approx(0.6)
    assert top.data == {'forgiven': 2, 'unforgiven_rows': [], 'routing_forgiven': 0}
    assert top.detail.split('; ')[0] == 'top-3 sets agree at 3/5 positions'


def test_the_top_k_detail_names_the_first_eight_unforgiven_rows():
    far = list(ROW[:-1]) + [9.0]
    ref = _capture([[ROW] * 5, [ROW] * 5])
    port = _capture([[far] * 5, [far] * 4 + [ROW]])
    _, top = logprob_checks(ref, port, None, torch.float32, 'prefill')
    assert top.data['unforgiven_rows'] == list(range(9))
    assert top.detail.split('; ') == ['top-5 sets agree at 1/10 positions',
                                      '9 not forgiven (rows [0, 1, 2, 3, 4, 5, 6, 7] of the phase, in prompt order)']


def _near(seq, position):
    return NearTieFlip(seq, position, 1, 'prefill')


def test_the_earliest_near_tie_flip_of_each_sequence_is_kept_whatever_comes_first():
    layer = LayerRouting(2, 5, 0.4, None, 1e-3, flips=[_flip(1, False), _flip(4, True), _flip(3, True)])
    report = RoutingReport('prefill', 2, [layer])
    routed = RoutedPositions.from_routing({'prefill': report}, [2, 3], 0)        # rows 2-4 are prompt 1
    assert routed.first == {1: NearTieFlip(1, 1, 2, 'prefill')}
    assert bool(routed) and not RoutedPositions({})


def test_the_reason_names_the_first_four_flips_in_prompt_order():
    flips = [_near(s, 0) for s in (4, 1, 3, 0, 2)]
    reason = RoutedPositions.reason_for(flips)
    named = re.findall(r'prompt (\d+) position', reason)
    assert named == ['0', '1', '2', '3']


def test_a_greedy_margin_exactly_at_the_noise_is_forgiven():
    """float32 without a floor: the noise is EPS (2^-24) times the largest logit, here exactly the top-2 margin."""
    row = [1.0, 1.0 - 2.0**-24, 0.0]
    ref, port = _capture([[row]]), _capture([[[1.0 - 2.0**-24, 1.0, 0.0]]])
    check = greedy_check(ref, port, None, torch.float32, reference_tokens=[[0]])
    assert check.status == 'passed' and len(check.data['notes']) == 1


def test_the_logprob_checks_ignore_a_padded_port_vocabulary():
    ref = _rows()
    port = _capture([[list(ROW) + [50.0]] * 2, [list(ROW) + [50.0]] * 3])
    kl, top = logprob_checks(ref, port, None, torch.float32, 'prefill')
    assert (kl.status, kl.value, top.status, top.value) == ('passed', 0.0, 'passed', 1.0)


KL_HEAD = (r'mean KL\(transformers float32 \|\| port\) over (\d+) positions (\S+) nats, max (\S+); bound (\S+)'
           r'(?: \(floor (\S+)\))?')


def test_the_kl_detail_states_its_numbers_and_what_routing_forgave():
    dt = torch.bfloat16
    ref, floor, port = _rows(), _rows([(0, 0, 4.01)]), _rows([(3, 5, 9.0)])
    plain, _ = logprob_checks(ref, port, floor, dt, 'prefill')
    m = re.fullmatch(KL_HEAD, plain.detail)
    assert m and m.group(1) == '5' and float(m.group(5)) == pytest.approx(plain.data['floor_kl'], rel=0.01)
    m = re.fullmatch(KL_HEAD, logprob_checks(ref, port, None, dt, 'prefill')[0].detail)
    assert m and m.group(5) is None
    for routed, ok, rest in ((_routed(1), True, 'over the other 2 mean KL'), (_routed(0, 1), True, None),
                             (_routed(0), False, 'over the other 3 mean KL')):
        kl, _ = logprob_checks(ref, port, floor, dt, 'prefill', routed)
        whole = re.fullmatch(KL_HEAD + r'; (.*)', kl.detail)
        assert whole and whole.group(1) == '5', kl.detail
        counted, *tail = whole.group(6).split('; ')
        m = re.fullmatch(r'(\d+) position\(s\) (forgiven|set aside): .*', counted)
        assert m and m.group(2) == ('forgiven' if ok else 'set aside'), kl.detail
        last = tail[-1]
        if rest is None:
            assert last == 'no other position'
        else:
            assert last.startswith(rest)
        assert last.endswith(': NOT forgiven, more than the routing flips explain') == (not ok)


def test_the_cuda_graph_padded_detail_states_the_verdict_and_the_bits():
    for bitwise, rel, verdict in ((True, 0.0, 'within'), (False, 5e-4, 'within'), (False, 2e-3, 'OVER')):
        padded = _diff(3, 4, bitwise=bitwise, max_abs=rel, rel_l2=rel)
        _, check = cuda_graph_checks('cuda', GraphReplay(_diff(3, 3), padded), 1e-3)
        m = re.search(r'relative L2 \S+ (\w+) the decode logits tolerance \S+; (.*?); argmax equal in every row',
                      check.detail)
        assert m and m.group(1) == verdict, check.detail
        assert (m.group(2) == 'bitwise equal too') == bitwise and m.group(2).startswith('not bitwise') != bitwise


def test_the_argmax_note_lists_up_to_eight_rows_and_none_when_equal():
    rows = list(range(9))
    _, padded = cuda_graph_checks('cuda', GraphReplay(_diff(3, 3), _diff(3, 4, bitwise=False, max_abs=1e-4,
                                                                              rel_l2=1e-4, argmax_rows_differ=rows)), 1)
    assert padded.detail.endswith('; argmax differs in 9 row(s) [0, 1, 2, 3, 4, 5, 6, 7]')
    exact, _ = cuda_graph_checks('cuda', GraphReplay(_diff(3, 3, bitwise=False, max_abs=1e-6, rel_l2=1e-8),
                                                     _diff(3, 4)), 1)
    assert 'argmax differs' not in exact.detail


def test_not_compared_results_carry_the_replay_and_a_fix_only_when_known():
    refused = ReplayDiff(3, 3, model_refused=True)
    failed = ReplayDiff(3, 4, reason='the forward synchronises with the host')
    exact, padded = cuda_graph_checks('cuda', GraphReplay(refused, failed), 1e-3)
    assert (exact.status, exact.data) == ('skipped', refused.to_data())
    assert padded.data == failed.to_data() and 'Fix' not in padded.detail


def test_top_k_sets_are_compared_per_row_whatever_their_order():
    """Logits rising with the token id: the reference's top-5 come highest id first, the port's the same."""
    rising = [[float(i) for i in range(7)]]
    _, top = logprob_checks(_capture([rising]), _capture([rising]), None, torch.float32, 'prefill')
    assert top.status == 'passed' and top.value == 1.0


def test_a_top_k_detail_with_routing_forgiveness_keeps_its_count():
    ref = _rows()
    port = _rows([(3, 5, 9.0)])
    _, top = logprob_checks(ref, port, None, torch.bfloat16, 'prefill', _routed(1))
    parts = top.detail.split('; ')
    assert parts[0] == 'top-5 sets agree at 4/5 positions' and parts[1].startswith('1 disagreement(s) forgiven')
