"""Run one function on every rank of a tensor-parallel group (single program, multiple data).

`run_on_ranks(world, fn, *args)` starts ranks 1..world-1 as `pipeline()` does, runs `fn(*args)` on each of them
and on this process (rank 0) with the group set, so models built inside hold their rank's shards and their
collectives meet; it returns every rank's result in rank order. The parity harness runs the port this way
(`pytest parity --tp N`), and tests use it to look inside each rank. `fn`, `args` and the results cross processes
by pickle: `fn` must be a top-level function of an importable module.
"""
import pickle

from ... import envs
from .launch import spawn


def run_on_ranks(world: int, fn, *args, device_type: str = 'cpu') -> list:
    """[fn(*args) on rank 0, ..., on rank world-1]; a rank that fails or dies is a TensorParallelError naming it,
    and every rank has ended when this returns or raises."""
    if world < 2:
        return [fn(*args)]
    if getattr(fn, '__module__', None) == '__main__':
        raise TypeError(f'run_on_ranks: {fn.__qualname__} is defined in __main__, which the other ranks do not run; '
                        'define it in an importable module')
    ranks = spawn(world, device_type, dict(kind='spmd', fn=fn, args=args))
    try:
        with ranks.op('SPMD job'):
            mine = fn(*args)
        others = ranks.wait_for('result', 'running an SPMD job', envs.LMDP_TP_START_TIMEOUT)
    except BaseException:
        ranks.abort('rank 0 failed in an SPMD job')
        raise
    ranks.shutdown()
    return [mine] + [pickle.loads(others[r]) for r in range(1, world)]


def run_rank(job: dict, ranks):
    """A worker's side: run the job, leave its result for rank 0."""
    result = job['fn'](*job['args'])
    ranks.store.set(f'result/{ranks.rank}', pickle.dumps(result))
