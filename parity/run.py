"""`compare(model_path, ...)`: one parity run, from checkpoint folder to ParityReport.

1. transformers float32 runs each prompt alone (prefill, then greedy decode through its own cache): the truth,
   and the tokens every model is fed in decode.
2. In a low-precision run, transformers in the test dtype runs the same tokens: the noise floor.
3. The lmdp port prefills all prompts packed in one step and decodes them together through the paged cache.
4. Every tap of every phase is diffed against (1) and judged by `noise_floor`; then the whole-model checks.

Models are loaded one at a time and freed before the next, so a run needs memory for one model plus the
captured activations. `run_references` does steps 1-2 alone; pass its result as `references=` to compare several
ports (or fixes of one) against one reference run.
"""
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import checks
from .capture_set import PHASES, CaptureSet
from .metrics import diff
from .noise_floor import rule_text, tolerance
from .port import load_port, run_port
from .progress import Progress
from .prompts import PromptSpec, make_prompts
from .reference import load_reference, run_reference
from .report import ParityReport, TapResult
from .taps import Tap, tap_list


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


@dataclass
class References:
    """The transformers side of a run, reusable across ports: float32 captures, test-dtype captures, tokens."""
    model_path: str
    hf_config: object
    dtype: torch.dtype
    device: str
    prompts: List[List[int]]
    decode_steps: int
    taps: List[Tap]
    ref32: CaptureSet
    ref_dt: Optional[CaptureSet]
    tokens: List[List[int]]            # float32 greedy tokens per prompt, decode_steps + 1 of them
    timings: Dict[str, float] = field(default_factory=dict)


def run_references(model_path: str, dtype='float32', device='auto', prompts: PromptSpec = 3, decode_steps: int = 4,
                   qkv_taps: bool = False, tap_overrides: Optional[dict] = None, seed: int = 0,
                   progress=None) -> References:
    """Steps 1-2 of `compare` (see the module docstring)."""
    from transformers import AutoConfig
    model_path = str(model_path)
    device = resolve_device(device)
    hf_config = AutoConfig.from_pretrained(model_path)
    torch_dtype = _dtype(dtype, hf_config)
    vocab = (getattr(hf_config, 'text_config', None) or hf_config).vocab_size
    prompt_ids = make_prompts(prompts, vocab, model_path, seed)
    taps = tap_list(_num_layers(hf_config), qkv=qkv_taps)
    timings = {}
    passes = [torch.float32] + ([torch_dtype] if torch_dtype != torch.float32 else [])
    runs, tokens = [], None
    for run_dtype in passes:
        name = str(run_dtype).replace('torch.', '')
        if progress:
            progress.stage(f'loading transformers {name}')
        start = time.perf_counter()
        model = load_reference(model_path, run_dtype, device)
        timings[f'load_reference_{name}'] = time.perf_counter() - start
        if progress:
            progress.update(1)
            progress.stage(f'running transformers {name}')
        capture, used = run_reference(model, hf_config, prompt_ids, decode_steps, taps, tokens=tokens,
                                      overrides=tap_overrides, progress=progress)
        timings[f'run_reference_{name}'] = capture.seconds
        tokens = tokens or used
        runs.append(capture)
        del model
        _free(device)
    return References(model_path, hf_config, torch_dtype, device, prompt_ids, decode_steps, taps, runs[0],
                      runs[1] if len(runs) > 1 else None, tokens, timings)


def _compare_taps(refs: References, port: CaptureSet) -> List[TapResult]:
    """Every tap in 'prefill' and 'decode' (all steps pooled), then each decode step alone ('decode.0', ...):
    the per-step phases are a finer view for the notebooks' phase selector; verdicts come from the pooled ones."""
    lengths = [len(p) for p in refs.prompts]
    results = _compare_phase(refs, port, 'prefill', [0] * len(lengths))
    if refs.decode_steps:
        results += _compare_phase(refs, port, 'decode', lengths)
    if refs.decode_steps > 1:
        for k in range(refs.decode_steps):
            step = lambda rows, k=k: None if rows is None else [x[k:k + 1] for x in rows]  # noqa: E731
            results += _compare_phase(refs, port, f'decode.{k}', [n + k for n in lengths], source='decode',
                                      select=step)
    return results


def _compare_phase(refs: References, port: CaptureSet, phase: str, starts, source: str = None,
                   select=lambda rows: rows) -> List[TapResult]:
    results = []
    source = source or phase
    for tap in refs.taps:
        r, p = select(refs.ref32.get(source, tap.name)), select(port.get(source, tap.name))
        d = select(refs.ref_dt.get(source, tap.name)) if refs.ref_dt is not None else None
        base = dict(phase=phase, tap=tap.name, kind=tap.kind, layer=tap.layer)
        if r is None or p is None or (refs.ref_dt is not None and d is None):
            why = (refs.ref32.missing.get(tap.name) or port.missing.get(tap.name)
                   or f'no capture for {tap.name} in {phase}')
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
        floor_m = diff(d, r, starts) if d is not None else None
        tol = tolerance(refs.dtype, floor_m.rel_l2 if floor_m else None)
        results.append(TapResult(**base, port=port_m, floor=floor_m, tolerance=tol,
                                 passed=bool(port_m.rel_l2 <= tol)))
    return results


def compare(model_path: str, dtype='float32', device='auto', prompts: PromptSpec = 3, decode_steps: int = 4,
            custom_module_map=None, block_size: int = 16, qkv_taps: bool = False,
            tap_overrides: Optional[dict] = None, seed: int = 0, progress: bool = False,
            references: Optional[References] = None, report_dir: Optional[str] = None) -> ParityReport:
    """Diff the lmdp port of `model_path` against transformers, tap by tap; see the module docstring.

    dtype: float32 | bfloat16 | float16 | auto (the checkpoint's). prompts: a count of random prompts, a file, or
    token-id lists. custom_module_map: a dict {architecture: class or dotted path} or a .py file defining
    MODULE_MAP (the port under test). qkv_taps: also compare q/k/v projections. tap_overrides:
    {'reference' | 'port': {kind: module name}}. report_dir: write report.json and report.html there.
    references: a `run_references` result to reuse; it fixes dtype, device, prompts, decode steps and taps.
    """
    start = time.perf_counter()
    if references is not None and os.path.realpath(str(model_path)) != os.path.realpath(references.model_path):
        raise ValueError(f'references= were run on {references.model_path}, not on {model_path}')
    device = resolve_device(device if references is None else references.device)
    if references is not None:
        n_prompts = len(references.prompts)
    else:
        n_prompts = int(prompts) if str(prompts).isdigit() else len(prompts) if isinstance(prompts, list) else 8
    steps = references.decode_steps if references else decode_steps
    passes = 0 if references else (1 if str(dtype) in ('float32', 'torch.float32') else 2)
    bar = Progress(passes * (1 + n_prompts * (1 + steps)) + 3 + steps, enabled=progress)
    try:
        if references is None:
            references = run_references(model_path, dtype, device, prompts, decode_steps, qkv_taps, tap_overrides,
                                        seed, progress=bar)
        refs = references
        timings = dict(refs.timings)
        bar.stage('loading the lmdp port')
        t0 = time.perf_counter()
        agent, coverage = load_port(refs.model_path, refs.dtype, device, custom_module_map)
        timings['load_port'] = time.perf_counter() - t0
        bar.update(1)
        bar.stage('running the lmdp port')
        port = run_port(agent, refs.hf_config, refs.prompts, refs.tokens, refs.decode_steps, refs.taps, block_size,
                        tap_overrides, progress=bar)
        from lmdp.fallback.hybrid import tap_impls
        impls = tap_impls(agent.model, refs.hf_config, refs.taps, tap_overrides)
        timings['run_port'] = port.seconds
        if port.graph_replay is not None:
            timings['cuda_graph'] = port.graph_replay.seconds
        port_class = type(agent.model).__module__ + '.' + type(agent.model).__qualname__
        del agent
        _free(device)
        bar.stage('diffing')
        t0 = time.perf_counter()
        report = _build_report(refs, port, coverage, port_class, device)
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


def _build_report(refs: References, port: CaptureSet, coverage, port_class: str, device: str) -> ParityReport:
    arch = (getattr(refs.hf_config, 'architectures', None) or ['?'])[0]
    report = ParityReport(model_path=refs.model_path, architecture=arch, port_class=port_class,
                          dtype=str(refs.dtype).replace('torch.', ''), device=device,
                          prompt_lengths=[len(p) for p in refs.prompts], decode_steps=refs.decode_steps,
                          rule=rule_text(refs.dtype), reference_tokens=refs.tokens)
    report.taps = _compare_taps(refs, port)
    for phase in PHASES:
        if port.get(phase, 'logits') is not None and refs.ref32.get(phase, 'logits') is not None:
            report.checks += checks.logprob_checks(refs.ref32, port, refs.ref_dt, refs.dtype, phase)
    greedy = checks.greedy_check(refs.ref32, port, refs.ref_dt, refs.dtype, refs.tokens)
    report.port_tokens = greedy.data['port_tokens']
    report.checks += [greedy, checks.coverage_check(coverage)]
    # a padded replay may differ from eager by rounding alone: as much as the port may differ from float32
    logits_tap = report.tap('decode', 'logits') or report.tap('prefill', 'logits')
    graph_tol = logits_tap.tolerance if logits_tap is not None else tolerance(refs.dtype, None)
    report.checks += checks.cuda_graph_checks(device, port.graph_replay, graph_tol)
    return report
