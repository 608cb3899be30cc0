"""The console table of a ParityReport: one row per tap, one column group per phase (the layer-local error, its
floor, tolerance and verdict, then the accumulated error for comparison), then the whole-model checks."""

_MARK = {'passed': 'ok', 'failed': 'FAIL', 'skipped': 'skip'}


def _cell(result, accumulated=None) -> str:
    acc = f'{accumulated.port.rel_l2:9.2e}' if accumulated is not None and accumulated.port is not None else \
        f"{'-':>9}"
    if result is None:
        return f"{'':>9} {'':>8} {'':>8} {'':4} {'':>9}"
    if result.error:
        return f"{'n/a':>9} {'':>8} {'':>8} {'FAIL':4} {acc}"
    floor = f'{result.floor.rel_l2:8.1e}' if result.floor is not None else f"{'-':>8}"
    verdict = 'ok' if result.passed else ('FAIL' if result.failed_rule != 'gain' else 'SCAL')
    return f'{result.port.rel_l2:9.2e} {floor} {result.tolerance:8.1e} {verdict:4} {acc}'


def format_report(report) -> str:
    phases = [p for p in ('prefill', 'decode') if report.phase_results(p)]
    first = report.first_divergence
    names = list(dict.fromkeys(t.tap for t in report.taps))
    width = max([len(n) for n in names] + [4])
    lines = [f'lmdp parity: {report.model_path} ({report.architecture} -> {report.port_class})',
             f'{report.dtype} on {report.device}; {len(report.prompt_lengths)} prompts of '
             f'{", ".join(map(str, report.prompt_lengths))} tokens packed in one prefill, '
             f'{report.decode_steps} decode steps',
             f'rule: {report.rule}', '']
    header = f"{'tap':<{width}}"
    sub = f"{'':<{width}}"
    for phase in phases:
        header += f' | {phase:^42}'
        sub += f" | {'local err':>9} {'floor':>8} {'tol':>8} {'':4} {'accum err':>9}"
    lines += [header, sub]
    for name in names:
        row = f'{name:<{width}}'
        for phase in phases:
            row += ' | ' + _cell(report.tap(phase, name), report.tap(phase, name, 'accumulated'))
        if first is not None and name == first.tap:
            row += f'  <- first divergence ({first.phase})'
        lines.append(row)
    lines.append('(SCAL: within the error tolerance, but a scale the floor does not have; the description of the '
                 'tap says how large)' if any(t.failed_rule == 'gain' for t in report.main_taps) else '')
    for check in report.checks:
        phase = f' ({check.phase})' if check.phase else ''
        lines.append(f'[{_MARK[check.status]:>4}] {check.name}{phase}: {check.detail}')
    missing = [t for t in report.main_taps if t.error]
    for t in missing[:5]:
        lines.append(f'[FAIL] tap {t.tap} ({t.phase}) not compared: {t.error}')
    if report.timings:
        lines.append(f"time: {report.timings.get('total', 0.0):.1f} s (" + ', '.join(
            f'{k} {v:.1f}' for k, v in report.timings.items() if k != 'total') + ')')
    from .quantized import describe_quantization
    lines += describe_quantization(report.quantization)
    lines.append(report.divergence_line())
    failed = [t for t in report.main_taps if not t.passed]
    failed_checks = [c for c in report.checks if c.status == 'failed']
    verdict = 'PASS' if report.passed else 'FAIL'
    lines.append(f'{verdict}: {len(report.main_taps) - len(failed)}/{len(report.main_taps)} taps within tolerance, '
                 f'{len(failed_checks)} whole-model check(s) failed')
    return '\n'.join(lines)
