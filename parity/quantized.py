"""Parity of a quantised checkpoint: transformers runs the *dequantised* weights, so that the harness measures the
port's error apart from quantisation's.

`reference_checkpoint(model_path)` gives what transformers loads for a run:

- an unquantised checkpoint: the folder itself;
- an FP8 (128x128 block) or AWQ checkpoint: a copy written to a temporary folder with every quantised weight
  dequantised exactly (float32: codes x scales, (codes - zeros) x scales) and `quantization_config` removed. This
  needs nothing of transformers' own quantisation support (AWQ there needs packages neither machine has; FP8 on a
  GPU would run transformers' own FP8 kernels, not the dequantised weights).

FP8 linear layers quantise their *input* at run time as well (per token, groups of 128 features, W8A8); that is
part of the model's arithmetic, not of the port's, so the reference applies the same rounding with a forward
wrapper around each of those layers' forward (`lmdp.kernels.quant.fp8_fake_quant`). Mixture-of-experts weights run
against unquantised activations (W8A16) on both sides, so they need no hook.

The quantisation error itself, clearly apart from the port's: when the checkpoint records the unquantised folder
it was made from (`lmdp quantize` writes `lmdp_quantize.json`), `quantization_error` runs transformers on that
original in the truth's dtype, teacher-forced on the same tokens, and measures every tap of it against the
dequantised reference ("original vs dequantised reference").
"""
import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from lmdp.kernels.quant import awq_unpack, fp8_block_dequant, fp8_fake_quant
from lmdp.quant_config import QuantConfig, parse_quant_config

ACT_QUANT_FILE = 'lmdp_fp8_act_quant.json'     # in the dequantised copy: the layers whose input is quantised
_COPIES: dict[tuple, 'ReferenceCheckpoint'] = {}


@dataclass
class ReferenceCheckpoint:
    """What transformers loads for a parity run of `model_path`."""
    model_path: str
    path: str                                   # model_path, or its dequantised copy
    scheme: QuantConfig | None = None
    act_quant_modules: list[str] = field(default_factory=list)
    source: str | None = None                # the unquantised checkpoint model_path was made from, if known

    def load(self, dtype: torch.dtype, device) -> torch.nn.Module:
        from .reference import load_reference
        model = load_reference(self.path, dtype, device)
        add_fp8_input_rounding(model, self.act_quant_modules)
        return model

    def describe(self) -> str:
        if self.scheme is None:
            return 'unquantised'
        act = f'; inputs of {len(self.act_quant_modules)} FP8 layers rounded per token group of 128' \
            if self.act_quant_modules else ''
        return f'{self.scheme.label}: transformers runs the dequantised weights ({self.path}){act}'


def add_fp8_input_rounding(model: torch.nn.Module, modules: list[str]):
    """Round the input of each named layer through FP8 per token group of 128, as lmdp's FP8 layers do."""
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise RuntimeError(f'the FP8 layer {name} of the checkpoint is no module of the transformers model '
                               f'{type(model).__name__}: the reference could not round its input as lmdp does') from e
        # inside forward, not a pre-hook: the harness's taps hook the same module and must see its real input
        module.forward = _rounding_input(module.forward)


def _rounding_input(forward):
    def rounded(x, *args, **kwargs):
        return forward(fp8_fake_quant(x), *args, **kwargs)
    return rounded


def reference_checkpoint(model_path: str) -> ReferenceCheckpoint:
    """The folder transformers should load for `model_path`: itself, or (quantised) a dequantised copy made once
    per process and deleted at exit."""
    from lmdp.hf_config import read_config_dict
    from lmdp.quantize import quantize_source
    model_path = str(model_path)
    scheme = parse_quant_config(read_config_dict(model_path).get('quantization_config'),
                                f'config.json in {model_path!r}')
    if scheme is None:
        return ReferenceCheckpoint(model_path, model_path)
    config = os.path.join(model_path, 'config.json')
    key = (os.path.realpath(model_path), os.path.getmtime(config))
    if key not in _COPIES:
        out = tempfile.mkdtemp(prefix='lmdp-dequantized-')
        atexit.register(shutil.rmtree, out, True)
        modules = write_dequantized(model_path, out)
        _COPIES[key] = ReferenceCheckpoint(model_path, out, scheme, modules, quantize_source(model_path))
    return _COPIES[key]


def _dequantize_file(tensors: dict[str, torch.Tensor], method: str) -> tuple:
    """(tensors with quantised weights replaced by float32 `.weight`s, the dense FP8 layers' module names)."""
    out, act = {}, []
    for name, t in tensors.items():
        if method == 'fp8' and name.endswith('.weight_scale_inv'):
            continue
        if method == 'awq' and name.endswith(('.qzeros', '.scales')):
            continue
        if method == 'fp8' and name.endswith('.weight') and t.dtype == torch.float8_e4m3fn:
            prefix = name[:-len('.weight')]
            scale = tensors.get(prefix + '.weight_scale_inv')
            if scale is None:
                raise ValueError(f'{name} is FP8 but the checkpoint has no {prefix}.weight_scale_inv')
            out[name] = fp8_block_dequant(t, scale).contiguous()
            if '.experts.' not in name:       # experts multiply unquantised activations (W8A16)
                act.append(prefix)
        elif method == 'awq' and name.endswith('.qweight'):
            prefix = name[:-len('.qweight')]
            codes = awq_unpack(t).float()                                      # [K, N]
            zeros = awq_unpack(tensors[prefix + '.qzeros']).float()            # [K / G, N]
            scales = tensors[prefix + '.scales'].float()
            group = codes.size(0) // scales.size(0)
            w = (codes - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
            out[prefix + '.weight'] = w.t().contiguous()
        else:
            out[name] = t
    return out, act


def write_dequantized(model_path: str, out_dir: str) -> list[str]:
    """Write `model_path` with its quantised weights dequantised (float32) into `out_dir`; returns the names of
    the FP8 layers whose input the reference must round (written to ACT_QUANT_FILE too)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lmdp.hf_config import read_config_dict
    from lmdp.weight_loader import scan_checkpoint
    config = read_config_dict(model_path)
    scheme = parse_quant_config(config.get('quantization_config'), f'config.json in {model_path!r}')
    if scheme is None:
        raise ValueError(f'{model_path!r} is not quantised')
    for f in os.listdir(model_path):
        src = os.path.join(model_path, f)
        if os.path.isfile(src) and not f.endswith('.safetensors') and f not in ('config.json',
                                                                                 'model.safetensors.index.json'):
            shutil.copy(src, os.path.join(out_dir, f))
    manifest = scan_checkpoint(model_path)
    index, act = {}, []
    # a layer's tensors may sit in different shards: read each layer's companions wherever they are
    handles = {}
    try:
        for path in manifest.files:
            handles[path] = safe_open(path, framework='pt', device='cpu')
        by_name = {name: handles[os.path.join(model_path, f)] for name, f in manifest.file_of.items()}
        for path in manifest.files:
            names = list(handles[path].keys())
            tensors = {n: handles[path].get_tensor(n) for n in names}
            for n in names:
                for suffix, extra in (('.weight', ('.weight_scale_inv',)), ('.qweight', ('.qzeros', '.scales'))):
                    if n.endswith(suffix):
                        for e in extra:
                            other = n[:-len(suffix)] + e
                            if other in by_name and other not in tensors:
                                tensors[other] = by_name[other].get_tensor(other)
            out, layers = _dequantize_file(tensors, scheme.method)   # companions from other files are dropped
            act += layers
            name = os.path.basename(path)
            save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, name),
                      metadata={'format': 'pt'})
            index.update({k: name for k in out})
    finally:
        handles.clear()
    if len(manifest.files) > 1:
        with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {}, 'weight_map': index}, f)
    config.pop('quantization_config', None)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=1)
    act = sorted(set(act))
    with open(os.path.join(out_dir, ACT_QUANT_FILE), 'w') as f:
        json.dump(act, f, indent=1)
    return act


@torch.inference_mode()
def quantization_error(reference: ReferenceCheckpoint, hf_config, prompts, decode_steps: int, taps, tokens,
                       truth, dtype: torch.dtype, device, overrides=None) -> dict | None:
    """Every tap of transformers on the unquantised original against the dequantised reference (`truth`), on the
    same tokens, in the truth's dtype: how much quantising changed the model, apart from the port. None when the
    original is not known."""
    if reference.scheme is None or reference.source is None:
        return None
    from .metrics import diff
    from .reference import load_reference, run_reference
    model = load_reference(reference.source, dtype, device)
    original, _ = run_reference(model, hf_config, prompts, decode_steps, taps, tokens=tokens, overrides=overrides)
    del model
    lengths = [len(p) for p in prompts]
    rows = []
    for phase, starts in (('prefill', [0] * len(lengths)), ('decode', lengths)):
        for tap in dict.fromkeys([t.name for t in taps] + ['logits']):
            a, b = original.get(phase, tap), truth.get(phase, tap)
            if a is None or b is None:
                continue
            m = diff(a, b, starts)
            rows.append({'phase': phase, 'tap': tap, 'rel_l2': m.rel_l2, 'max_abs': m.max_abs, 'cosine': m.cosine})
    return {'label': 'quantisation error: transformers on the unquantised original vs on the dequantised '
                     'weights (not the port\'s error)',
            'scheme': reference.scheme.label, 'original': reference.source, 'dtype': str(dtype).replace('torch.', ''),
            'taps': rows}


def describe_quantization(q: dict | None, limit: int = 12) -> list[str]:
    """Console lines for a report's quantisation error (none without one)."""
    if not q:
        return []
    lines = [f"{q['label']} ({q['scheme']}; original {q['original']}, {q['dtype']}):"]
    shown = [r for r in q['taps'] if r['phase'] == 'prefill']
    if len(shown) > limit:   # the first layers, the last layers and the logits
        shown = shown[:limit // 2] + shown[-(limit // 2):]
    for r in shown:
        lines.append(f"  quantisation error {r['phase']:<7} {r['tap']:<24} relative L2 {r['rel_l2']:.2e}  "
                     f"max |a-b| {r['max_abs']:.2e}")
    logits = [r for r in q['taps'] if r['tap'] == 'logits']
    if logits:
        worst = max(r['rel_l2'] for r in logits)
        lines.append(f'  quantisation error at the logits, worst phase: relative L2 {worst:.2e}')
    return lines
