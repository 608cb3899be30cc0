"""The CUDA-graph eligibility view's data: per-bucket answers on the CPU, an engine's captures read back, and the
source scan's verdict."""
import types

import pytest
import torch

from lmdp.backends.cuda import CaptureResult
from lmdp.models.llama import LlamaForCausalLM
from lmdp.widgets.graph_eligibility import graph_eligibility
from lmdp.widgets.graph_eligibility_view import render_html


class SmallBatchesOnly(LlamaForCausalLM):
    """Answers per step: graphs for decode batches of at most 2."""

    def support_cuda_graph(self, input_ids, **kwargs):
        return input_ids.size(-1) <= 2


class BrokenAnswer(LlamaForCausalLM):

    def support_cuda_graph(self, **kwargs):
        raise KeyError('attn_metadata')


class SyncsInForward(LlamaForCausalLM):

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata=None, inputs_embeds=None, **kwargs):
        if int(attn_metadata.kv_seqlens.max().item()) > 4096:
            raise ValueError('too long')
        return super().forward(input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds)


def _map(cls):
    return {'LlamaForCausalLM': cls}


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU view; the GPU one is tested in test_on_cuda')
def test_without_cuda_it_says_so_and_still_asks_each_bucket(tiny_llama):
    g = graph_eligibility(tiny_llama, batch_sizes=(1, 2, 4))
    assert g.device == 'cpu' and not g.cuda and g.support_flag == 'True'
    assert [(b.batch_size, b.supported, b.captured, b.status) for b in g.buckets] == [
        (1, True, None, 'not tried (no CUDA)'), (2, True, None, 'not tried (no CUDA)'),
        (4, True, None, 'not tried (no CUDA)')]
    assert g.eligible and g.findings == []
    assert any('no CUDA device (cpu)' in n for n in g.notes) and any('prefill steps' in n for n in g.notes)
    assert g.verdict().startswith('no CUDA device here')


def test_a_callable_support_cuda_graph_is_asked_with_each_buckets_inputs(tiny_llama):
    g = graph_eligibility(tiny_llama, custom_module_map=_map(SmallBatchesOnly), batch_sizes=(1, 2, 4, 8),
                          device='cpu')
    assert g.support_flag == 'callable: SmallBatchesOnly.support_cuda_graph'
    assert [b.supported for b in g.buckets] == [True, True, False, False]
    refused = g.buckets[2]
    assert refused.status == 'refused by the model' and 'support_cuda_graph = False' in refused.reason
    assert not g.eligible and g.verdict() == 'support_cuda_graph refuses batch size(s) [4, 8]: those decode steps ' \
                                             'run eagerly'


def test_a_support_cuda_graph_that_raises_is_reported_not_raised(tiny_llama):
    g = graph_eligibility(tiny_llama, custom_module_map=_map(BrokenAnswer), batch_sizes=(1, ), device='cpu')
    assert g.buckets[0].supported is None and "KeyError: 'attn_metadata'" in g.buckets[0].reason


def test_a_host_sync_in_forward_is_found_on_the_cpu_with_its_fix(tiny_llama):
    g = graph_eligibility(tiny_llama, custom_module_map=_map(SyncsInForward), batch_sizes=(1, ), device='cpu')
    assert [(f.function, f.pattern) for f in g.findings] == [('SyncsInForward.forward', 'if on a tensor')]
    assert not g.eligible and g.verdict().startswith('capture would fail: 1 line(s)')
    page = render_html(g)
    assert page.count('lmdp-finding-row') == 1 and 'kv_seqlens.max().item()' in page


def test_an_engines_captures_are_read_back():
    results = {1: CaptureResult(1, True, captured=True),
               2: CaptureResult(2, True, captured=False, reason='a host sync', fix='no .item()'),
               4: CaptureResult(4, False, reason='refused', fix='intended')}
    agent = types.SimpleNamespace(device=torch.device('cuda'), model=LlamaForCausalLM)
    engine = types.SimpleNamespace(agent=agent, runner=types.SimpleNamespace(graphs=types.SimpleNamespace(
        results=results)))
    g = graph_eligibility(types.SimpleNamespace(engine=engine))        # a Pipeline holds its engine
    statuses = [(b.batch_size, b.status) for b in g.buckets]
    assert statuses == [(1, 'captured'), (2, 'capture failed'), (4, 'refused by the model')]
    assert g.buckets[1].reason == 'a host sync' and g.verdict().startswith('support_cuda_graph refuses')
    page = render_html(g)
    assert page.count('lmdp-bucket-row') == 3 and page.count('lmdp-bucket-row lmdp-fail') == 2


def test_a_parity_reports_cuda_graph_check_is_quoted(report_factory):
    g = graph_eligibility(LlamaForCausalLM, report=report_factory())
    assert g.buckets == [] and 'parity cuda_graph: skipped: needs a CUDA device' in g.notes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_on_cuda(tiny_llama):
    g = graph_eligibility(tiny_llama, batch_sizes=(1, 2, 4), device='cuda', dtype='float32')
    assert [b.captured for b in g.buckets] == [True, True, True]
    assert all(b.replay_max_abs is not None and b.replay_max_abs < 1e-4 for b in g.buckets)
    assert g.eligible
