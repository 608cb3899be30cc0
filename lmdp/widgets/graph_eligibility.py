"""The CUDA-graph eligibility view's data: per batch-size bucket, what `support_cuda_graph` answers, whether
capture succeeded, how far replay is from eager; and the lines of the port that would break capture.

On a CUDA device the buckets are captured for real (lmdp.backends.cuda.CUDAGraphRunner through a StepRunner),
and each captured bucket replays one decode step that is also run eagerly on the same cache state. Without CUDA
nothing can be captured: the view says so, and still asks `support_cuda_graph` per bucket (a callable answer
needs the forward inputs, which a CPU runner builds just the same) and scans the port's source.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field

from .host_sync_scan import HostSyncFinding, scan_host_syncs

DEFAULT_BUCKETS = (1, 2, 4, 8)
PREFILL_NOTE = ('prefill steps always run eagerly: graphs are captured for decode steps only (their shapes are '
                'fixed per batch size; a prefill\'s token count is not). Nothing to fix.')


@dataclass
class BucketRow:
    batch_size: int
    supported: bool | None             # support_cuda_graph's answer; None if asking it failed
    captured: bool | None = None       # None: not tried (no CUDA, or refused)
    replay_max_abs: float | None = None    # max |replay - eager| over a decode step's logits
    replay_bitwise: bool | None = None
    reason: str | None = None
    fix: str | None = None

    @property
    def status(self) -> str:
        if self.supported is False:
            return 'refused by the model'
        if self.supported is None:
            return 'support_cuda_graph failed'
        if self.captured is None:
            return 'not tried (no CUDA)'
        return 'captured' if self.captured else 'capture failed'


@dataclass
class GraphEligibility:
    model_class: str
    device: str
    support_flag: str                       # 'True', 'False' or 'callable: <name>'
    buckets: list[BucketRow]
    findings: list[HostSyncFinding]
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith('cuda')

    @property
    def eligible(self) -> bool:
        """Nothing found that stops decode steps from running as graphs."""
        return (not self.findings and all(b.supported for b in self.buckets)
                and all(b.captured is not False for b in self.buckets))

    def verdict(self) -> str:
        if self.findings:
            return (f'capture would fail: {len(self.findings)} line(s) of the port synchronise with the host or '
                    'make a data-dependent shape (below, each with its fix)')
        refused = [b.batch_size for b in self.buckets if not b.supported]
        failed = [b.batch_size for b in self.buckets if b.captured is False]
        if refused:
            return f'support_cuda_graph refuses batch size(s) {refused}: those decode steps run eagerly'
        if failed:
            return f'capture failed for batch size(s) {failed} (reasons below)'
        if not self.buckets:
            return 'the source scan is clean (no bucket was asked: that needs a loaded model)'
        if not self.cuda:
            return ('no CUDA device here, so nothing was captured; what the CPU can check is clean '
                    '(support_cuda_graph answers True, no host synchronisation in the source)')
        return 'every bucket captured; replay matches eager'


def _flag_text(model) -> str:
    flag = getattr(model, 'support_cuda_graph', True)
    if callable(flag):
        return f'callable: {getattr(flag, "__qualname__", type(flag).__name__)}'
    return str(bool(flag))


def _cpu_rows(agent, batch_sizes: Sequence[int]) -> list[BucketRow]:
    """support_cuda_graph per bucket, asked with the inputs a graph runner would give it (no capture)."""
    from ..backends.cuda import CUDAGraphRunner
    from ..engine.cache_engine import CacheEngine
    cache = CacheEngine(agent.model_config, 2, 16, agent.device)
    runner = CUDAGraphRunner(agent.model, agent.ctx_mgr, agent.model_config, cache.kv_caches, max_blocks_per_seq=1,
                             scratch_block=0, capture_batch_sizes=batch_sizes)
    rows = []
    for bs in runner.batch_sizes:
        try:
            supports = runner.supports(bs)
        except Exception as e:  # noqa: BLE001 - a broken callable is a finding, not a crash of the view
            rows.append(BucketRow(bs, None, reason=f'support_cuda_graph raised {type(e).__name__}: {e}',
                                  fix='make it a bool, or a callable that accepts forward\'s keyword arguments'))
            continue
        row = BucketRow(bs, supports)
        if not supports:
            row.reason = 'the model answered support_cuda_graph = False for this step'
            row.fix = 'nothing to fix if intended; otherwise make support_cuda_graph return True'
        rows.append(row)
    return rows


def _cuda_rows(agent, batch_sizes: Sequence[int], seed: int = 0) -> list[BucketRow]:
    """Capture each bucket, then replay one decode step and run it eagerly on the same cache state."""
    import torch

    from ..engine.step_runner import StepRunner
    runner = StepRunner(agent, num_blocks=4 * max(batch_sizes) + 8, block_size=16)
    graphs = runner.capture_cuda_graphs(batch_sizes, max_blocks_per_seq=2)
    gen = torch.Generator().manual_seed(seed)
    vocab = agent.model_config.vocab_size
    rows = []
    for bs in sorted(graphs.results):
        r = graphs.results[bs]
        row = BucketRow(bs, r.supported, r.captured if r.supported else None, reason=r.reason, fix=r.fix)
        rows.append(row)
        if not r.captured:
            continue
        prompts = torch.randint(vocab, (bs, 5), generator=gen).tolist()
        seq_ids = runner.prefill(prompts).seq_ids
        inputs = runner.decode_inputs(seq_ids, torch.randint(vocab, (bs, ), generator=gen).tolist())
        eager = agent.get_logits(agent.forward(inputs, runner.cache.kv_caches))
        replay = graphs.decode(inputs).clone()
        row.replay_bitwise = bool(torch.equal(replay, eager))
        row.replay_max_abs = float((replay - eager).abs().max().item())
        runner.release(seq_ids)
    return rows


def _agent_and_graphs(target, custom_module_map, device, dtype):
    """(agent or None, engine graph runner or None, model or class) for any target the view accepts."""
    engine = getattr(target, 'engine', target)          # a Pipeline holds an Engine
    if hasattr(engine, 'runner') and hasattr(engine, 'agent'):
        return engine.agent, getattr(engine.runner, 'graphs', None), engine.agent.model
    if hasattr(target, 'model') and hasattr(target, 'model_config') and hasattr(target, 'ctx_mgr'):
        return target, None, target.model                  # a ModelAgent
    if isinstance(target, (str, bytes)) or hasattr(target, '__fspath__'):
        from ..engine.model_agent import ModelAgent
        if device in (None, 'auto'):
            import torch
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        agent = ModelAgent.from_pretrained(str(target), dtype=dtype, device=device,
                                           custom_module_map=custom_module_map)
        return agent, None, agent.model
    return None, None, target                              # a model or a model class: the scan only


def graph_eligibility(target, custom_module_map=None, batch_sizes: Sequence[int] = DEFAULT_BUCKETS,
                      device: str = 'auto', dtype: str = 'auto', report=None) -> GraphEligibility:
    """CUDA-graph eligibility of a port. `target`: a checkpoint path (with the port's custom_module_map), a
    ModelAgent, a Pipeline/Engine (its captured graphs are read back), or a model / model class (scan only).
    `report`: a ParityReport whose cuda_graph checks are quoted."""
    agent, engine_graphs, model = _agent_and_graphs(target, custom_module_map, device, dtype)
    cls = model if isinstance(model, type) else type(model)
    dev = str(agent.device) if agent is not None else 'no device (source scan only)'
    notes = [PREFILL_NOTE]
    if engine_graphs is not None:
        rows = [BucketRow(bs, r.supported, r.captured if r.supported else None, reason=r.reason, fix=r.fix)
                for bs, r in sorted(engine_graphs.results.items())]
        notes.append('buckets as the engine captured them at start-up (replay vs eager is not re-run here)')
    elif agent is None:
        rows = []
        notes.append('a model class or an unloaded model: only the source scan runs; pass a checkpoint path (and '
                     'custom_module_map) to ask support_cuda_graph per bucket')
    elif agent.device.type == 'cuda':
        rows = _cuda_rows(agent, batch_sizes)
    else:
        rows = _cpu_rows(agent, batch_sizes)
        notes.append(f'no CUDA device ({dev}): capture and replay-versus-eager need one. Shown instead: what '
                     'support_cuda_graph answers for each bucket, and a scan of the port\'s source for what '
                     'breaks capture.')
    refusal = getattr(model, 'cuda_graph_refusal', None)    # the transformers fallback says why per model
    if refusal:
        for row in rows:
            if row.supported is False:
                row.reason = refusal
                row.fix = ('port the modules whose code breaks capture (progressive porting: lmdp.fallback.hybrid), '
                           'or serve the model eagerly')
        notes.append(f'transformers fallback: {refusal}')
    for check in getattr(report, 'checks', None) or []:
        if check.name.startswith('cuda_graph'):
            notes.append(f'parity {check.id}: {check.status}: {check.detail}')
    return GraphEligibility(f'{cls.__module__}.{cls.__qualname__}', dev, _flag_text(model), rows,
                            scan_host_syncs(model), notes)
