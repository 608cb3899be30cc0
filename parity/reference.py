"""The transformers side: each prompt alone, prefill then decode steps through its own cache, eager attention."""
import importlib.util
import inspect
import time
from collections.abc import Sequence

import torch

from lmdp.quiet import quiet_transformers

from .capture import Boundary, LocalInputs, Recorder
from .capture_set import CaptureSet, PhaseRows
from .local import boundary_taps, call_values
from .taps import Site, TapResolver, reference_taps


def load_reference(model_path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    kwargs = dict(dtype=dtype, attn_implementation='eager')
    if torch.device(device).type == 'cuda' and importlib.util.find_spec('accelerate') is not None:
        kwargs['device_map'] = str(device)   # straight onto the card: no float32 copy of the model in host RAM
    if dtype == torch.float64:
        # mixture-of-experts layers default to grouped matmuls that have no float64 kernel; the plain loop over
        # experts is the reference anyway
        kwargs['experts_implementation'] = 'eager'
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        except (TypeError, ValueError) as e:     # a transformers without experts_implementation
            if 'experts_implementation' not in kwargs or 'experts' not in str(e):
                raise
            kwargs.pop('experts_implementation')
            model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return model.to(device).eval()


def checkpoint_taps(model_path: str, overrides=None):
    """The taps a run of this checkpoint has (its transformers model's structure, built on the meta device: no
    weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_config = AutoConfig.from_pretrained(model_path)
    with quiet_transformers(), torch.device('meta'):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation='eager')
    return reference_taps(model, hf_config, overrides)


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name is deprecated, not gone)
    return 'cache' if 'cache' in inspect.signature(model.forward).parameters else 'past_key_values'


def recorder_for(model, side: str, hf_config, taps, overrides=None, local: LocalInputs | None = None):
    """(Recorder, CaptureSet with the taps this model can't give) for one side of a run."""
    resolver = TapResolver(model, side, hf_config, overrides)
    sites = resolver.resolve(taps)
    capture = CaptureSet(missing={t: why for t, why in sites.items() if not isinstance(why, Site)})
    names = {t.name for t in taps}
    layers = resolver.layers()
    boundaries = []
    if layers is not None:
        for i in range(resolver.num_layers()):
            end = resolver.branch_end(f'{layers}.{i}') if f'layers.{i}.mid' in names else None
            boundaries.append(Boundary(f'{layers}.{i}', end))
    recorder = Recorder(model, {t: s for t, s in sites.items() if isinstance(s, Site)}, boundaries,
                        final_norm=resolver._find('final_norm'), local=local)
    return recorder, capture


@torch.inference_mode()
def run_reference(model, hf_config, prompts: Sequence[Sequence[int]], decode_steps: int, taps,
                  tokens: list[list[int]] | None = None, overrides=None, progress=None,
                  truth: CaptureSet | None = None) -> tuple[CaptureSet, list[list[int]]]:
    """Captures of every tap, and the tokens fed in decode.

    With `tokens` None the model decodes greedily and returns its own `decode_steps + 1` tokens per prompt (the
    last one is predicted by the last decode step); otherwise it is teacher-forced on `tokens`. With `truth` (the
    truth's captures of the same run), every layer starts from the truth's stream: the layer-local view.
    """
    start = time.perf_counter()
    local = LocalInputs() if truth is not None else None
    sources = boundary_taps(taps) if truth is not None else {}
    recorder, capture = recorder_for(model, 'reference', hf_config, taps, overrides, local)
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    prefill, decode = PhaseRows(len(prompts)), PhaseRows(len(prompts))
    used: list[list[int]] = []
    with recorder:
        for i, prompt in enumerate(prompts):
            cache = _new_cache(model)
            ids = torch.tensor([list(prompt)], device=device)
            if local is not None:
                local.set(call_values(truth, sources, 'prefill', [i], device=device))
            recorder.expect(len(prompt))
            out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
            for tap, rows in recorder.take().items():
                prefill.add(tap, i, rows)
            logits = out.logits[0].float().clone() if out.logits.dtype != torch.float64 else out.logits[0].clone()
            prefill.add('logits', i, logits)
            seq_tokens = [int(logits[-1].argmax())] if tokens is None else list(tokens[i])
            if progress:
                progress.update(1)
            for step in range(decode_steps):
                ids = torch.tensor([[seq_tokens[step]]], device=device)
                if local is not None:
                    local.set(call_values(truth, sources, 'decode', [i], step, device=device))
                recorder.expect(1)
                out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
                for tap, rows in recorder.take().items():
                    decode.add(tap, i, rows)
                row = out.logits[0].clone() if out.logits.dtype == torch.float64 else out.logits[0].float().clone()
                decode.add('logits', i, row)
                if tokens is None:
                    seq_tokens.append(int(row[-1].argmax()))
                if progress:
                    progress.update(1)
            used.append(seq_tokens)
            del cache
    capture.taps = {'prefill': prefill.done(), 'decode': decode.done() if decode_steps else {}}
    capture.seconds = time.perf_counter() - start
    return capture, used
