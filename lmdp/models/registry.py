"""Resolving an architecture to its model class: the built-in MODULE_MAP, overridden by a user's custom map.

A custom module map is a Python file that defines `MODULE_MAP = {'ArchName': 'pkg.module.Class' or Class}`.
Dotted paths resolve with the map file's folder first on `sys.path`, so a map can sit next to the user's model file
outside lmdp's source; a bare name ('MyLlama') is a class the map file itself defines.

Each load re-imports the modules that live in the map's folder (and drops same-named modules that an earlier map
brought in from another folder): in one notebook kernel, loading version 2 of a port runs version 2's code, not
what `sys.modules` kept from version 1.
"""
import importlib
import importlib.util
import os
import site
import sys
import sysconfig

from ..errors import ArchitectureError
from .module_map import MODULE_MAP

CustomModuleMap = None | str | dict[str, object]

# never reloaded, even when a map sits in a folder that also holds them (a map file in a checkout's root)
_KEEP = ('lmdp', 'parity')


def _installed_roots():
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib') if k in paths}
    roots.update(getattr(site, 'getsitepackages', list)())
    roots.add(site.getusersitepackages())
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def _names_in(folder: str) -> set[str]:
    """The top-level module names an import finds in `folder`: its .py files and its packages."""
    names = set()
    for entry in os.listdir(folder):
        full = os.path.join(folder, entry)
        if entry.endswith('.py') and os.path.isfile(full):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(full, '__init__.py')):
            names.add(entry)
    return names


def _forget_modules_of(folder: str):
    """Drop from sys.modules what an import from `folder` must load afresh (see the module docstring)."""
    prefixes = tuple({os.path.abspath(folder) + os.sep, os.path.realpath(folder) + os.sep})
    provided = _names_in(folder)
    installed = None
    for name, module in list(sys.modules.items()):
        top = name.partition('.')[0]
        path = getattr(module, '__file__', None)
        if top in _KEEP or name == '__main__' or not isinstance(path, str):
            continue
        if not (path.startswith(prefixes) or top in provided):
            continue
        installed = installed or _installed_roots()
        if os.path.realpath(path).startswith(installed):
            continue
        del sys.modules[name]
        # a file rewritten within the same second and at the same size would pass the bytecode cache's
        # (mtime, size) check and run the old code: drop the cached bytecode too
        cached = getattr(module, '__cached__', None)
        if isinstance(cached, str) and os.path.isfile(cached):
            try:
                os.remove(cached)
            except OSError:
                pass
    importlib.invalidate_caches()


def _put_first_on_path(folder: str):
    sys.path[:] = [folder] + [p for p in sys.path if p != folder]


def load_custom_module_map(path: str) -> dict[str, object]:
    """The MODULE_MAP a user's file defines, read afresh, with its dotted paths importable from its folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'custom_module_map must be a path to a .py file or a dict, got {type(path).__name__}')
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'custom module map {path!r} does not exist; pass the path of a .py file that '
                                'defines MODULE_MAP')
    if not path.endswith('.py'):
        raise ArchitectureError(f'custom module map {path!r} is not a .py file; pass a Python file that defines '
                                'MODULE_MAP')
    folder = os.path.dirname(path)
    _forget_modules_of(folder)
    _put_first_on_path(folder)
    name = f'lmdp_custom_module_map_{abs(hash(path))}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    mapping = getattr(module, 'MODULE_MAP', None)
    if not isinstance(mapping, dict):
        raise ArchitectureError(f'custom module map {path!r} defines no MODULE_MAP dict')
    resolved = {}
    for arch, target in mapping.items():
        if isinstance(target, str) and '.' not in target:
            if not isinstance(getattr(module, target, None), type):
                raise ArchitectureError(f'MODULE_MAP[{arch!r}] = {target!r} in {path}: a bare name must be a class '
                                        'defined (or imported) in that file; define it there or give a dotted path '
                                        "'module.Class'")
            target = getattr(module, target)
        resolved[arch] = target
    return resolved


def merged_module_map(custom_module_map: CustomModuleMap = None) -> dict[str, object]:
    """The built-in map with the custom entries added or overriding."""
    merged = dict(MODULE_MAP)
    if custom_module_map is None:
        return merged
    if isinstance(custom_module_map, dict):
        merged.update(custom_module_map)
    else:
        merged.update(load_custom_module_map(custom_module_map))
    return merged


def _import_target(target: str):
    module_name, _, attr = target.rpartition('.')
    if not module_name:
        raise ArchitectureError(f'module map entry {target!r} is a bare name; give the class itself or a dotted path '
                                "'module.Class' (a bare name works only in a map file that defines that class)")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise ArchitectureError(f'module map entry {target!r} cannot be imported: {e}') from e


def get_model_class(hf_config, custom_module_map: CustomModuleMap = None, architecture: str | None = None):
    """The model class for a config's first architecture (or `architecture`)."""
    module_map = merged_module_map(custom_module_map)
    archs = [architecture] if architecture else list(getattr(hf_config, 'architectures', None) or [])
    if not archs:
        raise ArchitectureError("config.json has no 'architectures' list, so no model class can be chosen; add "
                                f'e.g. "architectures": ["LlamaForCausalLM"]. Registered: {sorted(module_map)}')
    for arch in archs:
        if arch in module_map:
            target = module_map[arch]
            return _import_target(target) if isinstance(target, str) else target
    raise ArchitectureError(f"architecture {archs[0]!r} is not registered in lmdp's module map. Registered: "
                            f"{', '.join(sorted(module_map))}. Port it and register it in MODULE_MAP, or pass "
                            'custom_module_map=/path/to/module_map.py')
