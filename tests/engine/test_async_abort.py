"""Async callers that stop listening, and a pipeline told to stop everything: the KV pool comes back whole without
anyone else stepping the engine."""
import asyncio

from lmdp import GenerationConfig


def test_an_async_stream_left_early_frees_its_blocks_by_itself(pipe):
    gen = GenerationConfig(max_new_tokens=200, ignore_eos=True)

    async def main():
        agen = pipe.generate([1, 50, 60, 70], gen)
        await agen.__anext__()
        await agen.aclose()                 # the only request: nobody else will step the engine for it
        for _ in range(500):
            if not pipe.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not pipe.engine.has_unfinished() and pipe.engine.block_manager.num_used == 0


def test_abort_all_ends_every_caller_with_abort(pipe, random_prompts):
    gen = GenerationConfig(max_new_tokens=300, ignore_eos=True)

    async def one(prompt):
        pieces = []
        async for piece in pipe.generate(prompt, gen):
            pieces.append(piece)
            if len(pieces) == 3 and prompt is prompts[0]:
                pipe.abort_all()
        return pieces

    prompts = random_prompts(4, 5, 20, seed=41)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 60)

    results = asyncio.run(main())
    assert [r[-1].finish_reason for r in results] == ['abort'] * 4
    assert all(0 < r[-1].generate_token_len < 300 for r in results)
    assert not pipe.engine.has_unfinished() and pipe.engine.block_manager.num_used == 0
