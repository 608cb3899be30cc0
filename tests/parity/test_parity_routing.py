"""parity/routing.py on router logits made to order: agreement per layer, flips near a tie told apart from hard
ones by the reference's margin against the run's logit noise."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from parity.capture_set import CaptureSet
from parity.routing import compare_routing, routing_from_captures


def _logits(tokens=20, experts=8, seed=0):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 2


def _swap_boundary(logits, row, k, gap):
    """Make row's k-th and (k+1)-th experts `gap` apart in `logits`; return (reference, port with them swapped)."""
    ref = logits.clone()
    order = ref[row].argsort(descending=True)
    a, b = order[k - 1], order[k]
    ref[row, b] = ref[row, a] - gap
    port = ref.clone()
    port[row, a], port[row, b] = ref[row, b], ref[row, a]
    return ref, port


def test_identical_routing_agrees_fully():
    ref = _logits()
    report = compare_routing({0: ref, 1: ref * 2}, {0: ref.clone(), 1: ref * 2}, top_k=2)
    assert report.passed and report.agreement() == {0: 1.0, 1: 1.0}
    assert all(not layer.flips for layer in report.layers)


def test_flip_within_the_noise_floor_is_near_a_tie():
    ref, port = _swap_boundary(_logits(), row=3, k=2, gap=1e-3)
    floor = ref + 1e-2 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    report = compare_routing({0: ref}, {0: port}, top_k=2, floor={0: floor})
    layer = report.layers[0]
    assert layer.agreement == pytest.approx(19 / 20) and len(layer.flips) == 1
    flip = layer.flips[0]
    assert flip.row == 3 and flip.near_tie and flip.margin == pytest.approx(1e-3, rel=1e-3)
    assert report.passed and layer.floor_agreement is not None


def test_the_same_flip_without_a_floor_is_hard_and_named():
    """float32 has no noise floor: a 1e-3 margin is no tie there."""
    ref, port = _swap_boundary(_logits(), row=3, k=2, gap=1e-3)
    report = compare_routing({0: ref, 1: ref}, {0: ref, 1: port}, top_k=2)
    assert not report.passed and report.agreement()[0] == 1.0
    layer, flip = report.first_hard_flip()
    assert layer == 1 and flip.row == 3
    assert 'first hard flip: layer 1, row 3' in report.summary()


def test_a_wrong_router_makes_hard_flips_a_noisy_one_does_not():
    ref = _logits(200, 16)
    floor = ref + 0.02 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    noisy = ref + 0.02 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    permuted = ref[:, torch.randperm(16, generator=torch.Generator().manual_seed(4))]
    ok = compare_routing({0: ref}, {0: noisy}, top_k=4, floor={0: floor})
    bad = compare_routing({0: ref}, {0: permuted}, top_k=4, floor={0: floor})
    assert ok.passed and ok.layers[0].agreement > 0.8
    assert not bad.passed and bad.layers[0].agreement < 0.2 and len(bad.layers[0].hard_flips) > 150


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), scale=st.floats(0.0, 1.0))
def test_agreement_is_the_share_of_rows_with_equal_top_k_sets(seed, k, scale):
    ref = _logits(30, 8, seed)
    port = ref + scale * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    layer = compare_routing({0: ref}, {0: port}, top_k=k).layers[0]
    want = sum(set(ref[i].topk(k).indices.tolist()) == set(port[i].topk(k).indices.tolist()) for i in range(30)) / 30
    assert layer.agreement == pytest.approx(want)
    assert len(layer.flips) == round((1 - want) * 30)
    for flip in layer.flips:
        assert len(flip.dropped) == len(flip.added) > 0 and flip.margin >= 0


def test_rows_may_come_per_sequence_and_shapes_must_match():
    ref = _logits(10)
    report = compare_routing({0: [ref[:4], ref[4:]]}, {0: ref}, top_k=2)
    assert report.layers[0].tokens == 10 and report.passed
    with pytest.raises(ValueError, match='layer 0: router logits'):
        compare_routing({0: ref}, {0: ref[:, :7]}, top_k=2)


def test_from_capture_sets_skips_dense_layers():
    from transformers import AutoConfig
    cfg = AutoConfig.for_model('qwen3_moe', num_hidden_layers=2, num_experts_per_tok=2)
    ref = _logits()
    ref32 = CaptureSet(taps={'prefill': {'layers.0.router': [ref]}}, missing={'layers.1.router': 'no router'})
    port = CaptureSet(taps={'prefill': {'layers.0.router': [ref]}}, missing={'layers.1.router': 'no router'})
    report = routing_from_captures(ref32, port, None, cfg, 'prefill')
    assert [r.layer for r in report.layers] == [0] and report.top_k == 2 and report.passed
    assert report.missing == {'layers.1.router': 'no router'}


# --- the 'routing' check that a mixture of experts' parity run carries (parity/routing_checks.py) ---


def test_the_routing_check_forgives_a_near_tie_and_lists_every_layer():
    from parity.routing_checks import routing_check
    ref = _logits()
    near_ref, near_port = _swap_boundary(ref, row=3, k=2, gap=1e-3)
    floor = {0: ref, 1: near_ref + 1e-2}
    check = routing_check(compare_routing({0: ref, 1: near_ref}, {0: ref, 1: near_port}, top_k=2, floor=floor,
                                          phase='prefill'), [len(ref)], 0)
    assert (check.name, check.phase, check.status) == ('routing', 'prefill', 'passed')
    assert 'layers [0, 1] at 100.0%, 95.0%' in check.detail and '1 flip(s) forgiven' in check.detail
    assert check.value == pytest.approx(0.95) and check.data['hard'] == 0


def test_the_routing_check_fails_on_a_hard_flip_and_names_it():
    from parity.routing_checks import routing_check
    ref, port = _swap_boundary(_logits(), row=7, k=2, gap=0.5)
    check = routing_check(compare_routing({0: ref, 2: ref}, {0: ref, 2: port}, top_k=2), [len(ref)], 0)
    assert check.status == 'failed' and '1 HARD flip(s), first at layer 2, prompt 0 position 7' in check.detail
    assert 'preferred by 0.5' in check.detail


def test_a_layer_the_port_does_not_route_fails_the_check():
    from parity.routing_checks import routing_check
    ref = _logits()
    report = compare_routing({0: ref, 1: ref}, {0: ref}, top_k=2)
    assert report.unrouted == [1] and not report.passed
    check = routing_check(report, [len(ref)], 0)
    assert check.status == 'failed' and 'layers [1] route tokens in transformers' in check.detail
    empty = routing_check(compare_routing({0: ref}, {}, top_k=2), [len(ref)], 0)
    assert empty.status == 'failed' and 'no layer had router logits on both sides' in empty.detail
