"""The CUDA-graph checks: their verdicts, the replay-vs-eager plumbing (on the CPU through a stand-in for graph
replay), and on CUDA the real thing."""
import types

import pytest
import torch

from lmdp.backends.cuda import CaptureResult, CUDAGraphRunner
from lmdp.engine import StepRunner
from lmdp.models.llama import LlamaForCausalLM
from parity import compare
from parity.checks import cuda_graph_checks
from parity.graph_replay import GraphReplay, ReplayDiff, padded_bucket, replay_vs_eager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def _checks(replay, device='cuda', tol=1e-3):
    exact, padded = cuda_graph_checks(device, replay, tol)
    assert (exact.name, padded.name) == ('cuda_graph', 'cuda_graph_padded')
    return exact, padded


def _diff(batch, bucket, **kw):
    base = dict(captured=True, max_abs=0.0, rel_l2=0.0, bitwise=True, vocab=256)
    base.update(kw)
    return ReplayDiff(batch=batch, bucket=bucket, **base)


def test_padded_bucket_follows_the_default_spacing():
    assert [padded_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 70)] == [2, 4, 4, 8, 8, 16, 16, 80, 80]


def test_skipped_with_the_reason_off_cuda():
    for check in _checks(None, device='cpu'):
        assert check.status == 'skipped' and 'needs a CUDA device; this run is on cpu' in check.detail


def test_bitwise_replay_passes_and_close_padded_replay_passes():
    exact, padded = _checks(GraphReplay(_diff(3, 3), _diff(3, 4, bitwise=False, max_abs=2e-3, rel_l2=4e-4)))
    assert exact.status == 'passed' and 'bit for bit' in exact.detail and exact.value == 0.0
    assert padded.status == 'passed' and 'not bitwise equal, as may be' in padded.detail
    assert '1 padding slot' in padded.detail and padded.data['bucket'] == 4


def test_a_replay_off_by_any_bit_fails():
    exact, _ = _checks(GraphReplay(_diff(3, 3, bitwise=False, max_abs=1e-7, rel_l2=1e-9, argmax_rows_differ=[]),
                                   _diff(3, 4)))
    assert exact.status == 'failed' and 'max |diff| 1.000e-07' in exact.detail and 'froze at capture' in exact.detail


def test_a_padded_replay_over_the_tolerance_fails():
    _, padded = _checks(GraphReplay(_diff(3, 3), _diff(3, 4, bitwise=False, max_abs=3.0, rel_l2=0.5,
                                                        argmax_rows_differ=[1])), tol=1e-2)
    assert padded.status == 'failed' and 'OVER' in padded.detail and 'leak' in padded.detail
    assert 'argmax differs in 1 row(s) [1]' in padded.detail


def test_refused_and_failed_captures():
    refused = ReplayDiff(3, 3, model_refused=True, reason='the model answered support_cuda_graph = False')
    failed = ReplayDiff(3, 4, reason='the forward synchronises with the host', fix='keep values on the device')
    exact, padded = _checks(GraphReplay(refused, failed))
    assert exact.status == 'skipped' and 'support_cuda_graph = False' in exact.detail
    assert padded.status == 'failed' and 'capturing the batch-4 decode graph failed' in padded.detail
    assert 'Fix: keep values on the device' in padded.detail
    for check in _checks(GraphReplay(error='OutOfBlocks: need 1 KV-cache blocks')):
        assert check.status == 'failed' and 'could not run: OutOfBlocks' in check.detail


class _EagerReplay(CUDAGraphRunner):
    """The graph runner with "replay" done by running the step again on its static buffers: the CPU stand-in for a
    captured graph (the same inputs, context and padding as a replay; no graph)."""

    def capture(self, bs):
        result = self.results[bs] = CaptureResult(bs, supported=True, captured=True)
        self._reset_padding(0, bs)
        self.graphs[bs] = types.SimpleNamespace(replay=lambda: self.outputs.__setitem__(bs, self._run(bs)))
        return result


def _fake_capture(runner):
    def capture(batch_sizes, max_blocks_per_seq=None):
        graphs = _EagerReplay(runner.model, runner.agent.ctx_mgr, runner.agent.model_config, runner.cache.kv_caches,
                              max_blocks_per_seq=runner.runner.max_blocks_per_seq,
                              scratch_block=runner.scratch_block, capture_batch_sizes=list(batch_sizes))
        graphs.capture_all()
        runner.runner.graphs = graphs       # the model runner replays through it, as in the engine
        return graphs
    return capture


def test_replay_vs_eager_on_the_cpu_stand_in(tiny_llama, monkeypatch):
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=32, block_size=16,
                                        shuffle_blocks_seed=0)
    monkeypatch.setattr(runner, 'capture_cuda_graphs', _fake_capture(runner))
    prompts = [list(range(3, 20)), list(range(5, 50)), list(range(7, 16))]
    out = runner.prefill(prompts)
    out = runner.decode(out.seq_ids, [1, 2, 3])
    cached = [s.num_cached for s in runner.sequences.values()]
    k_before = [k.clone() for k, _ in runner.cache.kv_caches]
    replay = replay_vs_eager(runner, out.seq_ids, [4, 5, 6])
    assert replay.error is None
    assert (replay.exact.batch, replay.exact.bucket, replay.padded.bucket) == (3, 3, 4)
    assert replay.exact.captured and replay.padded.captured
    # the same ops at the same shapes give the same bits here too; padded rows may differ by BLAS rounding
    assert replay.exact.bitwise and replay.exact.max_abs == 0.0, replay.exact
    assert replay.padded.rel_l2 < 1e-6, replay.padded
    assert not replay.exact.argmax_rows_differ and not replay.padded.argmax_rows_differ
    exact, padded = cuda_graph_checks('cuda', replay, 1e-5)
    assert exact.status == padded.status == 'passed', (exact.detail, padded.detail)
    # the sequences did not advance, and outside the scratch block only their next slots were written
    assert [s.num_cached for s in runner.sequences.values()] == cached
    untouched = torch.ones(k_before[0].shape[:2], dtype=torch.bool)
    untouched[runner.scratch_block] = False
    for s in runner.sequences.values():
        untouched[s.blocks[s.num_cached // 16], s.num_cached % 16] = False
    for (k, _), kb in zip(runner.cache.kv_caches, k_before):
        assert torch.equal(k[untouched], kb[untouched])
    # the comparison left nothing behind: the next decode step is the one a runner without it computes
    following = runner.decode(out.seq_ids, [4, 5, 6]).logits
    plain = StepRunner(runner.agent, num_blocks=32, block_size=16, shuffle_blocks_seed=0)
    ids = plain.prefill(prompts).seq_ids
    plain.decode(ids, [1, 2, 3])
    torch.testing.assert_close(following, plain.decode(ids, [4, 5, 6]).logits, rtol=1e-6, atol=1e-6)


# ---- on CUDA: the harness drives lmdp's CUDA-graph runner -------------------------------------------------------

class _HostCounter(LlamaForCausalLM):
    """Adds a host-side step counter to the hidden state: a graph freezes the value it saw at capture."""
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs) + 1e-2 * type(self).calls


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_replay_is_bitwise_eager_on_cuda(tiny_llama, dtype):
    report = compare(tiny_llama, dtype=dtype, device='cuda')
    exact, padded = report.check('cuda_graph'), report.check('cuda_graph_padded')
    assert exact.status == 'passed', exact.detail
    assert exact.data['bitwise'] and exact.data['max_abs'] == 0.0 and exact.data['batch'] == exact.data['bucket'] == 3
    assert padded.status == 'passed', padded.detail
    assert padded.data['bucket'] == 4 and not padded.data['argmax_rows_differ']
    print(exact.detail, padded.detail, sep='\n')


@cuda
@pytest.mark.gpu
def test_host_state_frozen_by_the_graph_fails_the_check(tiny_llama):
    report = compare(tiny_llama, dtype='bfloat16', device='cuda', custom_module_map={'LlamaForCausalLM': _HostCounter})
    exact = report.check('cuda_graph')
    assert exact.status == 'failed' and 'froze at capture' in exact.detail, exact.detail
