"""Streaming and asyncio: the pieces join up to exactly what a batch call returns."""
import asyncio

from lmdp import GenerationConfig


def _joined(pieces, n):
    text, tokens, reasons = [''] * n, [[] for _ in range(n)], [None] * n
    for p in pieces:
        assert reasons[p.index] is None, 'a piece came after its request finished'
        text[p.index] += p.text
        tokens[p.index] += p.token_ids
        reasons[p.index] = p.finish_reason
    return text, tokens, reasons


def test_stream_pieces_join_to_the_final_text(pipe, random_prompts):
    prompts = random_prompts(3, 5, 30, seed=31) + ['Once upon a time', [{'role': 'user', 'content': 'Hello!'}]]
    gens = [GenerationConfig(max_new_tokens=20, do_sample=True, random_seed=i, top_k=0, ignore_eos=True)
            for i in range(len(prompts))]
    final = pipe(prompts, gens)
    pieces = list(pipe.stream_infer(prompts, gens))
    assert len(pieces) > len(prompts)
    text, tokens, reasons = _joined(pieces, len(prompts))
    assert text == [r.text for r in final] and all(t for t in text)
    assert tokens == [r.token_ids for r in final]
    assert reasons == ['length'] * len(prompts)
    assert pipe.engine.block_manager.num_used == 0


def test_a_stream_left_early_frees_its_request(pipe):
    stream = pipe.stream_infer([[1, 50, 60, 70]], GenerationConfig(max_new_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    pipe.engine.step()                    # the abort takes effect at the next step
    assert not pipe.engine.has_unfinished() and pipe.engine.block_manager.num_used == 0


def test_async_generate_runs_requests_together(pipe, random_prompts):
    prompts = random_prompts(4, 5, 25, seed=32)
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    final = pipe(prompts, gen)

    async def one(prompt):
        return [piece async for piece in pipe.generate(prompt, gen)]

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    steps = pipe.engine.stats.decode_steps
    results = asyncio.run(main())
    for pieces, expected in zip(results, final):
        assert ''.join(p.text for p in pieces) == expected.text
        assert [t for p in pieces for t in p.token_ids] == expected.token_ids
        assert pieces[-1].finish_reason == 'length'
    # all four shared decode steps: 11 decode steps in all, not 44
    assert pipe.engine.stats.decode_steps - steps == 11
