"""The transformers side: each prompt alone, prefill then decode steps through its own cache, eager attention."""
import importlib.util
import inspect
import time
from typing import List, Optional, Sequence, Tuple

import torch

from lmdp.quiet import quiet_transformers

from .capture import Recorder
from .capture_set import CaptureSet, PhaseRows
from .taps import Site, TapResolver


def load_reference(model_path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    kwargs = dict(dtype=dtype, attn_implementation='eager')
    if torch.device(device).type == 'cuda' and importlib.util.find_spec('accelerate') is not None:
        kwargs['device_map'] = str(device)   # straight onto the card: no float32 copy of the model in host RAM
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return model.to(device).eval()


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name is deprecated, not gone)
    return 'cache' if 'cache' in inspect.signature(model.forward).parameters else 'past_key_values'


@torch.inference_mode()
def run_reference(model, hf_config, prompts: Sequence[Sequence[int]], decode_steps: int, taps,
                  tokens: Optional[List[List[int]]] = None, overrides=None,
                  progress=None) -> Tuple[CaptureSet, List[List[int]]]:
    """Captures of every tap, and the tokens fed in decode.

    With `tokens` None the model decodes greedily and returns its own `decode_steps + 1` tokens per prompt (the
    last one is predicted by the last decode step); otherwise it is teacher-forced on `tokens`.
    """
    start = time.perf_counter()
    sites = TapResolver(model, 'reference', hf_config, overrides).resolve(taps)
    capture = CaptureSet(missing={t: why for t, why in sites.items() if not isinstance(why, Site)})
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    prefill, decode = PhaseRows(len(prompts)), PhaseRows(len(prompts))
    used: List[List[int]] = []
    with Recorder(model, {t: s for t, s in sites.items() if isinstance(s, Site)}) as recorder:
        for i, prompt in enumerate(prompts):
            cache = _new_cache(model)
            ids = torch.tensor([list(prompt)], device=device)
            out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
            for tap, rows in recorder.take().items():
                prefill.add(tap, i, rows)
            logits = out.logits[0].float().clone()
            prefill.add('logits', i, logits)
            seq_tokens = [int(logits[-1].argmax())] if tokens is None else list(tokens[i])
            if progress:
                progress.update(1)
            for step in range(decode_steps):
                ids = torch.tensor([[seq_tokens[step]]], device=device)
                out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
                for tap, rows in recorder.take().items():
                    decode.add(tap, i, rows)
                row = out.logits[0].float().clone()
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
