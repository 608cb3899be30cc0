"""ParityReport's data model on hand-made taps and checks (no model run): which taps carry the verdict, where the
first divergence is, the series for plots, the lines it prints, and the JSON round trip with inf and NaN."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import example, given, settings, strategies as st

from parity.console import format_report
from parity.metrics import Metrics
from parity.report import CheckResult, ParityReport, TapResult, _finite, _unfinite


def _metrics(rel, gain=0.0, where=(0, 1, 2)):
    return Metrics(max_abs=10 * rel, where=where, rel_l2=rel, cosine=1 - rel, rel_l2_per_seq=[rel, rel / 2],
                   gain=gain, gain_se=1e-4)


def _tap(phase, tap, rel=1e-3, tol=1e-2, view='local', floor=2.5e-3, rule=None, error=None, gain=0.0):
    layer = int(tap.split('.')[1]) if tap.startswith('layers.') else None
    kind = tap.split('.')[-1]
    if error:
        return TapResult(phase, tap, kind, layer, None, None, tol, False, error=error, view=view)
    rule = rule or ('error' if rel > tol else None)
    return TapResult(phase, tap, kind, layer, _metrics(rel, gain), None if floor is None else _metrics(floor),
                     tol, rule is None, view=view, gain_tolerance=2e-3, failed_rule=rule)


TAPS = ['embed', 'layers.0.attn', 'layers.0.mlp', 'layers.1.attn', 'layers.1.mlp', 'logits']


def _report(bad=(), checks=()):
    """Every tap of prefill, decode, decode.0 (local) and prefill (accumulated) at 1e-3; `bad`: (phase, tap, view)
    at 5e-2, over the 1e-2 tolerance."""
    taps = [_tap(phase, name, rel=5e-2 if (phase, name, view) in bad else 1e-3, view=view)
            for phase, view in (('prefill', 'local'), ('decode', 'local'), ('decode.0', 'local'),
                                ('prefill', 'accumulated'))
            for name in TAPS]
    return ParityReport('/m', 'LlamaForCausalLM', 'my.Port', 'bfloat16', 'cpu', [3, 5], 2, 'a rule', taps=taps,
                        checks=list(checks))


def test_ratio_is_the_error_over_the_tolerance_and_infinite_when_not_compared():
    assert _tap('prefill', 'embed', rel=3e-3, tol=1.5e-2).ratio == pytest.approx(0.2)
    assert _tap('prefill', 'embed', error='no module').ratio == math.inf


def test_the_verdict_is_the_local_pooled_phases_only():
    assert _report().passed
    for view_only in (('decode.0', 'layers.0.mlp', 'local'), ('prefill', 'layers.0.mlp', 'accumulated')):
        report = _report(bad=[view_only])
        assert report.passed and report.first_divergence is None, view_only
    assert not _report(bad=[('decode', 'logits', 'local')]).passed
    assert [(t.phase, t.view) for t in _report().main_taps] == [('prefill', 'local')] * 6 + [('decode', 'local')] * 6


def test_checks_fail_the_report_only_when_failed():
    skipped = CheckResult('cuda_graph', None, 'skipped', 'needs CUDA')
    passed = CheckResult('logprob_kl', 'decode', 'passed', 'ok')
    assert _report(checks=[skipped, passed]).passed and skipped.passed
    failed = CheckResult('greedy', None, 'failed', 'no')
    assert not failed.passed and not _report(checks=[skipped, failed]).passed
    assert (passed.id, failed.id) == ('logprob_kl-decode', 'greedy')
    report = _report(checks=[skipped, passed, failed])
    assert report.check('logprob_kl', 'decode') is passed and report.check('greedy') is failed
    assert report.check('logprob_kl') is None and report.check('top5', 'decode') is None


def test_first_divergence_is_prefill_first_in_forward_order():
    report = _report(bad=[('decode', 'layers.0.attn', 'local'), ('prefill', 'layers.1.mlp', 'local'),
                          ('prefill', 'logits', 'local')])
    first = report.first_divergence
    assert (first.phase, first.tap) == ('prefill', 'layers.1.mlp')
    assert report.first_divergence_in('decode').tap == 'layers.0.attn'
    decode_only = _report(bad=[('decode', 'layers.0.mlp', 'local'), ('decode', 'logits', 'local')])
    assert (decode_only.first_divergence.phase, decode_only.first_divergence.tap) == ('decode', 'layers.0.mlp')
    acc = _report(bad=[('prefill', 'layers.0.attn', 'accumulated')])
    assert acc.first_divergence_in('prefill', 'accumulated').tap == 'layers.0.attn'
    assert acc.first_divergence_in('prefill') is None


def test_taps_are_found_by_phase_name_and_view():
    report = _report()
    assert report.views == ['local', 'accumulated']
    assert [t.tap for t in report.phase_results('decode.0')] == TAPS
    assert [t.view for t in report.phase_results('prefill', 'accumulated')] == ['accumulated'] * 6
    found = report.tap('prefill', 'layers.1.attn', 'accumulated')
    assert (found.phase, found.tap, found.view) == ('prefill', 'layers.1.attn', 'accumulated')
    assert report.tap('decode', 'layers.1.attn').view == 'local'
    assert report.tap('decode', 'layers.7.attn') is None


def test_per_layer_series_fill_missing_layers_with_none():
    taps = [_tap('prefill', 'layers.0.mlp', rel=1e-3), _tap('prefill', 'layers.2.mlp', rel=3e-3, floor=None),
            _tap('prefill', 'layers.1.mlp', error='no module'), _tap('prefill', 'layers.1.mlp', rel=9.0, view='x'),
            _tap('decode', 'layers.3.mlp', rel=1.0), _tap('prefill', 'layers.3.attn', rel=1.0)]
    report = ParityReport('/m', 'A', 'P', 'bfloat16', 'cpu', [3], 1, 'r', taps=taps)
    assert report.per_layer('prefill', 'mlp') == [1e-3, None, 3e-3]
    assert report.per_layer('prefill', 'mlp', 'floor') == [2.5e-3, None, None]
    assert report.per_layer('prefill', 'mlp', 'tolerance') == [1e-2, 1e-2, 1e-2]
    assert report.per_layer('prefill', 'mlp', view='x') == [None, 9.0]
    assert report.per_layer('prefill', 'norm') == []


def _parts(line):
    """'<where>: relative L2 error A VERDICT tolerance B[, floor C]; max |a-b| D at (...) E; worst token cosine F
    [; scale error G (VERDICT H: the port is Kx transformers here)]' -> its fields."""
    m = re.fullmatch(r'(\S+) (\S+) \((\w+)\): relative L2 error (\S+) (\w+) tolerance (\S+?)(?:, floor (\S+))?; '
                     r'max \|a-b\| (\S+) at \(sequence, token, channel\) \((\d+), (\d+), (\d+)\); worst token cosine '
                     r'(\S+?)(?:; scale error (\S+) \((\w+) (\S+): the port is (\S+)x transformers here\))?', line)
    assert m, line
    return m.groups()


def test_describe_states_the_numbers_and_which_rule_failed():
    over = _tap('decode', 'layers.1.mlp', rel=5e-2, tol=1e-2, gain=3e-3)
    over.floor.gain = 1e-3
    parts = _parts(over.describe())
    assert parts[:6] == ('decode', 'layers.1.mlp', 'local', '5.00e-02', 'OVER', '1.00e-02')
    assert parts[6:12] == ('2.50e-03', '5.000e-01', '0', '1', '2', '0.950000')
    # the scale error is port.gain - floor.gain: within its tolerance, as the rule that failed is the L2 one
    assert parts[12:] == ('+2.00e-03', 'within', '2.0e-03', '1.00200')
    scaled = _tap('prefill', 'embed', rel=1e-3, rule='gain', gain=-4e-3)
    parts = _parts(scaled.describe())
    assert (parts[4], parts[12], parts[13], parts[15]) == ('within', '-4.00e-03', 'OVER', '0.99600')
    no_floor = _parts(_tap('prefill', 'embed', floor=None).describe())
    assert no_floor[4:7] == ('within', '1.00e-02', None) and no_floor[12] is None
    missing = _tap('prefill', 'layers.0.attn', error='the port has no module for it', view='accumulated')
    assert missing.describe() == 'prefill layers.0.attn (accumulated): not compared: the port has no module for it'


def test_divergence_line_names_the_layer_and_the_rule():
    assert _report().divergence_line() == 'first divergence: none'
    line = _report(bad=[('prefill', 'layers.1.mlp', 'local')]).divergence_line()
    assert line == 'first divergence: layer 1, mlp (prefill: relative L2 error 5.00e-02 > tolerance 1.00e-02)'
    assert _report(bad=[('decode', 'logits', 'local')]).divergence_line() == \
        'first divergence: logits (decode: relative L2 error 5.00e-02 > tolerance 1.00e-02)'
    report = _report()
    report.taps[2] = _tap('prefill', 'layers.0.mlp', error='the port has no module for it')
    assert report.divergence_line() == 'first divergence: layer 0, mlp (prefill: the port has no module for it)'
    report.taps[2] = _tap('prefill', 'layers.0.mlp', rule='gain', gain=6e-3)
    report.taps[2].floor.gain = 2.5e-3
    assert report.divergence_line() == ('first divergence: layer 0, mlp (prefill: scale error +3.50e-03 > 2.0e-03, '
                                        'the port is 1.00350x transformers)')


def test_summary_is_the_console_table():
    report = _report(bad=[('prefill', 'layers.0.attn', 'local')])
    assert report.summary() == format_report(report)


def test_json_round_trip_keeps_every_field_and_adds_the_verdict(tmp_path):
    report = _report(bad=[('decode', 'layers.1.attn', 'local')],
                     checks=[CheckResult('greedy', None, 'failed', 'no', value=1.0, bound=2.0, data={'a': [1]})])
    report.taps[1] = _tap('prefill', 'layers.0.attn', error='no module', view='local')
    report.taps[3].port.rel_l2 = math.inf
    report.taps[4].port.cosine = math.nan
    report.timings = {'port': 1.5}
    d = report.to_dict()
    assert d['passed'] is False and d['first_divergence'] == {'phase': 'prefill', 'tap': 'layers.0.attn',
                                                              'layer': 0, 'kind': 'attn'}
    assert d['taps'][1]['port'] is None and d['taps'][0]['floor']['where'] == (0, 1, 2)
    assert _report().to_dict()['first_divergence'] is None and _report().to_dict()['passed'] is True
    paths = report.save(str(tmp_path / 'out'))
    assert paths == {'json': str(tmp_path / 'out' / 'report.json'), 'html': str(tmp_path / 'out' / 'report.html')}
    assert report.save(str(tmp_path / 'out')) == paths                   # again, into the folder it made
    assert open(paths['html'], encoding='utf-8').read().lstrip().lower().startswith('<!doctype html')
    text = open(paths['json'], encoding='utf-8').read()
    assert json.loads(text)['taps'][3]['port']['rel_l2'] == 'inf'          # valid JSON: no bare Infinity/NaN
    loaded = ParityReport.load(paths['json'])
    assert loaded.taps[3].port.rel_l2 == math.inf and math.isnan(loaded.taps[4].port.cosine)
    assert loaded.taps[1].port is None and loaded.taps[1].error == 'no module'
    assert loaded.taps[0].port.where == (0, 1, 2) and loaded.taps[0] == report.taps[0]
    assert loaded.checks == report.checks and loaded.timings == {'port': 1.5}
    assert json.dumps(_finite(loaded.to_dict())) == json.dumps(_finite(d))


def test_a_report_without_taps_or_checks_loads_empty():
    d = _report().to_dict()
    del d['taps'], d['checks']
    loaded = ParityReport.from_dict(d)
    assert (loaded.taps, loaded.checks, loaded.passed) == ([], [], True)


def test_report_files_are_utf8_whatever_the_locale(tmp_path):
    """A model path or a detail may hold any character; under an ASCII locale (LC_ALL=C, no UTF-8 mode) the
    report is still written and read back."""
    env = dict(os.environ, LC_ALL='C', PYTHONCOERCECLOCALE='0', PYTHONUTF8='0', PYTHONPATH=os.pathsep.join(sys.path))
    # the command line must be ASCII under this locale: the characters are escapes in the code
    code = ('import sys; from parity.report import ParityReport as R, CheckResult as C; '
            "r = R('/mod\\u00e8les/\\u03bb', 'A', 'P', 'float32', 'cpu', [3], 1, 'rule \\u2264 4', "
            "checks=[C('greedy', None, 'failed', 'port picks 3 \\u2260 4')]); p = r.save(sys.argv[1]); "
            "print(R.load(p['json']).to_dict() == r.to_dict(), '\\u2260' in open(p['html'], encoding='utf-8').read())")
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.split()) == (0, ['True', 'True']), out.stderr[-2000:]


_LEAF = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.none(),
                  st.text(max_size=4).filter(lambda s: s not in ('inf', '-inf', 'nan')))


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=40, deadline=None)
@given(st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8))
@example({'a': [math.inf, -math.inf, (math.nan, 'x')], 'b': 1.5})
def test_inf_and_nan_survive_strict_json_anywhere_in_the_report(value):
    text = json.dumps(_finite(value), allow_nan=False)      # raises on a bare inf/nan left behind
    assert _same(value, _unfinite(json.loads(text)))
