"""One request as the engine tracks it: its tokens, how many sit in the KV cache, its blocks, its sampling."""
import enum
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = 'waiting'      # needs a prefill (new, preempted, or part-way through a chunked prefill)
    RUNNING = 'running'      # every token but the newest is cached: the next step is a decode
    FINISHED = 'finished'


@dataclass(frozen=True)
class SamplingParams:
    """The engine's resolved view of a GenerationConfig: plain numbers, stop ids merged, seed fixed."""
    max_new_tokens: int
    min_new_tokens: int = 0
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    logprobs: int = 0        # 0: none; N: top-N plus the chosen token


@dataclass(slots=True)
class Sequence:
    seq_id: int
    token_ids: list[int]                     # prompt, then every generated token
    num_prompt_tokens: int
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached: int = 0                      # leading tokens whose K/V are written in `blocks`
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)   # prefix-cache keys of the full blocks, in order
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
