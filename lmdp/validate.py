"""Checks of the values a user hands lmdp: a wrong type is a TypeError and a wrong value a ValueError, each naming
the field, what it holds and what it takes.

Numbers of numpy's scalar types pass and come back as plain Python ints and floats; bools are refused where a
number is wanted (True is an int to Python, never a token id or a count to a user).
"""
import math
import numbers
from typing import Any


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and not _is_numpy_bool(value)


def _is_numpy_bool(value) -> bool:
    return type(value).__module__ == 'numpy' and type(value).__name__ in ('bool', 'bool_')


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def integer(name: str, value, minimum: int | None = None, optional: bool = False) -> int | None:
    """`value` as an int (None passes when `optional`)."""
    if value is None and optional:
        return None
    if not _is_int(value):
        kind = 'an integer' + (' or None' if optional else '')
        raise TypeError(f'{name} must be {kind}, got {type(value).__name__} {_shown(value)}')
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value}')
    return value


def number(name: str, value, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False, rule: str = '') -> float:
    """`value` as a finite float in the range from `low` to `high` (`*_open`: the bound itself is out)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or _is_numpy_bool(value):
        raise TypeError(f'{name} must be a number, got {type(value).__name__} {_shown(value)}')
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or math.isinf(value) or below or above:
        if not rule:
            left, right = '(' if low_open else '[', ')' if high_open else ']'
            rule = f'in {left}{low:g}, {high:g}{right}'
        raise ValueError(f'{name} must be {rule}, got {value}')
    return value


def boolean(name: str, value) -> bool:
    if isinstance(value, bool) or _is_numpy_bool(value):
        return bool(value)
    raise TypeError(f'{name} must be True or False, got {type(value).__name__} {_shown(value)}')


def choice(name: str, value, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {_shown(value)}")
    return value


def int_list(name: str, value, minimum: int | None = None, optional: bool = True) -> list[int] | None:
    """A list of ints; a single int is taken as a list of one."""
    if value is None and optional:
        return None
    if _is_int(value):
        value = [value]
    if isinstance(value, (str, bytes, dict, set)) or not hasattr(value, '__iter__'):
        raise TypeError(f'{name} must be a list of integers, got {type(value).__name__} {_shown(value)}')
    out = []
    for i, item in enumerate(value):
        out.append(integer(f'{name}[{i}]', item, minimum))
    return out


def str_list(name: str, value, optional: bool = True) -> list[str] | None:
    """A list of non-empty strings; a single string is taken as a list of one."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, dict, set)) or not hasattr(value, '__iter__'):
        raise TypeError(f'{name} must be a list of strings, got {type(value).__name__} {_shown(value)}')
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f'{name}[{i}] must be a string, got {type(item).__name__} {_shown(item)}')
        if not item:
            raise ValueError(f'{name}[{i}] is an empty string, which would match everywhere; leave it out')
        text(f'{name}[{i}]', item)
        out.append(item)
    return out


def text(name: str, value: str) -> str:
    """A string that encodes as UTF-8 (no lone surrogates, which no tokenizer can take)."""
    try:
        value.encode('utf-8')
    except UnicodeEncodeError as e:
        raise ValueError(f'{name} is not valid Unicode text: {e.reason} {value[e.start:e.end]!r} at character '
                         f'{e.start}; a lone UTF-16 surrogate usually comes from text decoded with the wrong codec '
                         "(or errors='surrogateescape')") from None
    return value


def token_ids(name: str, value) -> list[int]:
    """A prompt given as token ids: a list, tuple, 1-D numpy array or tensor of non-negative ints."""
    if hasattr(value, 'tolist') and not isinstance(value, (list, tuple)):
        ndim = getattr(value, 'ndim', None)
        if ndim != 1:
            raise TypeError(f'{name} given as an array must be 1-D (one prompt), got {ndim} dimensions')
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f'{name} must be a list of token ids, got {type(value).__name__}')
    for i, t in enumerate(value):
        if not _is_int(t):
            raise TypeError(f'{name}: token id {i} is {type(t).__name__} {_shown(t)}; token ids are integers')
    return [int(t) for t in value]


def is_token_ids(value) -> bool:
    """Whether `value` looks like one prompt of token ids (not text, messages or a batch)."""
    if hasattr(value, 'tolist') and getattr(value, 'ndim', None) == 1:
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, numbers.Number) or _is_numpy_bool(t) for t in value)
