"""Module-level lazy exports: a package names what it offers without importing the heavy modules behind it."""
import importlib


def lazy_getattr(package_globals: dict, lazy: dict):
    """A module `__getattr__` that imports `lazy[name]` on first use and caches the attribute in the package."""
    def __getattr__(name):
        if name in lazy:
            value = getattr(importlib.import_module(lazy[name]), name)
            package_globals[name] = value
            return value
        raise AttributeError(f"module {package_globals['__name__']!r} has no attribute {name!r}")
    return __getattr__
