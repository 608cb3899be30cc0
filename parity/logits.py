"""Whole-model logits parity: lmdp's paged prefill + decode against a transformers forward on the same tokens.

lmdp prefills every prompt packed in one step and then decodes greedily through the paged cache (blocks handed
out shuffled). The reference is `transformers` with eager attention, run on each prompt followed by the tokens
lmdp generated (teacher forcing), so every lmdp logit row has the reference row it must equal, even where greedy
choices would part ways.
"""
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class LogitsReport:
    model_path: str
    dtype: str
    prompt_lengths: list[int]
    decode_steps: int
    tolerance: float
    rel_errors: list[list[float]] = field(default_factory=list)    # [prompt][step] relative L2 error of the row
    tokens_equal: list[bool] = field(default_factory=list)          # per prompt: greedy tokens equal to the reference
    lmdp_tokens: list[list[int]] = field(default_factory=list)
    ref_tokens: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_rel_error(self) -> float:
        return max(max(r) for r in self.rel_errors)

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance and all(self.tokens_equal)

    def summary(self) -> str:
        lines = [f'lmdp vs transformers  {self.model_path}  ({self.dtype}, {len(self.prompt_lengths)} prompts of '
                 f'{", ".join(map(str, self.prompt_lengths))} tokens packed in one prefill, '
                 f'{self.decode_steps} decode steps)',
                 f"{'prompt':>6} {'len':>5} {'prefill rel err':>16} {'max decode rel err':>19} {'greedy':>8}"]
        for i, n in enumerate(self.prompt_lengths):
            errs = self.rel_errors[i]
            decode = max(errs[1:]) if len(errs) > 1 else float('nan')
            lines.append(f'{i:>6} {n:>5} {errs[0]:>16.2e} {decode:>19.2e} '
                         f"{'equal' if self.tokens_equal[i] else 'DIFFER':>8}")
        verdict = 'PASS' if self.passed else 'FAIL'
        lines.append(f'{verdict}: max relative L2 error {self.max_rel_error:.2e} (tolerance {self.tolerance:.0e}), '
                     f'greedy tokens equal for {sum(self.tokens_equal)}/{len(self.tokens_equal)} prompts '
                     f'[{self.seconds:.1f} s]')
        return '\n'.join(lines)


def random_prompts(lengths: Sequence[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n, ), generator=gen).tolist() for n in lengths]


def load_reference(model_path: str, dtype: torch.dtype, device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation='eager')
    return model.to(device).eval()


def compare_logits(model_path: str, prompt_lengths: Sequence[int] = (5, 17, 64), decode_steps: int = 8,
                   dtype: str = 'float32', device: str = 'cpu', block_size: int = 16, num_blocks: int | None = None,
                   shuffle_blocks_seed: int = 0, tolerance: float | None = None, custom_module_map=None,
                   seed: int = 0) -> LogitsReport:
    """Prefill + greedy decode in lmdp, each logit row diffed against transformers (see module docstring)."""
    from lmdp.config import resolve_dtype
    from lmdp.engine import StepRunner

    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    if tolerance is None:
        tolerance = 1e-5 if torch_dtype == torch.float32 else 3e-2
    total = sum(prompt_lengths) + len(prompt_lengths) * decode_steps
    if num_blocks is None:
        num_blocks = 2 * (total // block_size + len(prompt_lengths) + 1)
    runner = StepRunner.from_pretrained(model_path, dtype=torch_dtype, device=device, num_blocks=num_blocks,
                                        block_size=block_size, custom_module_map=custom_module_map,
                                        shuffle_blocks_seed=shuffle_blocks_seed)
    prompts = random_prompts(prompt_lengths, runner.agent.model_config.vocab_size, seed)
    generated, step_logits = runner.generate_greedy(prompts, decode_steps + 1)
    del runner

    reference = load_reference(model_path, torch_dtype, device)
    report = LogitsReport(model_path=str(model_path), dtype=str(torch_dtype).replace('torch.', ''),
                          prompt_lengths=list(prompt_lengths), decode_steps=decode_steps, tolerance=tolerance)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt + generated[i][:-1]], device=device)
            ref = reference(ids).logits[0, len(prompt) - 1:].float()          # rows that predict each new token
            ours = torch.stack([s[i] for s in step_logits]).to(ref.device)
            report.rel_errors.append(((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist())
            ref_tokens = ref.argmax(-1).tolist()
            report.ref_tokens.append(ref_tokens)
            report.lmdp_tokens.append(generated[i])
            report.tokens_equal.append(ref_tokens == generated[i])
    report.seconds = time.perf_counter() - start
    return report
