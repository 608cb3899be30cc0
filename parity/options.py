"""The harness's options, declared once and checked once.

`OPTIONS` is every option of `pytest parity` and `lmdp parity` (same flags, defaults and help) with the keyword of
`parity.compare` it feeds. `check_options` rejects a bad value before any model loads, naming the option and what
to do; the pytest plugin calls it at configure time and `compare` at its start, so both say the same thing.
"""
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DTYPES = ('float32', 'bfloat16', 'float16', 'auto')


@dataclass(frozen=True)
class Option:
    flags: Sequence[str]            # the first is the name; the rest are aliases
    keyword: str                    # parity.compare's keyword
    default: object
    help: str
    metavar: str | None = None
    convert: Callable | None = None   # argparse's type=
    choices: Sequence[str] | None = None
    flag: bool = False              # store_true


OPTIONS = (
    Option(('--model',), 'model_path', None, 'checkpoint folder to diff (default: the built-in tiny llama, built in a '
           'temporary folder)', metavar='PATH'),
    Option(('--dtype',), 'dtype', 'float32', 'dtype of the port under test (default float32; others are judged by '
           'the noise floor)', choices=DTYPES),
    Option(('--device',), 'device', 'auto', 'cpu, cuda, cuda:1, ... (default auto: cuda when present)'),
    Option(('--prompts',), 'prompts', '3', 'a count of random prompts of different lengths (default 3), or a file '
           '(JSON or one prompt per line)', metavar='N|FILE'),
    Option(('--decode-steps',), 'decode_steps', 4, 'decode steps after the packed prefill (default 4; 0: prefill '
           'only)', metavar='N', convert=int),
    Option(('--block-size',), 'block_size', 16, 'KV-cache block size of the port, a power of two (default 16, so '
           'prompts span several blocks)', metavar='N', convert=int),
    Option(('--report',), 'report_dir', None, 'write report.json and report.html into DIR', metavar='DIR'),
    Option(('--custom-module-map', '--module-map'), 'custom_module_map', None, 'a .py file defining MODULE_MAP: the '
           'port under test, instead of the registered one (as custom_module_map= in the API)', metavar='FILE'),
    Option(('--tp',), 'tp', 1, 'tensor-parallel ranks the port runs on, one process each (gloo on the CPU, NCCL on '
           'GPUs; default 1); the reference runs on one', metavar='N', convert=int),
    Option(('--qkv-taps',), 'qkv_taps', False, "(kept for old command lines: q, k and v are always compared now)",
           flag=True),
)
BY_KEYWORD = {o.keyword: o for o in OPTIONS}


def add_options(add, dest_prefix: str = '', typed: bool = True, skip: Sequence[str] = ()):
    """Declare OPTIONS through `add` (pytest's `group.addoption` or argparse's `add_argument`). typed=False leaves
    every value a string, for a command that hands them on to pytest, which then converts and checks them."""
    for o in OPTIONS:
        if o.keyword in skip:
            continue
        kwargs = dict(dest=dest_prefix + o.keyword, default=o.default, help=o.help)
        if o.flag:
            kwargs['action'] = 'store_true'
        else:
            kwargs['metavar'] = o.metavar or ('|'.join(o.choices) if o.choices and not typed else None) \
                or o.flags[0].lstrip('-').upper().replace('-', '_')
            if typed and o.convert is not None:
                kwargs['type'] = o.convert
            if typed and o.choices is not None:
                kwargs['choices'] = list(o.choices)
        add(*o.flags, **kwargs)


class OptionError(ValueError):
    """A bad option value; str() names it as a compare() keyword, `command_line()` as a flag."""

    def __init__(self, keyword: str, value, problem: str):
        self.keyword, self.value, self.problem = keyword, value, problem
        super().__init__(f'{keyword}={value!r}: {problem}')

    def command_line(self) -> str:
        return f'{BY_KEYWORD[self.keyword].flags[0]} {self.value}: {self.problem}'


def _count(keyword, value) -> int | None:
    """An int, or None when `value` is not a count (so it is a file)."""
    if isinstance(value, bool):
        raise OptionError(keyword, value, 'expected a count or a file, not a boolean')
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r'-?\d+', value):
        return int(value)
    return None


def _check_model(path):
    if path is None:
        return
    from lmdp.errors import ConfigError
    from lmdp.hf_config import load_hf_config
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OptionError('model_path', path, 'no such folder; pass the checkpoint folder (config.json and the '
                          'weights). lmdp reads local folders only; it does not download from the Hub')
    try:
        load_hf_config(path)
    except ConfigError as e:
        raise OptionError('model_path', path, str(e)) from e


def _check_dtype(dtype):
    if dtype is None or dtype in DTYPES:     # the common case decided without importing torch
        return
    from lmdp.config import resolve_dtype
    from lmdp.errors import ConfigError
    try:
        resolve_dtype(dtype)                 # also takes a torch.dtype and the aliases 'float', 'half', ...
    except (ConfigError, TypeError):
        raise OptionError('dtype', dtype, f"use one of {', '.join(DTYPES)} (auto: the checkpoint's own "
                          'dtype)') from None


def _check_device(device):
    if device in (None, 'auto'):
        return
    import torch
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError('device', device, 'not a device name; use auto, cpu, cuda or cuda:N') from None
    if parsed.type not in ('cpu', 'cuda'):
        raise OptionError('device', device, f'lmdp runs on cpu or cuda, not {parsed.type}')
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise OptionError('device', device, 'no CUDA device is visible here (torch.cuda.is_available() is '
                              'False); use cpu, or run where a GPU is')
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise OptionError('device', device, f'there are {torch.cuda.device_count()} CUDA device(s), numbered '
                              'from 0')


def _check_prompts(prompts):
    count = _count('prompts', prompts)
    if count is not None:
        if count < 1:
            raise OptionError('prompts', prompts, 'a count of random prompts must be 1 or more; or give a prompts '
                              'file (JSON, or one prompt per line)')
    elif isinstance(prompts, (str, os.PathLike)):
        if not os.path.isfile(prompts):
            raise OptionError('prompts', os.fspath(prompts), 'neither a count nor an existing file; give a count '
                              '(e.g. 3) or a prompts file (JSON, or one prompt per line)')
    else:
        try:
            items = list(prompts)
        except TypeError:
            raise OptionError('prompts', prompts, 'expected a count, a file, or lists of token ids') from None
        if not items or any(isinstance(p, (str, bytes)) or len(p) == 0 for p in items):
            raise OptionError('prompts', prompts, 'a list of prompts needs at least one prompt, each a non-empty '
                              'list of token ids')


def _check_int(keyword, value, low, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(keyword, value, f'expected a whole number ({what})')
    if value < low:
        raise OptionError(keyword, value, f'must be {low} or more ({what})')


def _check_block_size(block_size):
    _check_int('block_size', block_size, 1, 'the KV-cache block size, a power of two; default 16')
    if block_size & (block_size - 1):
        raise OptionError('block_size', block_size, 'the KV-cache block size must be a power of two (default 16)')


def _check_report_dir(report_dir):
    if report_dir is None:
        return
    path = os.path.abspath(os.fspath(report_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError('report_dir', report_dir, 'is a file; give a folder for report.json and report.html')
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OptionError('report_dir', report_dir, f'{existing} is a file, so no folder can be made under it; '
                          'give a folder you can write to')
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OptionError('report_dir', report_dir, f'cannot write in {existing} ({e.strerror}); give a folder '
                          'you can write to') from None


def _check_module_map(custom_module_map):
    if custom_module_map is None or isinstance(custom_module_map, dict):
        return
    if not isinstance(custom_module_map, (str, os.PathLike)):
        raise OptionError('custom_module_map', custom_module_map, 'expected a .py file that defines MODULE_MAP, or '
                          'a dict {architecture: class or dotted path}')
    path = os.fspath(custom_module_map)
    if not os.path.isfile(path):
        raise OptionError('custom_module_map', path, 'no such file; pass the .py file that defines MODULE_MAP')
    if not path.endswith('.py'):
        raise OptionError('custom_module_map', path, 'not a .py file; pass the Python file that defines MODULE_MAP')


def check_options(model_path=None, dtype='float32', device='auto', prompts='3', decode_steps=4, block_size=16,
                  report_dir=None, custom_module_map=None, qkv_taps=False, tp=1):
    """Raise OptionError for the first bad value, cheapest checks first; nothing is loaded but config.json."""
    _check_dtype(dtype)
    _check_device(device)
    _check_prompts(prompts)
    _check_int('decode_steps', decode_steps, 0, 'the decode steps after the prefill; 0: prefill only')
    _check_block_size(block_size)
    _check_int('tp', tp, 1, 'tensor-parallel ranks, 1 or more; default 1')
    if not isinstance(qkv_taps, bool):
        raise OptionError('qkv_taps', qkv_taps, 'expected True or False')
    _check_module_map(custom_module_map)
    _check_report_dir(report_dir)
    _check_model(model_path)


def check_compare(model_path, **options):
    """`parity.compare`'s first step: the options, then the port's class (its map and modules import), so a bad
    option or an unimportable port fails before transformers runs."""
    if model_path is None:
        raise OptionError('model_path', None, 'pass the checkpoint folder to compare')
    check_options(model_path, **options)
    from .load_failure import preflight_port
    preflight_port(model_path, options.get('custom_module_map'))
