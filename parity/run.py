"""`compare(model_path, ...)`: one parity run, from checkpoint folder to ParityReport.

1. transformers in the truth's dtype (float32 for a bfloat16/float16 run, float64 for a float32 run) runs each
   prompt alone (prefill, then greedy decode through its own cache): the truth, and the tokens every model is fed
   in decode.
2. transformers in the test dtype runs the same tokens twice: end to end, and layer-local (every layer, and the
   MLP half of every layer, starts from the truth's stream). These are the noise floors of the two views.
3. The lmdp port prefills all prompts packed in one step and decodes them together through the paged cache, with
   the engine's own step path; also twice, end to end and layer-local.
4. Every tap of every phase is diffed against (1) in both views and judged by `noise_floor` against the floor of
   its view; the local view decides pass/fail and the first divergence. Then the whole-model checks.

Models are loaded one at a time and freed before the next, so a run needs memory for one model plus the
captured activations. `run_references` does steps 1-2 alone; pass its result as `references=` to compare several
ports (or fixes of one) against one reference run.
"""
import gc
import os
import time
from dataclasses import dataclass, field

import torch

from . import checks
from .capture_set import PHASES, CaptureSet
from .metrics import diff
from .noise_floor import judge, rule_text, tolerance
from .options import check_compare
from .progress import Progress
from .prompts import PromptSpec, make_prompts
from .quantized import quantization_error, reference_checkpoint
from .reference import run_reference
from .report import CheckResult, ParityReport, TapResult
from .routing import present_router_taps, routing_from_captures
from .routing_checks import RoutedPositions, routing_check
from .taps import Tap, reference_taps
from .tensor_parallel import run_port_ranks


def resolve_device(device: str = 'auto') -> str:
    if device in (None, 'auto'):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return str(device)


def _dtype(dtype, hf_config) -> torch.dtype:
    from lmdp.config import resolve_dtype
    return resolve_dtype(dtype, hf_config)


def _free(device: str):
    gc.collect()
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()


def _num_layers(hf_config) -> int:
    cfg = getattr(hf_config, 'text_config', None) or hf_config
    return int(cfg.num_hidden_layers)


def truth_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference the test dtype is judged against: float64 for float32, float32 for the 16-bit types."""
    return torch.float64 if dtype == torch.float32 else torch.float32


@dataclass
class References:
    """The transformers side of a run, reusable across ports: the truth, the test-dtype floors, the tokens."""
    model_path: str
    hf_config: object
    dtype: torch.dtype
    device: str
    prompts: list[list[int]]
    decode_steps: int
    taps: list[Tap]
    truth: CaptureSet                  # transformers in truth_dtype(dtype), end to end
    floor: CaptureSet                  # transformers in dtype, end to end
    floor_local: CaptureSet            # transformers in dtype, every layer fed the truth's input
    tokens: list[list[int]]            # the truth's greedy tokens per prompt, decode_steps + 1 of them
    timings: dict[str, float] = field(default_factory=dict)
    quantization: dict | None = None   # a quantised checkpoint's own error (parity/quantized.py)
    # a mixture of experts' routers (parity/routing.py): captured beside `taps`, judged by the 'routing' check
    router_taps: list[Tap] = field(default_factory=list)

    @property
    def captured_taps(self) -> list[Tap]:
        return list(self.taps) + list(self.router_taps)

    @property
    def ref32(self) -> CaptureSet:     # the name the whole-model checks know the truth by
        return self.truth


def run_references(model_path: str, dtype='float32', device='auto', prompts: PromptSpec = 3, decode_steps: int = 4,
                   qkv_taps: bool = True, tap_overrides: dict | None = None, seed: int = 0,
                   progress=None) -> References:
    """Steps 1-2 of `compare` (see the module docstring). q/k/v taps are always on; `qkv_taps` is kept for old
    callers."""
    from transformers import AutoConfig
    model_path = str(model_path)
    device = resolve_device(device)
    hf_config = AutoConfig.from_pretrained(model_path)
    torch_dtype = _dtype(dtype, hf_config)
    vocab = (getattr(hf_config, 'text_config', None) or hf_config).vocab_size
    prompt_ids = make_prompts(prompts, vocab, model_path, seed)
    timings = {}
    reference = reference_checkpoint(model_path)    # a quantised checkpoint: its dequantised copy

    def load(run_dtype):
        name = str(run_dtype).replace('torch.', '')
        if progress:
            progress.stage(f'loading transformers {name}')
        t0 = time.perf_counter()
        model = reference.load(run_dtype, device)
        timings[f'load_reference_{name}'] = time.perf_counter() - t0
        if progress:
            progress.update(1)
            progress.stage(f'running transformers {name}')
        return model, name

    model, name = load(truth_dtype(torch_dtype))
    taps = reference_taps(model, hf_config, tap_overrides)
    router = present_router_taps(model, hf_config, tap_overrides)
    truth, tokens = run_reference(model, hf_config, prompt_ids, decode_steps, taps + router, overrides=tap_overrides,
                                  progress=progress)
    timings[f'run_reference_{name}'] = truth.seconds
    del model
    _free(device)
    quantization = quantization_error(reference, hf_config, prompt_ids, decode_steps, taps, tokens, truth,
                                      truth_dtype(torch_dtype), device, tap_overrides)
    _free(device)
    model, name = load(torch_dtype)
    floor, _ = run_reference(model, hf_config, prompt_ids, decode_steps, taps + router, tokens=tokens,
                             overrides=tap_overrides, progress=progress)
    floor_local, _ = run_reference(model, hf_config, prompt_ids, decode_steps, taps + router, tokens=tokens,
                                   overrides=tap_overrides, progress=progress, truth=truth)
    timings[f'run_reference_{name}'] = floor.seconds + floor_local.seconds
    del model
    _free(device)
    return References(model_path, hf_config, torch_dtype, device, prompt_ids, decode_steps, taps, truth, floor,
                      floor_local, tokens, timings, quantization=quantization, router_taps=router)


VIEWS = ('local', 'accumulated')


def _compare_taps(refs: References, port: CaptureSet, port_local: CaptureSet) -> list[TapResult]:
    """Every tap in 'prefill' and 'decode' (all steps pooled), then each decode step alone ('decode.0', ...), in
    both views: the per-step phases are a finer view for the notebooks' phase selector; verdicts come from the
    pooled phases' local view."""
    lengths = [len(p) for p in refs.prompts]
    results = []
    for view, ours, floor in (('local', port_local, refs.floor_local), ('accumulated', port, refs.floor)):
        results += _compare_phase(refs, ours, floor, view, 'prefill', [0] * len(lengths))
        if refs.decode_steps:
            results += _compare_phase(refs, ours, floor, view, 'decode', lengths)
        if refs.decode_steps > 1:
            for k in range(refs.decode_steps):
                step = lambda rows, k=k: None if rows is None else [x[k:k + 1] for x in rows]  # noqa: E731
                results += _compare_phase(refs, ours, floor, view, f'decode.{k}', [n + k for n in lengths],
                                          source='decode', select=step)
    return results


def _compare_phase(refs: References, port: CaptureSet, floor: CaptureSet, view: str, phase: str, starts,
                   source: str = None, select=lambda rows: rows) -> list[TapResult]:
    results = []
    source = source or phase
    for tap in refs.taps:
        r, p = select(refs.truth.get(source, tap.name)), select(port.get(source, tap.name))
        d = select(floor.get(source, tap.name))
        base = dict(phase=phase, tap=tap.name, kind=tap.kind, layer=tap.layer, view=view)
        if r is None or p is None or d is None:
            why = (refs.truth.missing.get(tap.name) or port.missing.get(tap.name) or floor.missing.get(tap.name)
                   or f'the port never ran the module of tap {tap.name} in {phase}')
            results.append(TapResult(**base, port=None, floor=None, tolerance=tolerance(refs.dtype, None),
                                     passed=False, error=why))
            continue
        if tap.kind == 'logits':  # a port may pad its vocabulary; the extra columns are not compared
            p = [x[:, :y.size(-1)] for x, y in zip(p, r)]
        try:
            port_m = diff(p, r, starts)
        except ValueError as e:
            results.append(TapResult(**base, port=None, floor=None, tolerance=tolerance(refs.dtype, None),
                                     passed=False, error=f'the port and transformers disagree on shape: {e}'))
            continue
        floor_m = diff(d, r, starts)
        results.append(judge(refs.dtype, port_m, floor_m, **base))
    return results


def compare(model_path: str, dtype='float32', device='auto', prompts: PromptSpec = 3, decode_steps: int = 4,
            custom_module_map=None, block_size: int = 16, qkv_taps: bool = False,
            tap_overrides: dict | None = None, seed: int = 0, progress: bool = False,
            references: References | None = None, report_dir: str | None = None, tp: int = 1) -> ParityReport:
    """Diff the lmdp port of `model_path` against transformers, tap by tap; see the module docstring.

    dtype: float32 | bfloat16 | float16 | auto (the checkpoint's). prompts: a count of random prompts, a file, or
    token-id lists. custom_module_map: a dict {architecture: class or dotted path} or a .py file defining
    MODULE_MAP (the port under test). qkv_taps: kept for old callers (q/k/v are always compared). tap_overrides:
    {'reference' | 'port': {kind: module name}}. report_dir: write report.json and report.html there.
    references: a `run_references` result to reuse; it fixes dtype, device, prompts, decode steps and taps.
    tp: tensor-parallel ranks the port runs on (parity/tensor_parallel.py); the reference runs on this process.
    """
    start = time.perf_counter()
    check_compare(model_path, dtype=dtype, device=device, prompts=prompts, decode_steps=decode_steps,
                  block_size=block_size, report_dir=report_dir, custom_module_map=custom_module_map, qkv_taps=qkv_taps,
                  tp=tp)
    if references is not None and os.path.realpath(str(model_path)) != os.path.realpath(references.model_path):
        raise ValueError(f'references= were run on {references.model_path}, not on {model_path}')
    device = resolve_device(device if references is None else references.device)
    if references is not None:
        n_prompts = len(references.prompts)
    else:
        n_prompts = int(prompts) if str(prompts).isdigit() else len(prompts) if isinstance(prompts, list) else 8
    steps = references.decode_steps if references else decode_steps
    # references: two loads and three runs of every prompt; the port: a load, two runs, the diff
    reference_work = 0 if references else 2 + 3 * n_prompts * (1 + steps)
    bar = Progress(reference_work + 3 + 2 * (1 + steps), enabled=progress)
    try:
        if references is None:
            references = run_references(model_path, dtype, device, prompts, decode_steps, qkv_taps, tap_overrides,
                                        seed, progress=bar)
        refs = references
        timings = dict(refs.timings)
        stage = 'running the lmdp port' + (f' on {tp} tensor-parallel ranks' if tp > 1 else '')
        bar.stage(stage)
        port, port_local, coverage, port_class, impls = run_port_ranks(tp, refs, device, custom_module_map,
                                                                        block_size, tap_overrides, progress=bar)
        timings['load_port'] = port.load_seconds
        timings['run_port'] = port.seconds + port_local.seconds
        if port.graph_replay is not None:
            timings['cuda_graph'] = port.graph_replay.seconds
        _free(device)
        bar.stage('diffing')
        t0 = time.perf_counter()
        report = _build_report(refs, port, port_local, coverage, port_class, device)
        report.module_impls = impls
        timings['diff'] = time.perf_counter() - t0
        bar.update(1)
    finally:
        bar.close()
    timings['total'] = time.perf_counter() - start
    report.timings = timings
    if report_dir:
        report.save(report_dir)
    return report


def _routing(refs: References, port: CaptureSet, port_local: CaptureSet, phases, report: ParityReport):
    """A mixture of experts' 'routing' checks (layer-local view) into `report`, and the positions the whole-model
    checks forgive for near-tie flips of the end-to-end run (parity/routing_checks.py); None for a dense model."""
    if not refs.router_taps:
        return None
    lengths = [len(p) for p in refs.prompts]
    accumulated = {phase: routing_from_captures(refs.truth, port, refs.floor, refs.hf_config, phase)
                   for phase in phases}
    for phase in phases:
        local = routing_from_captures(refs.truth, port_local, refs.floor_local, refs.hf_config, phase)
        if local.layers:
            report.checks.append(routing_check(local, lengths, refs.decode_steps, accumulated[phase]))
        else:
            why = '; '.join(f'{t}: {w}' for t, w in list(local.missing.items())[:3]) or 'no router logits captured'
            report.checks.append(CheckResult('routing', phase, 'skipped', f'the routers could not be compared ({why})'))
    return RoutedPositions.from_routing(accumulated, lengths, refs.decode_steps)


def _build_report(refs: References, port: CaptureSet, port_local: CaptureSet, coverage, port_class: str,
                  device: str) -> ParityReport:
    arch = (getattr(refs.hf_config, 'architectures', None) or ['?'])[0]
    report = ParityReport(model_path=refs.model_path, architecture=arch, port_class=port_class,
                          dtype=str(refs.dtype).replace('torch.', ''), device=device,
                          prompt_lengths=[len(p) for p in refs.prompts], decode_steps=refs.decode_steps,
                          rule=rule_text(refs.dtype), reference_tokens=refs.tokens)
    report.taps = _compare_taps(refs, port, port_local)
    report.quantization = refs.quantization
    phases = [p for p in PHASES if port.get(p, 'logits') is not None and refs.truth.get(p, 'logits') is not None]
    routed = _routing(refs, port, port_local, phases, report)
    for phase in phases:
        report.checks += checks.logprob_checks(refs.truth, port, refs.floor, refs.dtype, phase, routed)
    greedy = checks.greedy_check(refs.truth, port, refs.floor, refs.dtype, refs.tokens, routed)
    report.port_tokens = greedy.data['port_tokens']
    report.checks += [greedy, checks.coverage_check(coverage)]
    # a padded replay may differ from eager by rounding alone: as much as the port may differ from float32
    logits_tap = report.tap('decode', 'logits') or report.tap('prefill', 'logits')
    graph_tol = logits_tap.tolerance if logits_tap is not None else tolerance(refs.dtype, None)
    report.checks += checks.cuda_graph_checks(device, port.graph_replay, graph_tol)
    return report
