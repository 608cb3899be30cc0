"""The quantisation schemes lmdp loads, read from a checkpoint's `config.quantization_config`.

Two of transformers' formats are supported:

- **FP8 with fine-grained block scales** (`quant_method: fp8`, `weight_block_size: [128, 128]`, dynamic
  activations; DeepSeek-V3, Qwen3-*-FP8): `float8_e4m3fn` weights, one float32 `weight_scale_inv` per 128x128 block
  (the last block of a dimension that is no multiple of 128 is partial). Linear layers quantise their input per
  token and group of 128 features at run time (W8A8); mixture-of-experts weights run against unquantised
  activations (W8A16).
- **AWQ, 4-bit, GEMM layout** (`quant_method: awq`, `bits: 4`, `version: gemm`, zero points): `qweight` int32
  `[in, out / 8]`, `qzeros` int32 `[in / group, out / 8]` and `scales` `[in / group, out]`; activations stay in the
  model dtype (W4A16).

Anything else is refused before a weight is read, naming the setting and what lmdp accepts.
"""
import re
from dataclasses import dataclass, field

from .errors import ConfigError

FP8_BLOCK = (128, 128)
AWQ_GROUP_SIZES = (16, 32, 64, 128)
SUPPORTED = "FP8 with 128x128 block scales (quant_method 'fp8', weight_block_size [128, 128]) and AWQ 4-bit GEMM " \
            "(quant_method 'awq', bits 4, version 'gemm', zero_point true)"


@dataclass(frozen=True)
class QuantConfig:
    """A supported scheme: `method` 'fp8' (block `(128, 128)`) or 'awq' (`group_size`, 4 bits, zero points)."""
    method: str
    block: tuple[int, int] = FP8_BLOCK
    group_size: int = 128
    modules_to_not_convert: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return 'FP8 128x128 block' if self.method == 'fp8' else f'AWQ 4-bit, group {self.group_size}'

    def skips(self, module_name: str) -> bool:
        """Whether `module_name` (a checkpoint module name) is left unquantised by `modules_to_not_convert`, under
        transformers' rule: a pattern matches from the start up to a module boundary, as a regex with that
        boundary, or as a suffix."""
        return bool(module_name) and any(_pattern_matches(p, module_name) for p in self.modules_to_not_convert)


def _pattern_matches(pattern: str, name: str) -> bool:
    try:
        if re.match(rf'(?:{pattern})(?:(?<=\.)|(?=\.|$))', name):
            return True
    except re.error:
        pass
    return name == pattern or name.endswith('.' + pattern) or name.startswith(pattern + '.')


def _get(raw, key, default=None):
    if isinstance(raw, dict):
        return raw.get(key, default)
    return getattr(raw, key, default)


def parse_quant_config(raw, where: str = 'config.json') -> QuantConfig | None:
    """The scheme a `quantization_config` (a dict, a transformers config object, or a QuantConfig) describes; None
    for an unquantised model; ConfigError for a scheme or setting lmdp can't run."""
    if raw is None or isinstance(raw, QuantConfig):
        return raw
    method = _get(raw, 'quant_method')
    method = getattr(method, 'value', method)            # transformers' QuantizationMethod enum
    method = str(method).lower() if method is not None else None
    skip = tuple(_get(raw, 'modules_to_not_convert') or ())
    if method == 'fp8':
        return _fp8(raw, where, skip)
    if method == 'awq':
        return _awq(raw, where, skip)
    raise ConfigError(f'{where}: quantization_config.quant_method is {method!r}, which lmdp does not load. lmdp '
                      f'runs {SUPPORTED}; use an unquantised checkpoint or convert it (`lmdp quantize SRC DST '
                      '--fp8-block | --awq` writes either format from an unquantised one)')


def _fp8(raw, where: str, skip) -> QuantConfig:
    block = _get(raw, 'weight_block_size')
    if block is None:
        raise ConfigError(f'{where}: this FP8 checkpoint has no weight_block_size, so its weights carry one scale per '
                          'tensor (per-tensor FP8); lmdp loads FP8 with 128x128 block scales only. Re-quantise the '
                          'unquantised model with `lmdp quantize SRC DST --fp8-block`')
    if tuple(block) != FP8_BLOCK:
        raise ConfigError(f'{where}: quantization_config.weight_block_size is {list(block)}; lmdp\'s FP8 kernels take '
                          '[128, 128] blocks only')
    scheme = _get(raw, 'activation_scheme', 'dynamic')
    if scheme != 'dynamic':
        raise ConfigError(f'{where}: quantization_config.activation_scheme is {scheme!r}; lmdp quantises activations '
                          "per token group at run time ('dynamic') and has no use for static activation scales")
    fmt = _get(raw, 'fmt', 'e4m3') or 'e4m3'
    if fmt != 'e4m3':
        raise ConfigError(f"{where}: quantization_config.fmt is {fmt!r}; lmdp loads float8_e4m3fn weights ('e4m3')")
    scale_fmt = _get(raw, 'scale_fmt')
    if scale_fmt not in (None, 'float32', 'fp32', 'ue8m0'):
        raise ConfigError(f'{where}: quantization_config.scale_fmt is {scale_fmt!r}; lmdp reads float32 block scales')
    if _get(raw, 'modules_to_convert'):
        raise ConfigError(f'{where}: quantization_config.modules_to_convert (FP8 embeddings) is not supported')
    return QuantConfig('fp8', FP8_BLOCK, modules_to_not_convert=skip)


def _awq(raw, where: str, skip) -> QuantConfig:
    bits = _get(raw, 'bits', _get(raw, 'w_bit', 4))
    if bits != 4:
        raise ConfigError(f'{where}: quantization_config.bits is {bits!r}; lmdp\'s AWQ kernels take 4-bit weights')
    group = _get(raw, 'group_size', _get(raw, 'q_group_size', 128))
    if group not in AWQ_GROUP_SIZES:
        raise ConfigError(f'{where}: quantization_config.group_size is {group!r}; lmdp\'s AWQ kernels take groups of '
                          f'{", ".join(map(str, AWQ_GROUP_SIZES))} input features')
    if not _get(raw, 'zero_point', True):
        raise ConfigError(f'{where}: quantization_config.zero_point is false (symmetric AWQ); lmdp loads AWQ with '
                          'zero points (zero_point true) only')
    version = _get(raw, 'version', None) or _get(raw, 'format', None) or 'gemm'
    version = str(getattr(version, 'value', version)).lower()
    if version != 'gemm':
        raise ConfigError(f'{where}: quantization_config.version is {version!r}; lmdp reads the AWQ GEMM layout '
                          "(version 'gemm', as AutoAWQ writes by default) only")
    return QuantConfig('awq', group_size=int(group), modules_to_not_convert=skip)


def check_quantized_tensors(scheme: QuantConfig | None, tensors: dict, where: str = 'the checkpoint'):
    """Raise ConfigError, before any weight is read, when the checkpoint's quantised tensors (`{name: info with
    .shape}`, from the file headers) do not have the layout `scheme` describes: AWQ scales for another group size,
    FP8 scales for other blocks, or 4-bit experts (lmdp runs AWQ checkpoints with unquantised experts only)."""
    if scheme is None:
        return
    for name, info in tensors.items():
        shape = tuple(info.shape)
        if scheme.method == 'awq' and name.endswith('.qweight'):
            prefix = name[:-len('.qweight')]
            if '.experts.' in name:
                raise ConfigError(f'{where}: {name} holds 4-bit experts; lmdp runs AWQ checkpoints whose mixture-of-'
                                  'experts weights are unquantised (listed in modules_to_not_convert), as `lmdp '
                                  'quantize --awq` writes them. Use an FP8 checkpoint for this model instead')
            scales = tensors.get(prefix + '.scales')
            k = shape[0] if len(shape) == 2 else None
            if scales is None or k is None or tuple(scales.shape) != (k // scheme.group_size, shape[1] * 8):
                got = None if scales is None else tuple(scales.shape)
                raise ConfigError(f'{where}: {prefix}.scales has shape {got}, but {name} {shape} with '
                                  f'quantization_config.group_size {scheme.group_size} needs '
                                  f'{(k // scheme.group_size if k else "?", shape[1] * 8 if k else "?")}: the '
                                  'config and the tensors disagree on the group size (fix group_size in config.json)')
        if scheme.method == 'fp8' and name.endswith('.weight_scale_inv'):
            weight = tensors.get(name[:-len('_scale_inv')])
            if weight is None or len(weight.shape) != 2:
                continue
            n, k = weight.shape
            blocks = (-(-n // scheme.block[0]), -(-k // scheme.block[1]))
            if shape != blocks:
                raise ConfigError(f'{where}: {name} has shape {list(shape)}, but the weight [{n}, {k}] in '
                                  f'{scheme.block[0]}x{scheme.block[1]} blocks needs {list(blocks)}: this '
                                  'checkpoint was quantised with other blocks than its weight_block_size says')
