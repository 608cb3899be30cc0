"""Resolving an architecture to its model class: the built-in MODULE_MAP, overridden by a user's custom map.

A custom module map is a Python file that defines `MODULE_MAP = {'ArchName': 'pkg.module.Class' or Class}`.
Dotted paths resolve with the map file's folder on `sys.path`, so a map can sit next to the user's model file
outside lmdp's source.
"""
import importlib
import importlib.util
import os
import sys
from typing import Dict, Optional, Union

from ..errors import ArchitectureError
from .module_map import MODULE_MAP

CustomModuleMap = Union[None, str, Dict[str, object]]


def load_custom_module_map(path: str) -> Dict[str, object]:
    """The MODULE_MAP a user's file defines, with its dotted paths importable."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'custom_module_map must be a path to a .py file or a dict, got {type(path).__name__}')
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'custom module map {path!r} does not exist; pass the path of a .py file that '
                                'defines MODULE_MAP')
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f'lmdp_custom_module_map_{abs(hash(path))}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    mapping = getattr(module, 'MODULE_MAP', None)
    if not isinstance(mapping, dict):
        raise ArchitectureError(f'custom module map {path!r} defines no MODULE_MAP dict')
    return dict(mapping)


def merged_module_map(custom_module_map: CustomModuleMap = None) -> Dict[str, object]:
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
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise ArchitectureError(f'module map entry {target!r} cannot be imported: {e}') from e


def get_model_class(hf_config, custom_module_map: CustomModuleMap = None, architecture: Optional[str] = None):
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
