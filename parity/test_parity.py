"""The parity suite: one item per tap and phase, then one per whole-model check (options: parity/plugin.py)."""
import pytest


def test_tap(parity_report, parity_tap):
    phase, name = parity_tap
    result = parity_report.tap(phase, name)
    assert result is not None, f'the parity run produced no result for {phase} {name}'
    assert result.passed, result.describe()


def test_check(parity_report, parity_check):
    name, phase = parity_check
    check = parity_report.check(name, phase)
    assert check is not None, f'the parity run produced no {name} check for {phase or "the whole run"}'
    if check.status == 'skipped':
        pytest.skip(check.detail)
    assert check.status == 'passed', check.detail
