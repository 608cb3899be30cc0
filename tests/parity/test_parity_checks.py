"""Whole-model checks on hand-made logits: what is forgiven as rounding and what is not; weight coverage."""
import re
import types

import torch

from parity.capture_set import CaptureSet
from parity.checks import coverage_check, greedy_check, logprob_checks


def _capture(prefill_rows, decode_rows=None):
    taps = {'prefill': {'logits': [torch.tensor(prefill_rows)]}}
    taps['decode'] = {'logits': [torch.tensor(decode_rows)]} if decode_rows else {}
    return CaptureSet(taps=taps)


REF = [[9.0, 8.0, 7.0, 6.0, 5.0, 4.99, 0.0, -1.0]]   # ranks 5 and 6 are 0.01 apart


def test_top5_swap_at_a_near_tie_is_forgiven_only_inside_the_floor():
    swapped = [[9.0, 8.0, 7.0, 6.0, 4.98, 4.99, 0.0, -1.0]]
    near_floor = _capture(REF)                                  # the reference in the test dtype
    near_floor.taps['prefill']['logits'][0] += 0.02             # ... off by 0.02 everywhere in the row
    kl, top = logprob_checks(_capture(REF), _capture(swapped), near_floor, torch.bfloat16, 'prefill')
    assert top.status == 'passed' and top.data['forgiven'] == 1
    kl, top = logprob_checks(_capture(REF), _capture(swapped), None, torch.float32, 'prefill')
    assert top.status == 'failed' and top.data['unforgiven_rows'] == [0]


def test_top5_disagreement_far_from_the_boundary_is_not_forgiven():
    far = [[9.0, 8.0, 7.0, 6.0, 5.0, 4.99, 0.0, 20.0]]        # a token from the bottom jumps to the top
    floor = _capture(REF)
    floor.taps['prefill']['logits'][0] += 0.02
    kl, top = logprob_checks(_capture(REF), _capture(far), floor, torch.bfloat16, 'prefill')
    assert top.status == 'failed'
    assert kl.status == 'failed' and kl.value > kl.bound


def test_greedy_divergence_is_forgiven_only_where_the_top2_margin_is_noise():
    ref = _capture([[0.0, 1.0, 0.999]], [[5.0, 1.0, 0.0]])    # token 1 by 0.001, then token 0 by 4
    port = _capture([[0.0, 0.999, 1.0]], [[1.0, 5.0, 0.0]])   # picks 2, then 1
    floor = _capture([[0.0, 1.01, 0.999]], [[5.01, 1.0, 0.0]])
    check = greedy_check(ref, port, floor, torch.bfloat16, reference_tokens=[[1, 0]])
    assert check.status == 'failed'
    # one note per differing token, 'prompt P token T: ...; <verdict>: ...': the near tie forgiven, the real
    # difference not (compared whole: 'NOT forgiven' contains 'forgiven')
    verdicts = [(note.split(':')[0], note.split('; ')[1].split(':')[0]) for note in check.data['notes']]
    assert verdicts == [('prompt 0 token 0', 'forgiven'), ('prompt 0 token 1', 'NOT forgiven')]
    assert check.data['port_tokens'] == [[2, 1]]
    # the near tie alone is forgiven: the check passes
    tie_only = _capture([[0.0, 0.999, 1.0]], [[5.0, 1.0, 0.0]])
    check = greedy_check(ref, tie_only, floor, torch.bfloat16, reference_tokens=[[1, 0]])
    assert check.status == 'passed' and check.data['port_tokens'] == [[2, 0]] and len(check.data['notes']) == 1


def _names_after(detail, what):
    """The comma-separated names a coverage detail lists after '<N> <what>...: ', and N."""
    m = re.search(rf'(\d+) {what}[^:]*: (.*?)(?:; |\. Fix)', detail)
    return (int(m.group(1)), m.group(2).split(', ')) if m else (0, [])


def test_weight_coverage_fails_on_either_side_and_lists_the_first_ten_names():
    load = types.SimpleNamespace
    clean = coverage_check(load(missing=[], unused=[]))
    assert (clean.name, clean.phase, clean.status) == ('weight_coverage', None, 'passed') and clean.detail
    missing = [f'model.layers.{i}.mlp.up_proj.weight' for i in range(12)]
    check = coverage_check(load(missing=missing, unused=[]))
    assert check.status == 'failed' and check.data == {'missing': missing, 'unused': []}
    assert _names_after(check.detail, 'port parameter') == (12, missing[:10])
    assert _names_after(check.detail, 'checkpoint tensor') == (0, [])
    check = coverage_check(load(missing=[], unused=['lm_head.bias']))
    assert check.status == 'failed' and _names_after(check.detail, 'checkpoint tensor') == (1, ['lm_head.bias'])
    assert _names_after(check.detail, 'port parameter') == (0, [])
    check = coverage_check(load(missing=[], unused=missing))
    assert check.name == 'weight_coverage' and _names_after(check.detail, 'checkpoint tensor') == (12, missing[:10])
    both = coverage_check(load(missing=missing[:2], unused=['lm_head.bias']))
    assert _names_after(both.detail, 'port parameter') == (2, missing[:2])
    assert _names_after(both.detail, 'checkpoint tensor') == (1, ['lm_head.bias'])
