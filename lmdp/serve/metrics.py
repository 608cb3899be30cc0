"""`GET /metrics`: the engine's state and the server's counters in Prometheus' text format.

Gauges are read from the engine when scraped (the scheduler's queues and the block manager's pool); counters are
kept here as the server hands out tokens and finishes requests. Tokens per second is the generated tokens of the
last `window` seconds, so a scrape shows the current rate without Prometheus having to compute a rate().
"""
import collections
import time
from collections.abc import Callable

PREFIX = 'lmdp'


class ServerMetrics:

    def __init__(self, model_name: str, window: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.model_name, self.window, self.clock = model_name, window, clock
        self.started = clock()
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.requests: dict[str, int] = collections.Counter()         # by finish reason
        self.http_errors: dict[int, int] = collections.Counter()      # by status
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) handed out

    def count_tokens(self, n: int):
        if n:
            self.generation_tokens += n
            self._recent.append((self.clock(), n))

    def count_finished(self, reason: str, prompt_tokens: int = 0):
        self.requests[reason] += 1
        self.prompt_tokens += prompt_tokens

    def count_error(self, status: int):
        self.http_errors[status] += 1

    def tokens_per_second(self) -> float:
        now = self.clock()
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()
        span = min(self.window, now - self.started)
        return sum(n for _, n in self._recent) / span if span > 0 else 0.0

    def render(self, engine) -> str:
        """The exposition text; `engine` is the lmdp Engine behind the server."""
        bm, sched, stats = engine.block_manager, engine.scheduler, engine.stats
        label = f'model_name="{_escape(self.model_name)}"'
        out = []

        def metric(name, kind, help_, samples):
            out.append(f'# HELP {PREFIX}_{name} {help_}')
            out.append(f'# TYPE {PREFIX}_{name} {kind}')
            for extra, value in samples:
                labels = label + (',' + extra if extra else '')
                out.append(f'{PREFIX}_{name}{{{labels}}} {value}')

        metric('num_requests_running', 'gauge', 'Requests in the running batch.', [('', len(sched.running))])
        metric('num_requests_waiting', 'gauge', 'Requests waiting for a prefill.', [('', len(sched.waiting))])
        metric('kv_blocks_used', 'gauge', 'KV-cache blocks held by requests.', [('', bm.num_used)])
        metric('kv_blocks_total', 'gauge', 'KV-cache blocks in the pool.', [('', bm.num_blocks)])
        metric('kv_cache_usage_ratio', 'gauge', 'Fraction of the KV pool held by requests.',
               [('', bm.num_used / bm.num_blocks if bm.num_blocks else 0.0)])
        metric('generation_tokens_per_second', 'gauge', f'Generated tokens per second over the last '
               f'{self.window:g} s.', [('', round(self.tokens_per_second(), 3))])
        metric('generation_tokens_total', 'counter', 'Tokens generated for clients.', [('', self.generation_tokens)])
        metric('prompt_tokens_total', 'counter', 'Prompt tokens of finished requests.', [('', self.prompt_tokens)])
        metric('prefill_tokens_computed_total', 'counter', 'Prompt tokens the engine computed (prefix-cache hits '
               'excluded).', [('', stats.prefill_tokens)])
        metric('prefix_cache_hit_tokens_total', 'counter', 'Prompt tokens taken from the prefix cache.',
               [('', bm.stats.hit_tokens)])
        metric('decode_steps_total', 'counter', 'Decode steps the engine ran (all running requests in each).',
               [('', stats.decode_steps)])
        metric('prefill_steps_total', 'counter', 'Prefill steps the engine ran.', [('', stats.prefill_steps)])
        metric('num_preemptions_total', 'counter', 'Requests preempted for want of KV blocks.',
               [('', sched.num_preemptions)])
        metric('request_success_total', 'counter', 'Requests finished, by finish reason.',
               [(f'finished_reason="{r}"', n) for r, n in sorted(self.requests.items())])
        metric('http_errors_total', 'counter', 'Requests refused with an error status.',
               [(f'status="{s}"', n) for s, n in sorted(self.http_errors.items())])
        return '\n'.join(out) + '\n'


def _escape(value: str) -> str:
    return value.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def parse(text: str) -> dict[str, float]:
    """{'name{labels}': value} of an exposition text (for tests and scripts that read /metrics)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            name, _, value = line.rpartition(' ')
            values[name] = float(value)
    return values
