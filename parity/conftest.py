"""Registers the parity plugin (parity/plugin.py) where pytest did not load it as the installed `parity` entry
point: a checkout on PYTHONPATH, or PYTEST_DISABLE_PLUGIN_AUTOLOAD=1. `-p no:parity` turns it off either way."""
from parity import plugin as _plugin


def pytest_addoption(parser, pluginmanager):
    if pluginmanager.is_blocked(_plugin.NAME):
        return
    if not pluginmanager.is_registered(_plugin):
        pluginmanager.register(_plugin, _plugin.NAME)
    _plugin.add_parity_options(parser)    # pytest is collecting the suite's folder: its options are wanted
