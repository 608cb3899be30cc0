"""Every environment variable lmdp reads, declared, documented and parsed here and nowhere else.

Read a value as an attribute, `lmdp.envs.LMDP_GEMV_MAX_M`: it is parsed from the environment at that moment (so a
test's monkeypatch takes effect), and a value that does not parse raises `EnvError` naming the variable, what it
holds and what it accepts. `python -m lmdp.envs` lists every variable with its current value.
"""
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import EnvError

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('', '0', 'false', 'no', 'off')


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(repr(v) for v in _TRUE + _FALSE[1:])}")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError('expected a whole number >= 0') from None
    if value < 0:
        raise ValueError('expected a whole number >= 0')
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError('expected a number of seconds > 0') from None
    if not value > 0:
        raise ValueError('expected a number of seconds > 0')
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError('expected a number >= 0') from None
    if not value >= 0:
        raise ValueError('expected a number >= 0')
    return value


def _kernels(text: str) -> str:
    value = text.strip().lower() or 'auto'
    if value not in ('auto', 'reference'):
        raise ValueError("expected 'auto' (Triton kernels for CUDA tensors) or 'reference' (pure-torch everywhere)")
    return value


def _prefill_attention(text: str) -> str:
    value = text.strip().lower() or 'auto'
    if value not in PREFILL_ATTENTION_CHOICES:
        raise ValueError(f"expected one of {', '.join(repr(v) for v in PREFILL_ATTENTION_CHOICES)}")
    return value


PREFILL_ATTENTION_CHOICES = ('auto', 'cudnn', 'flash', 'triton')


def _path(text: str) -> str:
    return text


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    parse: Callable[[str], Any]
    doc: str


VARIABLES: dict[str, EnvVar] = {v.name: v for v in [
    EnvVar('LMDP_KERNELS', 'auto', _kernels,
           "'reference' runs the pure-torch reference of every fused op even on CUDA tensors (to bisect a suspected "
           "kernel bug on the GPU); 'auto' (the default) runs the Triton kernels for CUDA tensors."),
    EnvVar('LMDP_GEMV_MAX_M', '2', _non_negative_int,
           'Linear layers with at most this many rows use the GEMV kernel instead of cuBLAS on CUDA (decode at '
           'batch 1-2); 0 turns the GEMV kernel off. Read once, when the Triton kernels are imported.'),
    EnvVar('LMDP_DECODE_FUSED_REDUCE', '0', _bool,
           'On: decode attention merges its splits inside the split kernel (the last program to arrive merges) '
           'instead of in a second kernel. Off by default: it measured no faster (notes/performance.md).'),
    EnvVar('LMDP_PDL', '0', _bool,
           'On (Hopper and newer): the decode chain\'s kernels (GEMV, RMSNorm, rotary + cache write, decode attention, '
           'the MoE router\'s top-k and expert GEMVs) '
           'launch as programmatic dependents, so each one is resident and its GEMV weight loads start while the '
           'kernel before it drains. Off by default until measured (notes/performance.md). Read when the Triton '
           'kernels are imported.'),
    EnvVar('LMDP_MOE_GEMV_MAX_PAIRS', '', lambda t: None if t == '' else _non_negative_int(t),
           'Fused MoE: up to this many (token, expert) pairs a step runs the GEMV path instead of the grouped GEMM; '
           'unset: the kernel picks from the number of experts.'),
    EnvVar('LMDP_MAX_KV_POOL_GIB', '0', _non_negative_float,
           'On CUDA, the most GiB the KV pool takes when it is sized from free memory (cache_max_entry_count); 0: '
           'no cap. For processes that share one GPU, such as the gpu tests run beside other GPU work.'),
    EnvVar('LMDP_TP_TIMEOUT', '300', _positive_seconds,
           'Tensor parallelism: seconds a rank may keep the others waiting inside one step before the engine '
           'gives up on it, names it, and shuts every rank down.'),
    EnvVar('LMDP_TP_START_TIMEOUT', '3600', _positive_seconds,
           'Tensor parallelism: seconds the ranks may take to start and load their shards of the weights (a rank '
           'that dies meanwhile is reported at once).'),
    EnvVar('LMDP_PREFILL_ATTENTION', 'auto', _prefill_attention,
           "Prefill attention on CUDA: 'cudnn' (torch's cuDNN attention, one call per sequence), 'flash' (torch's "
           "flash-attention varlen kernel, one call per step) or 'triton' (lmdp's paged kernel) where the layer and "
           "the device allow it, Triton elsewhere. 'auto' (the default) is 'triton': on the H200 torch's flash kernel "
           "measured no faster, and cuDNN, 1.6-1.8x faster warm, builds an execution plan for every new shape "
           "(lmdp.kernels.prefill_select, notes/performance.md)."),
    EnvVar('TRITON_INTERPRET', '0', _bool,
           "Triton's own: run the kernels in its CPU interpreter (the CPU tests do). lmdp reads it once, when the "
           "kernels are imported, to keep float32 silu off libdevice, which the interpreter lacks."),
    EnvVar('OUT', '.', _path,
           'The folder where the benchmark commands (`lmdp bench`, `python -m lmdp.kernels.triton.bench_gemv`) '
           'write their JSON by default.'),
]}


def get(name: str) -> Any:
    """The parsed value of a declared variable (its default when unset)."""
    var = VARIABLES.get(name)
    if var is None:
        raise AttributeError(f'{name} is not an environment variable lmdp reads; declared: {", ".join(VARIABLES)}')
    raw = os.environ.get(name)
    try:
        return var.parse(var.default if raw is None else raw)
    except ValueError as e:
        raise EnvError(f'environment variable {name}={raw!r} is not valid: {e}. Unset it or fix it; '
                       f'{name}: {var.doc}') from None


def __getattr__(name: str) -> Any:
    if name in VARIABLES:
        return get(name)
    raise AttributeError(f"module 'lmdp.envs' has no attribute {name!r}")


# set by torchrun (or any env:// launcher) for each rank; torch.distributed's env:// initialisation reads them too
LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def launcher() -> dict | None:
    """{'rank', 'world', 'local_rank', 'master_addr', 'master_port'} when torchrun (env://) started this process,
    else None (RANK or WORLD_SIZE unset)."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return None
    found = {}
    for key, name in (('rank', 'RANK'), ('world', 'WORLD_SIZE'), ('local_rank', 'LOCAL_RANK'),
                      ('master_port', 'MASTER_PORT')):
        raw = os.environ.get(name, os.environ['RANK'] if name == 'LOCAL_RANK' else None)
        try:
            found[key] = None if raw is None else int(raw)
        except ValueError:
            raise EnvError(f'environment variable {name}={raw!r} is not a whole number; torchrun sets it for each '
                           'rank: unset RANK and WORLD_SIZE unless a launcher started this process') from None
    found['master_addr'] = os.environ.get('MASTER_ADDR')
    return found


def without_launcher() -> dict:
    """This process's environment less the launcher's variables: for a child process that is no torchrun rank."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def describe() -> list[str]:
    """One line per variable: its name, the value in effect (or the error), and what it does."""
    lines = []
    for name, var in VARIABLES.items():
        try:
            value = repr(get(name))
        except EnvError as e:
            value = f'INVALID ({e})'
        state = 'set' if name in os.environ else 'default'
        lines.append(f'{name} = {value} ({state}): {var.doc}')
    return lines


if __name__ == '__main__':
    print('\n'.join(describe()))
