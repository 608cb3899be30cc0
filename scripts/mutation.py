"""Mutation testing of the engine's core with mutmut: plant every small bug mutmut knows, one at a time, and see
whether a fast, focused set of tests notices.

Each module runs in a fresh copy of the repository under the work folder: a setup.cfg there names the files to
mutate and the tests that pin them, and mutmut runs each mutant against those of the tests that call the mutated
function. mutmut leaves decorated functions alone (@property, @contextmanager); their bodies get the same
operators here, each mutant run against the module's tests. Survivors are then sorted three ways:

- listed in notes/mutation.md's "Equivalent mutants" table, with the reason;
- message wording: the mutant only re-cases or wraps ('XX...XX') a string literal of a raise, assert or log
  call, which no test of behaviour can tell (tests pin the error's type and the facts it names);
- open: neither, which is what the tests still have to catch.

The table goes to stdout and `<work>/table.md`, every survivor's diff to `<work>/survivors.md`; `--update-notes`
writes the table into notes/mutation.md. Run it through scripts/mutation.sh.
"""
import argparse
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / 'notes' / 'mutation.md'

def _some(path: str, *prefixes: str) -> list[str]:
    """The tests of `path` whose names start with one of `prefixes`, as pytest node ids (the file's others are
    slow or reach other code)."""
    names = re.findall(r'^def (test_\w+)', (ROOT / path).read_text(), flags=re.M)
    return [f'{path}::{n}' for n in names if n.startswith(prefixes)]


# module -> (files mutated, the tests they run against). The tests are the fast ones that pin the module's
# behaviour; a pipeline over a tiny model appears only where nothing cheaper reaches the code.
MODULES = {
    'sampler': (['lmdp/engine/sampler.py'],
                # the sampler-level properties and examples; not the whole generations alone and batched (seconds
                # per mutant, and they reach the sampler only as the engine's step loop does)
                _some('tests/engine/test_sampler_properties.py', 'test_each_row_', 'test_a_row_', 'test_a_step_',
                      'test_a_batch_', 'test_top_k_', 'test_top_p_', 'test_min_p_', 'test_min_new_tokens_')
                + ['tests/engine/test_sampler_noise.py',
                 'tests/engine/test_mixed_batch.py',
                 'tests/engine/test_sampling.py::test_4000_seeded_draws_follow_the_filtered_distribution',
                 'tests/engine/test_sampling.py::test_logprobs_are_the_raw_model_logprobs']),
    'scheduler': (['lmdp/engine/scheduler.py'],
                  ['tests/engine/test_scheduler.py', 'tests/engine/test_scheduler_properties.py']),
    'sequence': (['lmdp/engine/sequence.py'],
                 ['tests/engine/test_sequence.py', 'tests/engine/test_scheduler.py',
                  'tests/engine/test_scheduler_properties.py']),
    'paging': (['lmdp/paging/block_allocator.py', 'lmdp/paging/block_manager.py'],
               ['tests/engine/test_block_manager.py', 'tests/engine/test_paging_rules.py',
                'tests/engine/test_scheduler_properties.py',
                'tests/test_step_runner.py::test_allocator_shuffles_and_runs_out']),
    'model_inputs': (['lmdp/model_inputs.py'],
                     ['tests/test_model_inputs.py', 'tests/test_step_runner.py',
                      'tests/engine/test_scheduler_properties.py']),
    'weight_loader': (['lmdp/weight_loader/checkpoint.py', 'lmdp/weight_loader/loaders.py',
                       'lmdp/weight_loader/model_weight_loader.py', 'lmdp/weight_loader/tracker.py'],
                      ['tests/test_weight_loader_units.py', 'tests/test_checkpoint_headers.py',
                       'tests/test_weight_loading.py']
                      # the experts' loading. (tests/robustness/test_checkpoints.py pins the messages too, but builds
                      # a tiny checkpoint per mutant: seconds each)
                      + _some('tests/test_moe_layers.py', 'test_per_expert_', 'test_all_experts_',
                              'test_missing_expert_', 'test_loader_errors_')),
    # the parity harness's verdicts, on hand-made metrics, logits, router logits and reports: no transformers run
    'parity_metrics': (['parity/metrics.py', 'parity/noise_floor.py'],
                       _some('tests/parity/test_parity_metrics.py', 'test_diff_', 'test_tolerance_',
                             'test_noise_margin_', 'test_gain_', 'test_rounding_alone_',
                             'test_a_fixed_error_per_channel_', 'test_cosine_', 'test_a_unit_', 'test_the_gain_',
                             'test_metrics_', 'test_judge_', 'test_the_scale_band_', 'test_the_rule_line_')),
    'parity_checks': (['parity/checks.py', 'parity/routing_checks.py'],
                      ['tests/parity/test_parity_checks.py', 'tests/parity/test_parity_routing_forgiveness.py',
                       'tests/parity/test_parity_check_results.py']
                      + _some('tests/parity/test_parity_cuda_graph.py', 'test_skipped_', 'test_bitwise_',
                              'test_a_replay_off_', 'test_a_padded_replay_', 'test_refused_')
                      + _some('tests/parity/test_parity_routing.py', 'test_the_routing_check_', 'test_a_layer_')),
    'parity_report': (['parity/report.py'], ['tests/parity/test_parity_report_model.py']),
}

STATUS = re.compile(r'^\s*(\S+__mutmut_\d+): (.+)$')
KILLED = ('killed', 'timeout')
STRING = re.compile(r"""(?:[rbuRBU]{0,2})('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
MESSAGE_CALL = re.compile(r'^\s*(raise |assert |.*\blogger\.\w+\(|.*\bwarnings\.warn\()')
# a parity check's `detail` (the sentences a person reads): its prose literals (those with a space; a check's name
# and status have none) are wording like an error message's
DETAIL = re.compile(r'.*\bCheckResult\(|^\s*detail \+?= ')


def _env(**extra):
    # no PYTHONPATH: mutmut puts mutants/ first on the path itself, and a folder named on the path before it
    # exists is remembered by Python's importer as empty, so the unmutated lmdp (the editable install) would load
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(HYPOTHESIS_PROFILE='mutation', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    env.update(extra)
    return env


def _lines(values):
    return ''.join(f'\n    {v}' for v in values)


def prepare(module: str, work: Path, suffix: str = '') -> Path:
    """A fresh copy of the repository's files (tracked and untracked-not-ignored) with the module's setup.cfg."""
    where = work / (module + suffix)
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    listed = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', 'lmdp', 'parity', 'tests',
                             'pyproject.toml'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in listed.split():
        if (ROOT / rel).is_file():
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, where / rel)
    _write_config(module, where)
    return where


def _write_config(module: str, where: Path):
    files, tests = MODULES[module]
    # the packages holding the mutated files are mutmut's sources; the other one is copied beside them as is
    sources = sorted({f.split('/')[0] for f in files})
    others = [p for p in ('lmdp', 'parity') if p not in sources]
    (where / 'setup.cfg').write_text(
        '[mutmut]\n'
        f'source_paths ={_lines(sources)}\n'
        f'only_mutate ={_lines(files)}\n'
        + (f'also_copy ={_lines(others)}\n' if others else '') +
        'pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -W\n    ignore::DeprecationWarning\n'
        # a mutant that hangs is killed after 4x its tests' time (+20 s for a busy machine), not mutmut's 15x
        'timeout_multiplier = 4\ntimeout_constant = 20\n'
        f'pytest_add_cli_args_test_selection ={_lines(tests)}\n')


def _mutmut(where: Path, log: Path, *args) -> dict:
    """Run `mutmut run *args` in `where`; every mutant's status and, for those not killed, its diff."""
    with open(log, 'w') as f:
        subprocess.run([sys.executable, '-m', 'mutmut', 'run', *args], cwd=where, env=_env(), stdout=f,
                       stderr=subprocess.STDOUT)
    return collect(where)


def collect(where: Path) -> dict:
    """Every mutant's status in a finished mutmut folder and, for those not killed, its diff."""
    out = subprocess.run([sys.executable, '-m', 'mutmut', 'results', '--all', 'true'], cwd=where, env=_env(),
                         capture_output=True, text=True).stdout
    statuses = dict(m.groups() for m in map(STATUS.match, out.splitlines()) if m)
    # the survivors' diffs in one process (`mutmut show` per mutant costs a second or two each), each with its whole
    # function as context, so a message's opening line (`raise ...(`) is in it however long the message
    show = ('import difflib, json, sys\n'
            'import mutmut.mutation.diff_apply as d\n'
            'd.unified_diff = lambda *a, **k: difflib.unified_diff(*a, n=10**6, **k)\n'
            'print(json.dumps({n: d.get_diff_for_mutant(n, path=d.find_mutant(n).path)\n'
            '                  for n in json.load(sys.stdin)}))')
    alive = [name for name, status in statuses.items() if status not in KILLED]
    diffs = json.loads(subprocess.run([sys.executable, '-c', show], cwd=where, env=_env(), input=json.dumps(alive),
                                      capture_output=True, text=True, check=True).stdout) if alive else {}
    return {name: (status, diffs.get(name, '')) for name, status in statuses.items()}


def run(module: str, work: Path, jobs: int) -> dict:
    start = time.time()
    results = _mutmut(prepare(module, work), work / f'{module}.log', '--max-children', str(jobs))
    results.update(run_decorated(module, work))
    print(f'{module}: {len(results)} mutants in {time.time() - start:.0f} s', flush=True)
    _store(module, work, results, seconds=time.time() - start)
    return results


def _store(module: str, work: Path, results: dict, seconds: float | None = None):
    """Keep a module's results in the work folder, so modules run one at a time make one table."""
    (work / f'{module}.json').write_text(json.dumps({'seconds': seconds, 'mutants': results}, indent=1))


def stored(module: str, work: Path) -> dict | None:
    path = work / f'{module}.json'
    return {k: tuple(v) for k, v in json.loads(path.read_text())['mutants'].items()} if path.exists() else None


def retest(module: str, work: Path, names) -> dict:
    """Run mutants again in the module's existing work folder against the repository's current tests (while
    writing tests for survivors; the table to commit comes from a fresh run)."""
    where = work / module
    for dest in (where, where / 'mutants'):
        shutil.rmtree(dest / 'tests')
        shutil.copytree(ROOT / 'tests', dest / 'tests', ignore=shutil.ignore_patterns('__pycache__'))
    _write_config(module, where)
    # mutmut keeps its map of which tests reach which function when only setup.cfg changed: drop it, so tests
    # added to the module's selection are run too
    (where / 'mutants' / 'mutmut-stats.json').unlink(missing_ok=True)
    plain = [n for n in names if '__decorated_' not in n]
    retested = _mutmut(where, work / f'{module}.retest.log', '--max-children', '1', *plain) if plain else {}
    # mutmut's results list every mutant of the module; only the ones asked for were run again
    results = stored(module, work) or {}
    results.update({k: v for k, v in retested.items() if any(fnmatch.fnmatch(k, n) for n in plain)})
    decorated = [n for n in names if '__decorated_' in n]
    if decorated:
        results.update(run_decorated(module, work, only=decorated))
    _store(module, work, results)
    return results


def decorated_mutants(path: Path, root: Path = ROOT):
    """(name, mutated source) for the bodies of decorated functions other than static and class methods."""
    import libcst as cst
    from mutmut.mutation.file_mutation import deep_replace
    from mutmut.mutation.mutators import mutation_operators

    module = cst.parse_module((root / path).read_text())
    dotted = '.'.join(path.with_suffix('').parts)
    out = []

    def skip(node):
        docstring = isinstance(node, cst.SimpleStatementLine) and len(node.body) == 1 and \
            isinstance(node.body[0], cst.Expr) and isinstance(node.body[0].value, cst.BaseString)
        return docstring or isinstance(node, (cst.Annotation, cst.Decorator))

    def mutate(node, name):
        if skip(node):
            return
        for kind, operator in mutation_operators:
            if isinstance(node, kind):
                for mutated in operator(node):
                    count = sum(n.startswith(f'{dotted}.{name}__') for n, _ in out)
                    out.append((f'{dotted}.{name}__decorated_{count + 1}', deep_replace(module, node, mutated).code))
        for child in node.children:
            mutate(child, name)

    def plain_method(fn):
        return len(fn.decorators) == 1 and isinstance(fn.decorators[0].decorator, cst.Name) and \
            fn.decorators[0].decorator.value in ('staticmethod', 'classmethod')

    def visit(statements, prefix=''):
        for child in statements:
            if isinstance(child, cst.ClassDef):
                visit(child.body.body, f'{prefix}{child.name.value}.')
            elif isinstance(child, cst.FunctionDef) and child.decorators and not plain_method(child):
                mutate(child.body, prefix + child.name.value)

    visit(module.body)
    return out


def run_decorated(module: str, work: Path, only=None) -> dict:
    """Each decorated-function mutant against the module's tests (-x: the first failure kills it); `only`: glob
    patterns of the names to run."""
    files, tests = MODULES[module]
    where = prepare(module, work, suffix='-decorated')
    results = {}
    with open(work / f'{module}-decorated.log', 'w') as log:
        for rel in files:
            original = (where / rel).read_text()
            for name, source in decorated_mutants(Path(rel), where):
                if only is not None and not any(fnmatch.fnmatch(name, n) for n in only):
                    continue
                (where / rel).write_text(source)
                log.write(f'== {name}\n')
                log.flush()
                rc = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
                                    cwd=where, env=_env(PYTHONPATH=str(where)), stdout=log,
                                    stderr=subprocess.STDOUT).returncode
                status = 'killed' if rc == 1 else 'survived' if rc == 0 else f'suspicious (pytest exit {rc})'
                diff = '' if status in KILLED else '\n'.join(difflib.unified_diff(
                    original.splitlines(), source.splitlines(), rel, rel, n=2, lineterm=''))
                results[name] = (status, diff)
            (where / rel).write_text(original)
    return results


def is_wording(diff: str) -> bool:
    """The mutant only re-cases or wraps in XX a string literal of a raise, assert or log statement."""
    lines = diff.splitlines()
    removed = [i for i, line in enumerate(lines) if line.startswith('-') and not line.startswith('---')]
    added = [line[1:] for line in lines if line.startswith('+') and not line.startswith('+++')]
    if len(removed) != 1 or len(added) != 1:
        return False
    i = removed[0]
    old, new = lines[i][1:], added[0]
    if STRING.sub('S', old) != STRING.sub('S', new):
        return False
    pairs = [(a, b) for a, b in zip(STRING.findall(old), STRING.findall(new)) if a != b]
    if len(pairs) != 1:
        return False
    a, b = (s[1:-1] for s in pairs[0])
    if b not in (f'XX{a}XX', a.upper(), a.lower()):
        return False
    return _inside_message(lines, i) or (' ' in a and _inside_message(lines, i, DETAIL))


def _inside_message(lines, i, opener=MESSAGE_CALL) -> bool:
    """Whether diff line i lies in a statement `opener` matches (a raise/assert/log call) that opens on it or on a
    context line above."""
    above = [j for j in range(i - 1, -1, -1) if not lines[j].startswith('+')]
    for j in [i] + above:
        if lines[j].startswith('@@'):
            return False
        if opener.match(lines[j][1:]):
            # every line from the opener down to line i must leave a bracket open
            depth = 0
            for k in range(j, i):
                if lines[k].startswith('+'):
                    continue
                text = STRING.sub('S', lines[k][1:])
                depth += text.count('(') + text.count('[') - text.count(')') - text.count(']')
                if depth <= 0:
                    return False
            return True
    return False


def equivalents() -> dict:
    """Mutant name -> reason, from the rows of notes/mutation.md's 'Equivalent mutants' table."""
    text = NOTES.read_text() if NOTES.exists() else ''
    section = text.split('## Equivalent mutants', 1)[1] if '## Equivalent mutants' in text else ''
    return dict(re.findall(r'^\| `([^`]+)` \| (.+?) \|$', section, flags=re.M))


def classify(results: dict) -> dict:
    """module -> {'killed': [...], 'equivalent': [...], 'wording': [...], 'open': [...]}"""
    equivalent = equivalents()
    out = {}
    for module, mutants in results.items():
        groups = {'killed': [], 'equivalent': [], 'wording': [], 'open': []}
        for name, (status, diff) in sorted(mutants.items()):
            if status in KILLED:
                groups['killed'].append(name)
            elif name in equivalent:
                groups['equivalent'].append(name)
            elif is_wording(diff):
                groups['wording'].append(name)
            else:
                groups['open'].append(name)
        out[module] = groups
    return out


def table(groups: dict) -> str:
    lines = ['| module | mutants | killed | survived | equivalent (listed below) | message wording | open | '
             'killed of non-equivalent |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for module, g in groups.items():
        total = sum(len(v) for v in g.values())
        relevant = len(g['killed']) + len(g['open'])
        score = f'{100 * len(g["killed"]) / relevant:.1f}%' if relevant else 'n/a'
        lines.append(f'| {module} | {total} | {len(g["killed"])} | {total - len(g["killed"])} | '
                     f'{len(g["equivalent"])} | {len(g["wording"])} | {len(g["open"])} | {score} |')
    return '\n'.join(lines) + '\n'


def survivors_report(results: dict, groups: dict) -> str:
    equivalent = equivalents()
    parts = []
    for module, g in groups.items():
        for kind in ('open', 'wording', 'equivalent'):
            for name in g[kind]:
                status, diff = results[module][name]
                why = f' -- {equivalent[name]}' if kind == 'equivalent' else ''
                parts.append(f'### {name} ({kind}, {status}){why}\n\n```diff\n{diff.strip()}\n```\n')
    return '\n'.join(parts)


def _module_of(name: str) -> str | None:
    """The module (a key of MODULES) whose files a mutant's name comes from."""
    for module, (files, _) in MODULES.items():
        if any(name.startswith(f.removesuffix('.py').replace('/', '.') + '.') for f in files):
            return module
    return None


def update_notes(text: str, groups: dict):
    """Write the table into notes/mutation.md. Modules without results in the work folder (run on another machine,
    say) keep the row and message-wording names the notes already hold, so one module can be run again alone."""
    begin, end = '<!-- mutation table: begin -->', '<!-- mutation table: end -->'
    notes = NOTES.read_text()
    if begin not in notes:
        raise SystemExit(f'{NOTES} has no "{begin}" ... "{end}" block to fill')
    head, rest = notes.split(begin, 1)
    old, tail = rest.split(end, 1)
    kept_rows = {m.group(1): m.group(0) for m in re.finditer(r'^\| (\w+) \|.*\|$', old, flags=re.M)
                 if m.group(1) in MODULES and m.group(1) not in groups}
    new_rows = {m.group(1): m.group(0) for m in re.finditer(r'^\| (\w+) \|.*\|$', text, flags=re.M)
                if m.group(1) in MODULES}
    rows = {**kept_rows, **new_rows}
    header = text.splitlines()[:2]
    body = '\n'.join(header + [rows[m] for m in MODULES if m in rows]) + '\n'
    kept_wording = [n for n in re.findall(r'^- `([^`]+)`$', old, flags=re.M)
                    if _module_of(n) in MODULES and _module_of(n) not in groups]
    wording = [(_module_of(n), n) for n in kept_wording] + \
        [(m, n) for m, g in groups.items() for n in g['wording']]
    order = list(MODULES)
    wording = [f'- `{n}`' for _, n in sorted(wording, key=lambda mn: (order.index(mn[0]), mn[1]))]
    body += '\nMessage-wording survivors:\n\n' + '\n'.join(wording) + '\n' if wording else ''
    NOTES.write_text(head + begin + '\n' + body + end + tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('modules', nargs='*', metavar='module', help=f'some of {", ".join(MODULES)} (default: all)')
    parser.add_argument('--work', default=os.environ.get('MUTATION_WORK', '/tmp/lmdp-mutation'))
    parser.add_argument('--jobs', type=int, default=int(os.environ.get('MUTATION_JOBS', 1)),
                        help='mutants tested at once (default 1: the CPU is shared)')
    parser.add_argument('--retest', nargs='+', metavar='MUTANT',
                        help="run these mutants of one module again in its work folder (globs like 'x_f__mutmut_*')")
    parser.add_argument('--stored', action='store_true',
                        help='run nothing: the table from the results kept in the work folder (with --update-notes)')
    parser.add_argument('--collect', action='store_true',
                        help="read the modules' finished mutmut runs from the work folder instead of running them")
    parser.add_argument('--update-notes', action='store_true', help='write the table into notes/mutation.md')
    args = parser.parse_args()
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        parser.error(f'unknown module(s) {sorted(unknown)}; choose from {", ".join(MODULES)}')
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.retest:
        if len(args.modules) != 1:
            parser.error('--retest takes exactly one module')
        results = {args.modules[0]: retest(args.modules[0], work, args.retest)}
    elif args.stored:
        results = {}
    elif args.collect:
        # a mutmut run that finished (or was stopped) in the module's folder: read its results, run the decorated
        # mutants, keep them
        results = {}
        for m in args.modules:
            results[m] = collect(work / m)
            results[m].update(run_decorated(m, work))
            _store(m, work, results[m])
    else:
        results = {m: run(m, work, args.jobs) for m in (args.modules or MODULES)}
    if args.update_notes or args.stored:
        # the table covers every module with results in the work folder, in MODULES' order
        results = {m: results.get(m) or stored(m, work) for m in MODULES if m in results or stored(m, work)}
    groups = classify(results)
    text = table(groups)
    (work / 'table.md').write_text(text)
    (work / 'survivors.md').write_text(survivors_report(results, groups))
    print(text + f'\nsurvivors and their diffs: {work / "survivors.md"}')
    if args.update_notes:
        update_notes(text, groups)


if __name__ == '__main__':
    main()
