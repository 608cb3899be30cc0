"""A port that cannot be imported, built or loaded ends the run with one error: its cause shown once, then the
verdict `FAIL: the port could not be loaded: ...`, not one traceback per pytest item.

`preflight_port` imports the port's class before transformers runs (a broken map or module fails in seconds);
`port_loaded` marks a failure of the real load (constructor, load_weights, a checkpoint that doesn't fit).
"""
import os
import sysconfig
import traceback

_VERDICT = 'the port could not be loaded'


class PortLoadError(RuntimeError):
    """The port under test could not be imported, built or loaded; `__cause__` is the original error."""


def _library_roots():
    import lmdp
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib') if k in paths]
    roots += [os.path.dirname(lmdp.__file__), os.path.dirname(os.path.abspath(__file__))]
    return tuple(os.path.realpath(r) + os.sep for r in roots)


def _user_frames(exc: BaseException):
    """Frames of `exc` in the user's own code: not in the standard library, an installed package, lmdp or parity."""
    libraries = _library_roots()
    return [f for f in traceback.extract_tb(exc.__traceback__)
            if not f.filename.startswith('<') and not os.path.realpath(f.filename).startswith(libraries)]


def _where(exc: BaseException) -> str:
    """' (at my_port.py:12)': the deepest frame in the user's own code, which is where the fix goes."""
    from lmdp.errors import LmdpError
    if isinstance(exc, (LmdpError, SyntaxError)):   # their text already says what and where
        return ''
    frames = _user_frames(exc)
    return f' (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})' if frames else ''


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}{_where(exc)}"


def _fail(exc: Exception):
    # lmdp wraps a constructor's failure in a ConfigError that blames config.json; when the user's own code raised
    # it, that code is what to fix, so the verdict names the original error at its line in the user's file
    from lmdp.errors import ConfigError
    cause = exc.__cause__
    if isinstance(exc, ConfigError) and cause is not None and _user_frames(cause):
        exc = cause
    raise PortLoadError(f'{_VERDICT}: {_one_line(exc)}') from exc


def preflight_port(model_path: str, custom_module_map=None):
    """The port's class, imported as the run will import it; PortLoadError when that fails."""
    from lmdp.hf_config import load_hf_config
    from lmdp.models.registry import get_model_class
    hf_config = load_hf_config(model_path)
    try:
        return get_model_class(hf_config, custom_module_map)
    except Exception as e:  # noqa: BLE001 - whatever the user's code raised is the cause we report
        _fail(e)


def port_loaded(load, *args, **kwargs):
    """`load(*args, **kwargs)`, its failure turned into PortLoadError (the original kept as the cause)."""
    try:
        return load(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        _fail(e)


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _explains_itself(exc: BaseException) -> bool:
    """lmdp's own errors say what was wrong and what to do; a traceback adds to them only when the user's code
    is in it (an import that failed inside their module, say)."""
    from lmdp.errors import LmdpError
    return isinstance(exc, LmdpError) and not any(isinstance(e, SyntaxError) or _user_frames(e) for e in _chain(exc))


def failure_lines(exc: BaseException) -> list[str]:
    """What a run that raised prints once: the cause's traceback (unless the message is the whole story), then
    the verdict line."""
    if isinstance(exc, PortLoadError):
        cause, verdict = exc.__cause__, f'FAIL: {exc}'
    else:
        cause, verdict = exc, f'FAIL: the parity run stopped: {_one_line(exc)}'
    lines = []
    if cause is not None and not _explains_itself(cause):
        lines = ''.join(traceback.format_exception(cause)).rstrip().splitlines()
    return lines + [verdict]
