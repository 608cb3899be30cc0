"""Activates the parity pytest plugin for `pytest parity` (see parity/plugin.py)."""
from parity.plugin import (parity_report, pytest_addoption, pytest_generate_tests,  # noqa: F401
                           pytest_terminal_summary, pytest_unconfigure)
