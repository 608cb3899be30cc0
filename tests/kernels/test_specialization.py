"""Kernels whose integer arguments change from step to step (token and pair counts, the block table's width) must
not be specialised on them: Triton compiles a variant per value class (1, a multiple of 16, other), and a serving
engine would stall for a compile in the middle of a run whenever a new class shows up."""
import ast
import pathlib

import pytest

KERNELS = pathlib.Path(__file__).parents[2] / 'lmdp' / 'kernels' / 'triton'
# arguments that vary per step, by kernel; each must be in its kernel's do_not_specialize
VARYING = {
    '_fill_kv_cache_kernel': {'batch', 'stride_bo'},
    '_rotary_fill_kv_cache_kernel': {'batch', 'stride_bob'},
    '_prefill_kernel': {'stride_bo'},
    '_grouped_gate_up': {'num_pairs', 'num_blocks'},
    '_grouped_down': {'num_pairs', 'num_blocks'},
    '_softmax_topk_kernel': {'num_tokens'},
    '_fp8_matmul': {'M'},
    '_awq_matmul': {'M'},
    '_count_kernel': {'num_pairs'},
    '_offsets_kernel': {'num_chunks', 'num_pairs', 'size'},
    '_scatter_kernel': {'num_pairs'},
    '_align_fused_kernel': {'num_chunks', 'num_pairs', 'size'},
}


def _jit_kernels():
    """{kernel name: (its argument names, its do_not_specialize names)} over lmdp's Triton modules."""
    found = {}
    for path in sorted(KERNELS.glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and ast.unparse(dec.func) == 'triton.jit':
                    names = set()
                    for kw in dec.keywords:
                        if kw.arg == 'do_not_specialize':
                            names = {ast.literal_eval(e) for e in kw.value.elts}
                    found[node.name] = ({a.arg for a in node.args.args}, names)
                elif ast.unparse(dec) == 'triton.jit':
                    found[node.name] = ({a.arg for a in node.args.args}, set())
    return found


def test_every_name_given_to_do_not_specialize_is_an_argument():
    # Triton ignores a name that is no argument: a typo would silently bring the recompiles back
    for name, (args, dns) in _jit_kernels().items():
        assert dns <= args, f'{name}: do_not_specialize names {sorted(dns - args)}, which are not its arguments'


@pytest.mark.parametrize('kernel', sorted(VARYING))
def test_step_varying_arguments_are_not_specialised(kernel):
    args, dns = _jit_kernels()[kernel]
    assert VARYING[kernel] <= args, f'{kernel} no longer takes {sorted(VARYING[kernel] - args)}: update VARYING'
    assert VARYING[kernel] <= dns, f'{kernel} is specialised on {sorted(VARYING[kernel] - dns)}'
