"""Starting the ranks of a tensor-parallel engine, joining them into process groups, and ending them.

Two ways in, one code path after them:

- `pipeline()` on one host: the calling process is rank 0. It hosts a TCP store on 127.0.0.1 and starts ranks
  1..N-1 as child processes (`python -c ... lmdp.engine.tp.worker`, with this process's `sys.path`), which meet it
  there.
- `torchrun` (one host or many): torchrun starts every rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT; every rank initialises from them (env://). Rank 0 runs the engine; on the others `pipeline()`
  serves rank 0's steps (lmdp.engine.tp.worker.serve_env).

Each rank then joins two process groups: the default one carries the layers' collectives and each step's tensors
(NCCL on CUDA, gloo on the CPU; a rank that keeps the others waiting longer than LMDP_TP_TIMEOUT fails them), and
a gloo group carries each step's small header (a worker waits on it, idle, for as long as rank 0 has no work).
Start-up (who is ready, who loaded, the plan of the KV cache) goes through the store, which rank 0 polls, so a rank
that dies while starting is reported at once instead of after a timeout.
"""
import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ... import envs
from ...distributed import TPGroup, set_tp_group
from ...errors import TensorParallelError
from .health import Watch

# how long an idle worker waits for rank 0's next step
CONTROL_TIMEOUT = timedelta(days=30)
# a spawned worker: restore the parent's sys.path (so the model classes it names import), then serve
_BOOT = ("import json, sys; spec = json.loads(sys.argv[1]); sys.path[:] = spec['path']; "
         "from lmdp.engine.tp.worker import main; main(spec)")


@dataclass
class RankPlan:
    """What rank 0 decides for every rank once all have loaded their weights."""
    cache_blocks: int            # KV-cache blocks (the pool, plus the CUDA graphs' scratch block)
    block_size: int
    max_blocks_per_seq: int


def env_rank() -> tuple | None:
    """(rank, world, local_rank) when torchrun (or any env:// launcher) started this process, else None."""
    found = envs.launcher()
    return None if found is None else (found['rank'], found['world'], found['local_rank'])


def rank_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device('cuda', local_rank) if device_type == 'cuda' else torch.device('cpu')


def check_world(tp: int, device_type: str, launched: tuple | None):
    """Refuse a tensor-parallel size this launch can't give, before any process starts."""
    if launched is not None and launched[1] != tp:
        raise ValueError(f'tp={tp} but the launcher started {launched[1]} processes (WORLD_SIZE); start as many '
                         f'processes as tp (torchrun --nproc-per-node {tp} on one host)')
    if launched is None and device_type == 'cuda' and torch.cuda.device_count() < tp:
        raise ValueError(f'tp={tp} needs {tp} GPUs on this host but torch sees {torch.cuda.device_count()}; lower '
                         'tp, or start the ranks over several hosts with torchrun (see the README)')


def init_groups(rank: int, world: int, device: torch.device, store=None):
    """Join the default group (the layers' collectives) and the control group; returns the control group.
    `store`: the rendezvous store (None: env://)."""
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    # rank 0 itself fails a step that takes too long on CUDA (Ranks.wait); NCCL's watchdog comes after it
    timeout = envs.LMDP_TP_TIMEOUT + (60 if backend == 'nccl' else 0)
    kwargs = dict(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        kwargs['device_id'] = device            # the communicator is made now, not inside a graph capture
    if store is None:
        dist.init_process_group(init_method='env://', **kwargs)
    else:
        dist.init_process_group(store=dist.PrefixStore('pg', store), **kwargs)
    # a worker waits on the control group, idle, for as long as rank 0 has no work; rank 0's own sends on it give
    # up after LMDP_TP_TIMEOUT (gloo's send waits for the receiver: a stopped worker would hold rank 0 forever)
    control_timeout = timedelta(seconds=envs.LMDP_TP_TIMEOUT) if rank == 0 else CONTROL_TIMEOUT
    cpu_group = dist.new_group(backend='gloo', timeout=control_timeout)
    set_tp_group(TPGroup(world, rank, dist.group.WORLD))
    return cpu_group


class Ranks:
    """This process's membership of a tensor-parallel group: the store, the groups, and on rank 0 the workers
    it started and the health of all of them."""

    def __init__(self, rank: int, world: int, device: torch.device, store_addr: tuple, procs: dict | None = None,
                 tmpdir: str | None = None, server=None):
        self.rank, self.world, self.device = rank, world, device
        self.store_addr = store_addr        # (host, port) of the rendezvous store
        self.store = self.connect()         # lmdp's own keys, on this thread's connection
        self.procs = procs or {}            # rank -> Popen, for the workers this process started
        self.tmpdir = tmpdir
        self._server = server               # the TCPStore this process hosts (kept alive while the group lives)
        self.cpu_group = None
        self.watch = Watch(self.store, world, self.procs) if rank == 0 else None
        self.step = 0
        self.broken: str | None = None   # set once the group has failed: the error every later call raises
        self.closed = False

    def connect(self):
        """A new connection to the rendezvous store, under lmdp's prefix (one per thread)."""
        host, port = self.store_addr
        return dist.PrefixStore('lmdp', dist.TCPStore(host, port, is_master=False, timeout=CONTROL_TIMEOUT))

    @property
    def backend(self) -> str:
        return 'nccl' if self.device.type == 'cuda' else 'gloo'

    # -- joining ------------------------------------------------------------------------------------------------

    def wait_for(self, key: str, what: str, timeout: float) -> dict[int, bytes]:
        """Rank 0: every worker's `<key>/<rank>` value, polling the store; a worker that dies or fails first
        (or the timeout) is a TensorParallelError naming it."""
        deadline, values = time.monotonic() + timeout, {}
        while len(values) < self.world - 1:
            for r in range(1, self.world):
                if r not in values and self.store.check([f'{key}/{r}']):
                    values[r] = self.store.get(f'{key}/{r}')
            if len(values) == self.world - 1:
                break               # a worker that answered may end right after (an SPMD job's result)
            self.watch.poll()
            if self.watch.casualties():
                raise self._fail_start(what, self.watch.diagnose(settle_s=0.5))
            if time.monotonic() > deadline:
                late = [r for r in range(1, self.world) if r not in values]
                raise self._fail_start(what, f'rank(s) {late} did not finish within LMDP_TP_START_TIMEOUT='
                                             f'{timeout:.0f} s ({self.watch.diagnose(settle_s=0)})')
            if len(values) < self.world - 1:
                time.sleep(0.05)
        return values

    def _fail_start(self, what: str, why: str) -> TensorParallelError:
        self.abort(f'rank 0 gave up while the ranks were {what}')
        return TensorParallelError(f'tensor-parallel ranks failed while {what}: {why}')

    def agree_num_blocks(self, mine: int) -> int:
        """Rank 0: the KV pool every rank can hold (the smallest), once every worker has loaded its weights."""
        loaded = self.wait_for('loaded', 'loading their shards of the weights', envs.LMDP_TP_START_TIMEOUT)
        return min([mine] + [json.loads(v)['num_blocks'] for v in loaded.values()])

    def send_plan(self, plan):
        """Rank 0: hand every worker the plan (a RankPlan), or a str: why it must stop."""
        self.store.set('plan', pickle.dumps(plan))

    # -- a worker's side of the start --------------------------------------------------------------------------

    def report(self, key: str, value: dict):
        self.store.set(f'{key}/{self.rank}', json.dumps(value))

    def wait_plan(self) -> RankPlan:
        """A worker: rank 0's plan (polled, so the heartbeat thread keeps the store to itself meanwhile)."""
        while not self.store.check(['plan']):
            time.sleep(0.05)
        plan = pickle.loads(self.store.get('plan'))
        if isinstance(plan, str):
            raise SystemExit(f'lmdp tensor-parallel rank {self.rank}: rank 0 stopped the start-up: {plan}')
        return plan

    # -- steps (rank 0) ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def op(self, name: str):
        """Rank 0 runs one step op: any failure inside is the group's, turned into a TensorParallelError that
        names the rank behind it (and every rank is shut down)."""
        if self.broken:
            raise TensorParallelError(self.broken)
        self.step += 1
        try:
            yield self.step
        except TensorParallelError:
            raise
        except Exception as e:
            raise self.fail(f'a {name} step (step {self.step})', e) from e

    def wait(self, event):
        """Rank 0 on CUDA: wait for a step's event, failing the group if a worker dies or the step takes longer
        than LMDP_TP_TIMEOUT (a blocking wait would hang on a dead peer's collective)."""
        start, timeout, next_check = time.monotonic(), envs.LMDP_TP_TIMEOUT, 0.0
        while not event.query():
            now = time.monotonic() - start
            if now > next_check:
                self.watch.poll()
                if self.watch.casualties() or now > timeout:
                    why = RuntimeError(f'the step did not finish within {now:.0f} s (LMDP_TP_TIMEOUT={timeout:.0f})')
                    raise self.fail(f'step {self.step}', why)
                next_check = now + 0.5
            time.sleep(0 if now < 0.01 else 0.0005)

    def fail(self, what: str, error: BaseException) -> TensorParallelError:
        """The group broke during `what` (with `error` on rank 0): name who, shut every rank down."""
        diagnosis = self.watch.diagnose() if self.watch is not None else ''
        first = (str(error).strip().splitlines() or [''])[0][:300]
        if diagnosis.startswith('no rank died'):
            diagnosis = f'rank 0 raised {type(error).__name__}: {first} ({diagnosis})'
        else:
            diagnosis += f' (rank 0 saw {type(error).__name__}: {first})'
        self.broken = (f'tensor parallelism failed in {what}: {diagnosis}. Every rank was shut down; build a new '
                       'pipeline to go on')
        self.abort(self.broken)
        return TensorParallelError(self.broken)

    # -- ending ---------------------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0):
        """End after a clean stop (the workers were told to): wait for them, then leave the groups."""
        if self.closed:
            return
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._end(abort=False)

    def abort(self, reason: str = ''):
        """End now: stop the workers this process started, tell the others (through the store) to stop."""
        if self.closed:
            return
        if self.rank == 0:
            with contextlib.suppress(Exception):
                if not self.store.check(['plan']):
                    self.send_plan(reason or 'aborted')
        self._end(abort=True)

    def _end(self, abort: bool):
        self.closed = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        set_tp_group(None)
        if dist.is_initialized():
            if abort and self.backend == 'nccl':
                with contextlib.suppress(Exception):
                    dist.distributed_c10d._abort_process_group()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._server = None


def spawn(world: int, device_type: str, job: dict) -> Ranks:
    """Rank 0 on one host: start ranks 1..world-1 as child processes running `job` (see worker.main), wait until
    they are ready, and join the groups with them."""
    server = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=CONTROL_TIMEOUT)
    tmpdir = tempfile.mkdtemp(prefix='lmdp-tp-')
    job_path = os.path.join(tmpdir, 'job.pkl')
    try:
        with open(job_path, 'wb') as f:
            pickle.dump(job, f)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise TypeError(f'tensor parallelism starts worker processes that must rebuild the model from what this '
                        f'process hands them, and that could not be pickled ({e}); give custom_module_map as a .py '
                        'file or dotted paths, or classes defined at the top level of an importable module') from e
    env = envs.without_launcher()
    # on the CPU the ranks share this host's cores: each worker takes its part of this process's threads (OpenMP
    # threads that outnumber the cores spin against each other, and every collective waits for the slowest rank)
    threads = max(1, torch.get_num_threads() // world) if device_type == 'cpu' else None
    spec = dict(path=list(sys.path), store=['127.0.0.1', server.port], world=world, device_type=device_type,
                parent=os.getpid(), job=job_path, threads=threads)
    procs = {}
    for r in range(1, world):
        procs[r] = subprocess.Popen([sys.executable, '-c', _BOOT, json.dumps(dict(spec, rank=r))], env=env)
    ranks = Ranks(0, world, rank_device(device_type, 0), ('127.0.0.1', server.port), procs, tmpdir, server)
    _register(ranks)
    try:
        ranks.wait_for('ready', 'starting', envs.LMDP_TP_START_TIMEOUT)
        ranks.cpu_group = init_groups(0, world, ranks.device, server)
    except BaseException:
        ranks.abort('rank 0 failed while starting')
        raise
    return ranks


def join_env(device_type: str) -> Ranks:
    """Any rank started by torchrun (env://): join the groups; the store is torchrun's rendezvous store."""
    rank, world, local_rank = env_rank()
    device = rank_device(device_type, local_rank)
    cpu_group = init_groups(rank, world, device)
    # the store torchrun's rendezvous runs (or rank 0 hosts, in a hand-made env:// launch): lmdp's keys go there too
    found = envs.launcher()
    ranks = Ranks(rank, world, device, (found['master_addr'], found['master_port']))
    ranks.cpu_group = cpu_group
    _register(ranks)
    return ranks


# every group this process leads, ended at interpreter exit if its owner never closed it
_LIVE = []


def _register(ranks: Ranks):
    import atexit
    import weakref
    if not _LIVE:
        atexit.register(_end_all)
    _LIVE.append(weakref.ref(ranks))


def _end_all():
    for ref in _LIVE:
        ranks = ref()
        if ranks is not None and not ranks.closed:
            ranks.abort('the process exited')
