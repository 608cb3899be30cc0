"""`lmdp quantize SRC DST --fp8-block | --awq`: an unquantised checkpoint rewritten in transformers' quantised
formats, round-to-nearest with no calibration data, so quantised models can be made offline.

What is quantised: every linear weight inside the decoder layers (attention, MLP, shared and routed experts), as
the published FP8 and AWQ checkpoints do. Left as they are: embeddings, norms, `lm_head`, and the mixture-of-
experts routers (`mlp.gate`, `shared_expert_gate`), which are listed in `modules_to_not_convert`; AWQ leaves the
routed experts unquantised too (lmdp has no 4-bit experts kernel), also listed there.

- `--fp8-block`: `float8_e4m3fn` weights and a float32 `weight_scale_inv` per 128x128 block (amax / 448; the last
  block of a dimension that is no multiple of 128 is partial), `quantization_config = {"quant_method": "fp8",
  "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}`.
- `--awq`: AutoAWQ's GEMM layout, 4 bits with zero points per group of `--group-size` input features: `qweight`
  int32 `[in, out / 8]`, `qzeros` int32 `[in / group, out / 8]`, `scales` float16 `[in / group, out]`,
  `quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version":
  "gemm"}`.

DST also gets `lmdp_quantize.json` naming the source, so that the parity harness can report the quantisation error
itself (the source against the dequantised checkpoint) beside the port's.
"""
import json
import os
import re
import shutil

import torch

from .errors import ConfigError
from .kernels.quant import awq_pack, awq_quantize, fp8_quantize_blocks
from .quant_config import AWQ_GROUP_SIZES, FP8_BLOCK

RECORD = 'lmdp_quantize.json'
METHODS = ('fp8-block', 'awq')
_LAYER = re.compile(r'(^|\.)layers\.\d+\.')
_EXPERT = re.compile(r'\.experts\.\d+\.')
_ROUTERS = ('gate', 'shared_expert_gate', 'router')


def linear_module(name: str, tensor: torch.Tensor) -> str | None:
    """The module name of a linear weight inside a decoder layer (`model.layers.0.self_attn.q_proj`), else None."""
    if tensor.dim() != 2 or not name.endswith('.weight') or not _LAYER.search(name):
        return None
    module = name[:-len('.weight')]
    return None if 'norm' in module.rsplit('.', 1)[-1] else module


def is_router(module: str) -> bool:
    return module.rsplit('.', 1)[-1] in _ROUTERS


def quantized_modules(model_path: str, method: str) -> dict[str, bool]:
    """{module: quantised?} for every linear weight inside the decoder layers of a checkpoint (headers only)."""
    from .weight_loader import scan_checkpoint
    manifest = scan_checkpoint(model_path)
    out = {}
    for name, info in manifest.tensors.items():
        module = linear_module(name, torch.empty(info.shape, device='meta'))
        if module is not None:
            out[module] = not is_router(module) and not (method == 'awq' and _EXPERT.search(module + '.'))
    return out


def awq_group_size(model_path: str, largest: int = 128) -> int:
    """The largest AWQ group size (at most `largest`) that divides every quantised weight's in_features."""
    from .weight_loader import scan_checkpoint
    manifest = scan_checkpoint(model_path)
    todo = quantized_modules(model_path, 'awq')
    ins = [manifest.tensors[m + '.weight'].shape[1] for m, q in todo.items() if q]
    for g in sorted(AWQ_GROUP_SIZES, reverse=True):
        if g <= largest and all(k % g == 0 for k in ins):
            return g
    raise ConfigError(f'no AWQ group size ({", ".join(map(str, AWQ_GROUP_SIZES))}) divides the in_features of every '
                      f'linear layer of {model_path!r} ({sorted(set(ins))})')


def quantization_config(method: str, group_size: int = 128, not_converted=()) -> dict:
    skip = sorted(not_converted) or None
    if method == 'fp8-block':
        return {'quant_method': 'fp8', 'activation_scheme': 'dynamic', 'fmt': 'e4m3',
                'weight_block_size': list(FP8_BLOCK), 'modules_to_not_convert': skip}
    return {'quant_method': 'awq', 'bits': 4, 'group_size': group_size, 'zero_point': True, 'version': 'gemm',
            'modules_to_not_convert': skip}


def _not_converted(modules: dict[str, bool]) -> set:
    """modules_to_not_convert: each router, and each layer's expert block when its experts stay unquantised."""
    out = set()
    for module, quantized in modules.items():
        if quantized:
            continue
        m = _EXPERT.search(module + '.')
        out.add(module[:m.start()] + '.experts' if m else module)
    return out


def _quantize_tensor(name: str, w: torch.Tensor, method: str, group_size: int, device) -> dict[str, torch.Tensor]:
    prefix = name[:-len('.weight')]
    w = w.to(device)
    if method == 'fp8-block':
        q, scale = fp8_quantize_blocks(w)
        return {name: q.cpu(), prefix + '.weight_scale_inv': scale.cpu()}
    n, k = w.shape
    if k % group_size or n % 8:
        raise ConfigError(f'{name} has shape [{n}, {k}]: AWQ needs in_features a multiple of the group size '
                          f'({group_size}; pass --group-size) and out_features a multiple of 8')
    codes, scales, zeros = awq_quantize(w, group_size)
    return {prefix + '.qweight': awq_pack(codes.t().contiguous()).cpu(),
            prefix + '.qzeros': awq_pack(zeros.t().contiguous()).cpu(),
            prefix + '.scales': scales.t().contiguous().cpu()}


def quantize_checkpoint(src: str, dst: str, method: str, group_size: int | None = 128,
                        device: str | None = None) -> dict:
    """Write `src` quantised with `method` ('fp8-block' | 'awq') into `dst`; `group_size` None picks the largest
    AWQ group that fits every layer. Returns what was done (tensors quantised, bytes written)."""
    from safetensors.torch import save_file

    from .hf_config import read_config_dict
    from .weight_loader import iter_checkpoint, scan_checkpoint
    if method not in METHODS:
        raise ValueError(f'quantize: method must be one of {METHODS}, got {method!r}')
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if src == dst:
        raise ValueError('quantize: DST must be another folder than SRC')
    config = read_config_dict(src)
    if config.get('quantization_config'):
        raise ConfigError(f'{src!r} is already quantised ({config["quantization_config"].get("quant_method")}); '
                          'quantise an unquantised checkpoint')
    if method == 'awq':
        group_size = awq_group_size(src) if group_size is None else group_size
        if group_size not in AWQ_GROUP_SIZES:
            raise ValueError(f'quantize: --group-size must be one of {AWQ_GROUP_SIZES}, got {group_size}')
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    modules = quantized_modules(src, method)
    if method == 'awq':   # every layer's shape is checked before anything is written
        manifest = scan_checkpoint(src)
        bad = [m for m, q in modules.items() if q and manifest.tensors[m + '.weight'].shape[1] % group_size]
        if bad:
            raise ConfigError(f'{bad[0]} has in_features {manifest.tensors[bad[0] + ".weight"].shape[1]}, no '
                              f'multiple of the AWQ group size {group_size}; pass --group-size '
                              f'({", ".join(map(str, AWQ_GROUP_SIZES))})')
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        path = os.path.join(src, f)
        weights = f.endswith(('.safetensors', '.bin')) or f in ('model.safetensors.index.json',
                                                                 'pytorch_model.bin.index.json', 'config.json')
        if os.path.isfile(path) and not weights:
            shutil.copy(path, os.path.join(dst, f))
    files = scan_checkpoint(src).files
    index, quantized, written = {}, 0, 0
    for path in files:
        out_name = os.path.basename(path)
        if out_name.endswith('.bin'):
            out_name = out_name.replace('pytorch_model', 'model')[:-len('.bin')] + '.safetensors'
        tensors = {}
        for name, tensor in iter_checkpoint(src, [path]):
            module = linear_module(name, tensor)
            if module is not None and modules.get(module):
                tensors.update(_quantize_tensor(name, tensor, method, group_size, device))
                quantized += 1
            else:
                tensors[name] = tensor.contiguous()
        save_file(tensors, os.path.join(dst, out_name), metadata={'format': 'pt'})
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update({k: out_name for k in tensors})
    if len(files) > 1:
        with open(os.path.join(dst, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {'total_size': written}, 'weight_map': index}, f, indent=1)
    config['quantization_config'] = quantization_config(method, group_size, _not_converted(modules))
    with open(os.path.join(dst, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    record = {'method': method, 'source': src, 'group_size': group_size if method == 'awq' else None,
              'quantized_tensors': quantized, 'bytes': written}
    with open(os.path.join(dst, RECORD), 'w') as f:
        json.dump(record, f, indent=1)
    return record


def quantize_source(model_path: str) -> str | None:
    """The unquantised checkpoint `lmdp quantize` made `model_path` from, if it recorded one that still exists."""
    path = os.path.join(model_path, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        source = json.load(f).get('source')
    if source and not os.path.isabs(source):
        source = os.path.join(model_path, source)
    return source if source and os.path.isfile(os.path.join(source, 'config.json')) else None
