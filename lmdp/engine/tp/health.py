"""Which rank failed, and how: what turns a broken collective into an error that names the rank.

Every worker publishes in the rendezvous store, once a second, a heartbeat: a counter, the step it works on, and
where its main thread is (waiting inside a collective, or at which line of which file). A worker that raises
writes `failed/<rank>` with its error before it exits. Rank 0 reads these when one of its collectives fails or
takes too long, together with the exit codes of the workers it started itself, and names the rank: died (and
how), failed (and why), or stuck (and where). Heartbeats are judged by rank 0's own clock (a counter that stops
moving), so hosts need not agree on the time.
"""
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

HEARTBEAT_S = 1.0
# a heartbeat that has not moved for this long: the process is gone (or frozen whole)
SILENT_S = 10.0


def where_is(thread_id: int) -> str:
    """Where a thread is now: 'waiting in <collective>' inside torch.distributed, else 'at file:line in fn'."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return 'gone'
    stack = traceback.extract_stack(frame)
    # the innermost named call inside torch.distributed (its logging decorators are all called 'wrapper')
    for f in reversed(stack):
        if f'torch{os.sep}distributed' in f.filename and f.name != 'wrapper':
            return f'waiting in {f.name}'
    f = stack[-1]
    return f'at {os.path.basename(f.filename)}:{f.lineno} in {f.name}'


class Heartbeat(threading.Thread):
    """A worker's heartbeat: a daemon thread with a store connection of its own (`connect()` makes it; a store
    client is not shared between threads)."""

    def __init__(self, connect, rank: int):
        super().__init__(name=f'lmdp-tp-heartbeat-{rank}', daemon=True)
        self.connect, self.rank = connect, rank
        self.main = threading.main_thread().ident
        self.step = 0
        self.state = 'starting'
        self._stop = threading.Event()

    def run(self):
        try:
            store = self.connect()
        except Exception as e:     # noqa: BLE001 - no store, no heartbeat: rank 0 then judges by silence
            print(f'lmdp tensor-parallel rank {self.rank}: no heartbeat ({e})', file=sys.stderr)
            return
        beat = 0
        while not self._stop.is_set():
            beat += 1
            record = dict(beat=beat, step=self.step, state=self.state, where=where_is(self.main), pid=os.getpid(),
                          host=socket.gethostname())
            try:
                store.set(f'heartbeat/{self.rank}', json.dumps(record))
            except Exception:  # noqa: BLE001 - the store (rank 0) is gone: this process is about to end anyway
                return
            self._stop.wait(HEARTBEAT_S)

    def stop(self):
        self._stop.set()


def report_failure(store, rank: int, error: BaseException):
    """Leave this rank's error where rank 0 reads it (best effort: the store may be gone)."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    text = f'{type(error).__name__}: {error}'.strip() + '\n' + ''.join(lines[-6:])
    try:
        store.set(f'failed/{rank}', text)
    except Exception:  # noqa: BLE001
        pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f'was killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'was killed by signal {-code}'
    return f'exited with code {code}'


@dataclass
class RankState:
    """What rank 0 knows of one worker."""
    rank: int
    pid: int | None = None
    host: str | None = None
    beat: int = -1
    beat_seen: float = field(default_factory=time.monotonic)   # when `beat` last moved, by rank 0's clock
    step: int = 0
    state: str = 'starting'
    where: str = ''
    exit: str | None = None        # 'was killed by SIGKILL', 'exited with code 1'
    failed: str | None = None      # its own report of an exception

    def name(self) -> str:
        at = f'pid {self.pid}' + (f' on {self.host}' if self.host and self.host != socket.gethostname() else '')
        return f'rank {self.rank} ({at})' if self.pid else f'rank {self.rank}'


class Watch:
    """Rank 0's view of the workers' health, refreshed on demand (`poll`)."""

    def __init__(self, store, world: int, procs: dict[int, object] | None = None):
        self.store, self.procs = store, procs or {}
        self.states = {r: RankState(r, pid=getattr(self.procs.get(r), 'pid', None)) for r in range(1, world)}

    def poll(self):
        now = time.monotonic()
        for r, s in self.states.items():
            proc = self.procs.get(r)
            if proc is not None and s.exit is None and proc.poll() is not None:
                s.exit = describe_exit(proc.returncode)
            try:
                if s.failed is None and self.store.check([f'failed/{r}']):
                    s.failed = self.store.get(f'failed/{r}').decode(errors='replace')
                if self.store.check([f'heartbeat/{r}']):
                    record = json.loads(self.store.get(f'heartbeat/{r}'))
                    if record['beat'] != s.beat:
                        s.beat, s.beat_seen = record['beat'], now
                    s.pid, s.host = record['pid'], record['host']
                    s.step, s.state, s.where = record['step'], record['state'], record['where']
            except Exception:  # noqa: BLE001 - the store itself is unreachable: judge by exits and silence
                pass

    def silent_for(self, s: RankState) -> float:
        return time.monotonic() - s.beat_seen

    def casualties(self) -> list:
        """Workers known to be gone or failed. Silence counts only once a worker has beaten at all: a worker still
        importing torch has not started its heartbeat yet (the start-up's own timeout covers one that never does)."""
        return [s for s in self.states.values()
                if s.exit is not None or s.failed is not None or (s.beat >= 0 and self.silent_for(s) > SILENT_S)]

    def diagnose(self, settle_s: float = 3.0) -> str:
        """Name the workers that died, failed or hang. A rank that just died needs a moment for its exit to
        show: poll for up to `settle_s` until some rank is known to be gone."""
        deadline = time.monotonic() + settle_s
        self.poll()
        while not self.casualties() and time.monotonic() < deadline:
            time.sleep(0.1)
            self.poll()
        found = []
        for s in self.casualties():
            if s.failed is not None:
                first = s.failed.strip().splitlines()[0]
                found.append(f'{s.name()} failed: {first}' + (f' (it then {s.exit})' if s.exit else ''))
            elif s.exit is not None:
                found.append(f'{s.name()} {s.exit}')
            else:
                found.append(f'{s.name()} stopped responding (no heartbeat for {self.silent_for(s):.0f} s: it died '
                             'or its host is unreachable)')
        if found:
            return '; '.join(found)
        # a heartbeat that stopped only lately (SILENT_S not reached yet): stopped, frozen, or starved of CPU
        stale = [s for s in self.states.values() if s.beat >= 0 and self.silent_for(s) > 3 * HEARTBEAT_S]
        if stale:
            return '; '.join(f'{s.name()} stopped answering (no heartbeat for {self.silent_for(s):.0f} s: the process '
                             f'is stopped, frozen or starved of CPU; last seen in step {s.step} {s.where})'
                             for s in stale)
        busy = [s for s in self.states.values() if s.state == 'busy' and not s.where.startswith('waiting in')]
        if busy:
            return '; '.join(f'{s.name()} is stuck in step {s.step} {s.where}' for s in busy)
        where = ', '.join(f'rank {s.rank} {s.where or s.state}' for s in self.states.values())
        return f'no rank died; they were: {where}'
