"""The prompts of a parity run: a count of random token-id prompts, or a file.

Random prompts have different lengths (5, 17, 64, ... tokens) so that the packed prefill mixes short and long
sequences and crosses KV-cache block boundaries. A file is either JSON (a list of strings or of token-id lists)
or text with one prompt per line; a line of integers is read as token ids, any other line is tokenized with the
checkpoint's own tokenizer.
"""
import json
import os
from collections.abc import Sequence

import torch

DEFAULT_LENGTHS = (5, 17, 64, 33, 2, 100, 48, 11)

PromptSpec = int | str | os.PathLike | Sequence[Sequence[int]]


def random_prompts(count: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    if count < 1:
        raise ValueError(f'need at least one prompt, got {count}')
    lengths = [DEFAULT_LENGTHS[i % len(DEFAULT_LENGTHS)] + 3 * (i // len(DEFAULT_LENGTHS)) for i in range(count)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n, ), generator=gen).tolist() for n in lengths]


def _token_line(line: str):
    parts = line.replace(',', ' ').split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        return None


def read_prompts(path, model_path: str) -> list[list[int]]:
    with open(path, encoding='utf-8') as f:
        text = f.read()
    if str(path).endswith('.json'):
        items = json.loads(text)
    else:
        items = [line for line in text.splitlines() if line.strip()]
        items = [_token_line(line) or line for line in items]
    tokenizer = None
    prompts = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(model_path)
            item = tokenizer(item)['input_ids']
        prompts.append([int(t) for t in item])
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f'{path}: every prompt needs at least one token, and there must be at least one prompt')
    return prompts


def make_prompts(spec: PromptSpec, vocab_size: int, model_path: str, seed: int = 0) -> list[list[int]]:
    """Token-id prompts from a count, a file path (or a digit string, as the command line gives it) or a list."""
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        return random_prompts(spec, vocab_size, seed)
    if isinstance(spec, (str, os.PathLike)):
        prompts = read_prompts(spec, model_path)
    else:
        prompts = [[int(t) for t in p] for p in spec]
    bad = [t for p in prompts for t in p if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f'token ids {bad[:5]} are outside the vocabulary (size {vocab_size})')
    return prompts
