"""Mutation testing of the engine's core with mutmut: plant every small bug mutmut knows, one at a time, and see
whether a fast, focused set of tests notices.

Each module runs in a fresh copy of the repository under the work folder (a setup.cfg there names the files to
mutate and the tests that pin them; mutmut runs each mutant against the tests that call the mutated function).
The table of killed and surviving mutants goes to stdout and `<work>/table.md`; survivors listed in
notes/mutation.md's "Equivalent mutants" table, with the reason, are counted apart. `--update-notes` writes the
table into notes/mutation.md. Run it through scripts/mutation.sh.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / 'notes' / 'mutation.md'

# module -> (files mutmut mutates, the tests it runs them against). The tests are the fast ones that pin the
# module's behaviour; pipelines over a tiny model appear only where nothing cheaper reaches the code.
MODULES = {
    'sampler': (['lmdp/engine/sampler.py'],
                ['tests/engine/test_sampler_properties.py', 'tests/engine/test_mixed_batch.py',
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
                     ['tests/test_step_runner.py', 'tests/engine/test_scheduler_properties.py']),
    'weight_loader': (['lmdp/weight_loader/checkpoint.py', 'lmdp/weight_loader/loaders.py',
                       'lmdp/weight_loader/model_weight_loader.py', 'lmdp/weight_loader/tracker.py'],
                      ['tests/test_weight_loader_units.py', 'tests/test_weight_loading.py']),
}

STATUS = re.compile(r'^\s*(\S+__mutmut_\d+): (.+)$')


def _lines(values):
    return ''.join(f'\n    {v}' for v in values)


def prepare(module: str, work: Path, suffix: str = '') -> Path:
    """A fresh copy of the repository's files (tracked and untracked-not-ignored) with the module's setup.cfg."""
    files, tests = MODULES[module]
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
    (where / 'setup.cfg').write_text(
        '[mutmut]\n'
        'source_paths = lmdp\n'
        f'only_mutate ={_lines(files)}\n'
        'also_copy = parity\n'
        # -p no:cacheprovider: no .pytest_cache; the warnings filter keeps logs short
        'pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -W\n    ignore::DeprecationWarning\n'
        f'pytest_add_cli_args_test_selection ={_lines(tests)}\n')
    return where


def run(module: str, work: Path, jobs: int) -> dict:
    where = prepare(module, work)
    # no PYTHONPATH: mutmut puts mutants/ first on the path itself, and a path named before that folder exists
    # is cached by Python's importer as empty, so the unmutated lmdp (the editable install) would load instead
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(HYPOTHESIS_PROFILE='mutation', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    log = work / f'{module}.log'
    start = time.time()
    with open(log, 'w') as f:
        subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', str(jobs)], cwd=where, env=env,
                       stdout=f, stderr=subprocess.STDOUT)
    out = subprocess.run([sys.executable, '-m', 'mutmut', 'results', '--all', 'true'], cwd=where, env=env,
                         capture_output=True, text=True).stdout
    statuses = dict(m.groups() for m in map(STATUS.match, out.splitlines()) if m)
    statuses.update(run_decorated(module, work))
    print(f'{module}: {len(statuses)} mutants in {time.time() - start:.0f} s ({log})', flush=True)
    return statuses


def retest(module: str, work: Path, names) -> dict:
    """Run some mutants again in the module's existing work folder, against the repository's current tests."""
    where = work / module
    for dest in (where, where / 'mutants'):
        shutil.rmtree(dest / 'tests')
        shutil.copytree(ROOT / 'tests', dest / 'tests', ignore=shutil.ignore_patterns('__pycache__'))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(HYPOTHESIS_PROFILE='mutation', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    with open(work / f'{module}.retest.log', 'w') as f:
        subprocess.run([sys.executable, '-m', 'mutmut', 'run', '--max-children', '1', *names], cwd=where, env=env,
                       stdout=f, stderr=subprocess.STDOUT)
    out = subprocess.run([sys.executable, '-m', 'mutmut', 'results', '--all', 'true'], cwd=where, env=env,
                         capture_output=True, text=True).stdout
    return dict(m.groups() for m in map(STATUS.match, out.splitlines()) if m)


def decorated_mutants(path: Path):
    """(name, mutated source) for the bodies of decorated functions (@property, @contextmanager), which mutmut
    leaves alone (it can't put its switch in front of them); mutmut's own mutation operators, one at a time."""
    import libcst as cst
    from mutmut.mutation.file_mutation import deep_replace
    from mutmut.mutation.mutators import mutation_operators

    module = cst.parse_module(path.read_text())
    dotted = '.'.join(path.with_suffix('').parts)
    out = []

    def skip(node):
        docstring = isinstance(node, cst.SimpleStatementLine) and len(node.body) == 1 and \
            isinstance(node.body[0], cst.Expr) and isinstance(node.body[0].value, cst.BaseString)
        return docstring or isinstance(node, (cst.Annotation, cst.Decorator))

    def mutate(node, name, body_of):
        if skip(node):
            return
        for kind, operator in mutation_operators:
            if isinstance(node, kind):
                for mutated in operator(node):
                    out.append((f'{dotted}.{name}__decorated_{len([n for n, _ in out if n.startswith(f"{dotted}.{name}__")]) + 1}',
                                deep_replace(module, node, mutated).code))
        for child in node.children:
            mutate(child, name, body_of)

    def visit(node, prefix=''):
        for child in getattr(node, 'body', ()) if not isinstance(node, cst.IndentedBlock) else node.body:
            if isinstance(child, cst.ClassDef):
                visit(child.body, f'{prefix}{child.name.value}.')
            elif isinstance(child, cst.FunctionDef) and child.decorators and not (
                    len(child.decorators) == 1 and isinstance(child.decorators[0].decorator, cst.Name)
                    and child.decorators[0].decorator.value in ('staticmethod', 'classmethod')):
                mutate(child.body, prefix + child.name.value, child)

    visit(module)
    return out


def run_decorated(module: str, work: Path) -> dict:
    """Each decorated-function mutant against the module's tests (-x: the first failure kills it)."""
    files, tests = MODULES[module]
    where = prepare(module, work, suffix='-decorated')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(HYPOTHESIS_PROFILE='mutation', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1',
               PYTHONPATH=str(where))
    statuses = {}
    with open(work / f'{module}-decorated.log', 'w') as log:
        for rel in files:
            original = (where / rel).read_text()
            for name, source in decorated_mutants(Path(rel)):
                (where / rel).write_text(source)
                log.write(f'== {name}\n')
                log.flush()
                rc = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
                                    cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                statuses[name] = 'killed' if rc == 1 else 'survived' if rc == 0 else f'suspicious (pytest exit {rc})'
            (where / rel).write_text(original)
    return statuses


def equivalents() -> dict:
    """Mutant name -> reason, from the rows of notes/mutation.md's 'Equivalent mutants' table."""
    if not NOTES.exists():
        return {}
    text = NOTES.read_text()
    section = text.split('## Equivalent mutants', 1)[-1] if '## Equivalent mutants' in text else ''
    rows = re.findall(r'^\| `([^`]+__mutmut_\d+)` \| (.+?) \|$', section, flags=re.M)
    return dict(rows)


def table(results: dict) -> str:
    equivalent = equivalents()
    lines = ['| module | mutants | killed | survived | of them equivalent | not killed, not equivalent | '
             'killed of non-equivalent |', '| --- | --- | --- | --- | --- | --- | --- |']
    for module, statuses in results.items():
        counts = Counter('killed' if s in ('killed', 'timeout') else s for s in statuses.values())
        not_killed = [m for m, s in statuses.items() if s not in ('killed', 'timeout')]
        eq = [m for m in not_killed if m in equivalent]
        open_ = [m for m in not_killed if m not in equivalent]
        relevant = len(statuses) - len(eq)
        score = f'{100 * counts["killed"] / relevant:.1f}%' if relevant else 'n/a'
        lines.append(f'| {module} | {len(statuses)} | {counts["killed"]} | {len(not_killed)} | {len(eq)} | '
                     f'{len(open_)} | {score} |')
    others = sorted(m for statuses in results.values() for m, s in statuses.items()
                    if s not in ('killed', 'timeout') and m not in equivalent)
    if others:
        lines += ['', 'Not killed and not listed as equivalent:', '']
        lines += [f'- `{m}`: {next(s[m] for s in results.values() if m in s)}' for m in others]
    stale = sorted(set(equivalent) - {m for s in results.values() for m in s})
    if stale and len(results) == len(MODULES):
        lines += ['', 'Listed as equivalent but not produced by this run (stale rows):', '']
        lines += [f'- `{m}`' for m in stale]
    return '\n'.join(lines) + '\n'


def update_notes(text: str):
    begin, end = '<!-- mutation table: begin -->', '<!-- mutation table: end -->'
    notes = NOTES.read_text()
    if begin not in notes:
        raise SystemExit(f'{NOTES} has no {begin} ... {end} block to fill')
    head, rest = notes.split(begin, 1)
    NOTES.write_text(head + begin + '\n' + text + end + rest.split(end, 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('modules', nargs='*', choices=[[], *MODULES], default=[], metavar='module',
                        help=f'some of {", ".join(MODULES)} (default: all)')
    parser.add_argument('--work', default=os.environ.get('MUTATION_WORK', '/tmp/lmdp-mutation'))
    parser.add_argument('--jobs', type=int, default=int(os.environ.get('MUTATION_JOBS', 1)),
                        help='mutants tested at once (default 1: the CPU is shared)')
    parser.add_argument('--update-notes', action='store_true', help='write the table into notes/mutation.md')
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {m: run(m, work, args.jobs) for m in (args.modules or MODULES)}
    text = table(results)
    (work / 'table.md').write_text(text)
    print(text)
    if args.update_notes:
        update_notes(text)


if __name__ == '__main__':
    main()
