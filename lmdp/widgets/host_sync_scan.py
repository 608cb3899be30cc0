"""A static scan of a port's forward code for what breaks CUDA-graph capture: host synchronisations and
data-dependent shapes. It reads source, so it runs anywhere, CUDA or not.

A graph records the kernels one decode step launches and replays them with no Python in between. Anything that
needs a value back on the host during the step (`.item()`, `.cpu()`, `.tolist()`, printing a tensor, a Python
`if` on a tensor) fails capture, and an op whose output size depends on the data (`nonzero`, `masked_select`,
`unique`, boolean-mask indexing) cannot be replayed at a fixed size.

Only the port's own classes are read: lmdp's layers and kernels (lmdp.nn, lmdp.kernels, lmdp.backends) have
graph-safe CUDA paths of their own, and torch's modules are torch's.
"""
import ast
import inspect
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

NOT_THE_PORT = ('torch.', 'lmdp.nn', 'lmdp.kernels', 'lmdp.backends', 'transformers.', 'builtins')
# methods that run at load time or on the host by design, never inside a captured step
NOT_IN_STEP = {'__init__', 'load_weights', 'weight_loader', 'extra_repr', '__repr__', 'support_cuda_graph'}

SYNC = ('a host synchronisation: the value must come back to the CPU in the middle of the step, which a CUDA '
        'graph cannot do')
SHAPE = 'a data-dependent shape: the output size depends on tensor values, so no fixed-size graph can replay it'
# pattern -> (reason, fix)
RULES: dict[str, tuple[str, str]] = {
    '.item()': (SYNC, 'keep the value on the device: torch.where / clamp instead of `if x.item() ...`; read sizes '
                'from the step context (max_q_seqlen, max_kv_seqlen), which the host already knows'),
    '.cpu()': (SYNC, 'leave tensors on the device inside forward; copy to the host after the step, outside it'),
    '.tolist()': (SYNC, 'keep per-sequence values as tensors (index or gather with them) instead of Python lists'),
    '.numpy()': (SYNC, 'keep the computation in torch, on the device'),
    ".to('cpu')": (SYNC, 'leave tensors on the device inside forward; copy to the host after the step'),
    '.synchronize()': (SYNC, 'remove it: a replay is ordered on its stream already'),
    'print()': ('a print inside forward runs once, at capture, and printing a tensor copies it to the host '
                '(a synchronisation)', 'remove it, or guard it so it never runs in a decode step'),
    'if on a tensor': (SYNC + ' (a Python branch on a tensor value)',
                       'compute both sides and pick with torch.where, or decide from host-side step fields '
                       '(context.is_decoding, max_q_seqlen)'),
    '.nonzero()': (SHAPE, 'use fixed-shape ops: torch.where(mask, a, b), or multiply by the mask'),
    '.masked_select()': (SHAPE, 'multiply by the mask, or torch.where, so the shape stays fixed'),
    '.unique()': (SHAPE, 'avoid it in forward; precompute on the host before the step'),
    '.argwhere()': (SHAPE, 'use fixed-shape ops: torch.where(mask, a, b), or multiply by the mask'),
    'boolean mask index': (SHAPE, 'use torch.where(mask, x, 0) (or gather with precomputed indices) so the shape '
                           'stays fixed'),
}
_CALLS = {'item': '.item()', 'cpu': '.cpu()', 'tolist': '.tolist()', 'numpy': '.numpy()',
          'synchronize': '.synchronize()', 'nonzero': '.nonzero()', 'masked_select': '.masked_select()',
          'unique': '.unique()', 'argwhere': '.argwhere()'}
_BOOL_REDUCTIONS = {'any', 'all', 'item', 'equal', 'is_nonzero'}


@dataclass
class HostSyncFinding:
    """One line of the port that breaks capture, with why and how to fix it."""
    file: str
    line: int
    function: str          # 'GemmaAttention.forward'
    code: str              # the source line
    pattern: str           # a key of RULES
    reason: str
    fix: str

    @property
    def where(self) -> str:
        return f'{self.file}:{self.line}'


def _pattern(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute):
            if f.attr in _CALLS:
                return _CALLS[f.attr]
            if f.attr == 'to' and any(isinstance(a, ast.Constant) and a.value == 'cpu' for a in
                                      list(node.args) + [k.value for k in node.keywords]):
                return ".to('cpu')"
            if f.attr == 'where' and len(node.args) == 1 and not node.keywords:   # torch.where(cond): nonzero
                return '.nonzero()'
        if isinstance(f, ast.Name) and f.id == 'print' and not all(isinstance(a, ast.Constant) for a in node.args):
            return 'print()'
    if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
        test = node.test
        for sub in ast.walk(test):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and \
                    sub.func.attr in _BOOL_REDUCTIONS:
                return 'if on a tensor'
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Compare):
        return 'boolean mask index'
    return None


def scan_function(fn, qualname: str | None = None) -> list[HostSyncFinding]:
    """Findings in one function's source (empty when its source can't be read)."""
    try:
        lines, start = inspect.getsourcelines(fn)
        path = inspect.getsourcefile(fn) or '?'
    except (OSError, TypeError):
        return []
    tree = ast.parse(textwrap.dedent(''.join(lines)))
    found, seen = [], set()
    for node in ast.walk(tree):
        pattern = _pattern(node)
        if pattern is None:
            continue
        line = start + node.lineno - 1
        if (line, pattern) in seen:
            continue
        seen.add((line, pattern))
        reason, fix = RULES[pattern]
        found.append(HostSyncFinding(path, line, qualname or fn.__qualname__, lines[node.lineno - 1].strip(),
                                     pattern, reason, fix))
    # an `if x.item()` is one problem, not two
    branch_lines = {f.line for f in found if f.pattern == 'if on a tensor'}
    found = [f for f in found if not (f.pattern == '.item()' and f.line in branch_lines)]
    return sorted(found, key=lambda f: (f.file, f.line))


def port_classes(model) -> list[type]:
    """The classes whose code runs in the model's step and belongs to the port (model may be a class)."""
    roots = [model] if isinstance(model, type) else [type(m) for m in model.modules()]
    classes = []
    for root in roots:
        for cls in root.__mro__:
            if cls is object or cls.__module__.startswith(NOT_THE_PORT) or cls in classes:
                continue
            classes.append(cls)
    return classes


def _step_methods(cls) -> Iterable[tuple[str, object]]:
    for name, value in vars(cls).items():
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if inspect.isfunction(fn) and name not in NOT_IN_STEP:
            yield f'{cls.__qualname__}.{name}', fn


def scan_host_syncs(model) -> list[HostSyncFinding]:
    """Every line in the port's step code (forward, get_logits, prepare_inputs_for_generation, helpers) that
    breaks CUDA-graph capture. `model` is an nn.Module or a model class (then only that class and its bases)."""
    findings = []
    for cls in port_classes(model):
        for qualname, fn in _step_methods(cls):
            findings += scan_function(fn, qualname)
    unique = {(f.file, f.line, f.pattern): f for f in findings}
    return sorted(unique.values(), key=lambda f: (f.file, f.line))
