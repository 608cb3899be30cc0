"""Time to first token and inter-token latency of a streamed run, per request, from the arrival times of its tokens.

The definitions are those of vLLM's `benchmark_serving.py`, which lmdeploy's `profile_restful_api.py` follows, and
`scripts/lmdeploy_latency.py` measures lmdeploy with this same module on the same workload, so the two engines'
figures mean the same thing:

- time to first token (TTFT): from the moment the request was submitted (all of a run's requests are submitted
  together) to the arrival of the first piece of output that holds a token; one figure per request.
- inter-token latency (ITL): the gap between two successive pieces of output of one request that each bring new
  tokens; the gaps of all requests are pooled. A piece that brings several tokens at once is one gap (as vLLM
  counts it), so an engine cannot look faster by handing its tokens over in bunches.

Percentiles are numpy's (linear interpolation), as vLLM reports them.
"""
import time
from collections.abc import Iterable

import numpy as np


class TokenClock:
    """Stamps the pieces of a streamed run as they arrive: `seen(index, generate_token_len)` for each piece."""

    def __init__(self):
        self.start = time.perf_counter()
        self.arrivals: dict[int, list[float]] = {}     # request index -> arrival times of pieces with new tokens
        self._count: dict[int, int] = {}
        self.tokens = 0

    def seen(self, index: int, generate_token_len: int):
        now = time.perf_counter()
        new = generate_token_len - self._count.get(index, 0)
        if new > 0:
            self._count[index] = generate_token_len
            self.arrivals.setdefault(index, []).append(now)
            self.tokens += new

    def figures(self, prefix: str = 'tp_') -> dict:
        return latency_figures(self.start, self.arrivals.values(), prefix)


def latency_figures(start: float, arrivals: Iterable[list[float]], prefix: str = 'tp_') -> dict:
    """TTFT and ITL p50/p99 in milliseconds (see the module docstring); `arrivals`: per request, the arrival
    times (seconds, the clock of `start`) of its pieces of output that brought tokens, in order."""
    arrivals = [a for a in arrivals if a]
    if not arrivals:
        raise ValueError('no request produced a token: there is no latency to report')
    ttft = np.array([a[0] - start for a in arrivals]) * 1e3
    gaps = np.concatenate([np.diff(a) for a in arrivals]) * 1e3
    out = {f'{prefix}ttft_p50_ms': round(float(np.percentile(ttft, 50)), 2),
           f'{prefix}ttft_p99_ms': round(float(np.percentile(ttft, 99)), 2)}
    if gaps.size:                    # none when every request made a single token
        out.update({f'{prefix}itl_p50_ms': round(float(np.percentile(gaps, 50)), 2),
                    f'{prefix}itl_p99_ms': round(float(np.percentile(gaps, 99)), 2)})
    return out
