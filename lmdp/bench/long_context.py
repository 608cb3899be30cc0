"""Long prompts: time to first token and the decode rate at that context, as `../shared/bench/longctx.py`
measures them for lmdeploy, so the two read side by side.

For each length n: a prompt of n single-token words of the bench tokenizer; TTFT is the best of `repeats`
one-token requests, and the decode rate is `new_tokens / (T(new_tokens + 1) - TTFT)`: the decode steps at context
n alone, prefill and request overheads taken off. Prefix caching is off, so every request computes its whole prompt.
"""
import random

from .measure import _timed, words

LENGTHS = (4096, 16384, 32768)


def long_context_figures(model_path: str, lengths=LENGTHS, new_tokens: int = 128, repeats: int = 2,
                         **engine_kwargs) -> dict:
    """{length: {ttft_s, prefill_tok_s, decode_tok_s_at_ctx}} for one checkpoint, on an engine of its own
    (session_len fits the longest prompt); `engine_kwargs` go to its PytorchEngineConfig."""
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    if not lengths:
        return {}
    if min(lengths) < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError(f'long-context lengths, new_tokens and repeats must be positive, got lengths={lengths}, '
                         f'new_tokens={new_tokens}, repeats={repeats}')
    config = PytorchEngineConfig(**{'session_len': max(lengths) + new_tokens + 8, 'max_batch_size': 8,
                                    'enable_prefix_caching': False, **engine_kwargs})
    pipe = pipeline(model_path, backend_config=config)
    try:
        def generate(prompt, n):
            gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, do_sample=False)
            seconds, (response, ) = _timed(lambda: pipe([prompt], gen_config=gen, do_preprocess=False))
            if response.generate_token_len != n:      # a refused or failed request would time nothing
                raise RuntimeError(f'long-context bench: a prompt of {len(prompt.split())} words gave '
                                   f'{response.generate_token_len} of {n} tokens ({response.finish_reason}: '
                                   f'{response.error})')
            return seconds

        rng = random.Random(0)
        generate(words(min(512, max(lengths)), rng), 8)            # warm-up: compiles, graphs, allocator
        out = {}
        for n in lengths:
            prompt = words(n, rng)
            ttft = min(generate(prompt, 1) for _ in range(repeats))
            total = generate(prompt, new_tokens + 1)
            out[n] = dict(ttft_s=round(ttft, 3), prefill_tok_s=round(n / ttft),
                          decode_tok_s_at_ctx=round(new_tokens / max(total - ttft, 1e-9), 1))
        return out
    finally:
        pipe.close()


def long_context_row(name: str, figures: dict, other: dict | None = None) -> str:
    """One table line: TTFT and decode rate per length, and lmdeploy's TTFT over lmdp's where `other` (its
    longctx.py figures, keyed by length as int or str) is given."""
    cells = []
    for n, f in sorted(figures.items(), key=lambda kv: int(kv[0])):
        label = f'{int(n) // 1024}k' if int(n) % 1024 == 0 else str(n)
        cell = f"{label} TTFT {f['ttft_s']:.3f} s, decode {f['decode_tok_s_at_ctx']:.1f} tok/s"
        theirs = (other or {}).get(n) or (other or {}).get(str(n))
        if theirs:
            cell += f" (lmdeploy {theirs['ttft_s']:.3f} s; lmdp {theirs['ttft_s'] / f['ttft_s']:.2f}x as fast)"
        cells.append(cell)
    return f'{name:>5} long context: ' + '; '.join(cells)
