"""lmdp.envs: the one module that reads environment variables, with clear errors for bad values."""
import pathlib
import re

import pytest

from lmdp import envs
from lmdp.errors import EnvError

LMDP = pathlib.Path(__file__).resolve().parents[1] / 'lmdp'


def test_no_module_but_envs_reads_the_environment():
    readers = []
    for path in LMDP.rglob('*.py'):
        if path.name == 'envs.py':
            continue
        text = path.read_text(encoding='utf-8')
        if re.search(r'os\.environ|os\.getenv|getenv\(', text):
            readers.append(str(path.relative_to(LMDP.parent)))
    assert readers == [], f'read environment variables through lmdp.envs, not directly: {readers}'


def test_every_variable_is_documented_and_its_default_parses():
    for name, var in envs.VARIABLES.items():
        assert len(var.doc) > 30, name
        var.parse(var.default)


@pytest.mark.parametrize('name, raw, value', [
    ('LMDP_GEMV_MAX_M', '4', 4), ('LMDP_GEMV_MAX_M', ' 0 ', 0),
    ('LMDP_DECODE_FUSED_REDUCE', '1', True), ('LMDP_DECODE_FUSED_REDUCE', 'off', False),
    ('LMDP_DECODE_FUSED_REDUCE', 'false', False), ('LMDP_DECODE_FUSED_REDUCE', '', False),
    ('LMDP_KERNELS', 'Reference', 'reference'), ('LMDP_KERNELS', '', 'auto'),
])
def test_values_parse(monkeypatch, name, raw, value):
    monkeypatch.setenv(name, raw)
    assert getattr(envs, name) == value


def test_defaults_when_unset(monkeypatch):
    for name in envs.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert (envs.LMDP_GEMV_MAX_M, envs.LMDP_DECODE_FUSED_REDUCE, envs.LMDP_KERNELS) == (2, False, 'auto')


@pytest.mark.parametrize('name, raw, accepted', [
    ('LMDP_GEMV_MAX_M', 'two', 'whole number >= 0'),
    ('LMDP_GEMV_MAX_M', '-1', 'whole number >= 0'),
    ('LMDP_GEMV_MAX_M', '2.5', 'whole number >= 0'),
    ('LMDP_DECODE_FUSED_REDUCE', 'maybe', "'1'"),
    ('LMDP_KERNELS', 'triton', "'reference'"),
])
def test_bad_values_name_the_variable(monkeypatch, name, raw, accepted):
    monkeypatch.setenv(name, raw)
    with pytest.raises(EnvError) as info:
        getattr(envs, name)
    message = str(info.value)
    assert f'{name}={raw!r}' in message and accepted in message


def test_unknown_names_are_refused():
    with pytest.raises(AttributeError, match='LMDP_NOPE is not an environment variable lmdp reads'):
        envs.get('LMDP_NOPE')


def test_describe_lists_every_variable_and_flags_a_bad_one(monkeypatch):
    monkeypatch.setenv('LMDP_GEMV_MAX_M', 'x')
    lines = envs.describe()
    assert [line.split(' ', 1)[0] for line in lines] == list(envs.VARIABLES)
    assert 'INVALID' in next(line for line in lines if line.startswith('LMDP_GEMV_MAX_M'))
    assert 'INVALID' not in next(line for line in lines if line.startswith('LMDP_KERNELS'))
