"""Many HTTP clients, one engine: concurrent streams share decode steps and get pipeline()'s answers; clients that
hang up cancel their requests and the KV pool comes back whole; prefix caching works across clients."""
import asyncio

import httpx
import openai
import pytest

from lmdp import GenerationConfig


def _prompts(n, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 40, (n,), generator=g).tolist()
    return [[1] + torch.randint(7, 512, (k,), generator=g).tolist() for k in lengths]


def test_64_concurrent_streams_get_the_pipeline_outputs(aclient, server, reference, wait_idle):
    prompts = _prompts(64, seed=7)
    expected = reference(prompts, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    before = server.metrics()

    async def one(prompt):
        stream = await aclient.completions.create(model='tiny', prompt=prompt, max_tokens=16, temperature=0,
                                                  stream=True, extra_body={'ignore_eos': True})
        chunks = [c async for c in stream]
        return ''.join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(main())
    assert [text for text, _ in results] == [r.text for r in expected]
    assert all(reason == 'length' for _, reason in results)
    after = wait_idle(server)
    # continuous batching across clients: 64 requests x 15 decode steps each, in far fewer engine steps
    steps = after['lmdp_decode_steps_total'] - before['lmdp_decode_steps_total']
    assert steps < 64 * 15 / 4, f'{steps} decode steps for 64 concurrent requests: they did not share steps'
    assert after['lmdp_kv_blocks_used'] == 0
    assert after['lmdp_generation_tokens_total'] - before['lmdp_generation_tokens_total'] == 64 * 16


def _aborts(m):
    return m.get('lmdp_request_success_total[abort]', 0)


def test_16_clients_hanging_up_mid_stream_leave_the_pool_whole(aclient, client, server, reference, wait_idle):
    before = server.metrics()
    long = 900                     # far more tokens than the engine makes before the aborts land

    async def hang_up(prompt):
        stream = await aclient.completions.create(model='tiny', prompt=prompt, max_tokens=long, temperature=0,
                                                  stream=True, extra_body={'ignore_eos': True})
        got = 0
        async for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].text)
            if got == 2:
                break
        await stream.close()        # the connection drops with the request half done

    async def main():
        await asyncio.gather(*(hang_up(p) for p in _prompts(16, seed=8)))

    asyncio.run(main())
    after = wait_idle(server, until=lambda m: _aborts(m) >= _aborts(before) + 16)
    assert _aborts(after) - _aborts(before) == 16
    assert after['lmdp_kv_blocks_used'] == 0, after
    # aborted, not run to the end: 16 x 900 tokens would take ~900 decode steps
    assert after['lmdp_decode_steps_total'] - before['lmdp_decode_steps_total'] < long / 3
    # and the server serves on
    got = client.completions.create(model='tiny', prompt=[1, 9, 10, 11], max_tokens=8, temperature=0)
    assert got.choices[0].text == reference([1, 9, 10, 11], GenerationConfig(max_new_tokens=8)).text


def test_a_plain_request_whose_client_times_out_is_cancelled(server, api_key, wait_idle):
    before = server.metrics()
    body = {'model': 'tiny', 'prompt': [1, 20, 21, 22], 'max_tokens': 900, 'temperature': 0, 'ignore_eos': True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + '/v1/completions', json=body, headers={'Authorization': f'Bearer {api_key}'},
                   timeout=httpx.Timeout(10, read=0.5))
    after = wait_idle(server, until=lambda m: _aborts(m) > _aborts(before))
    assert _aborts(after) - _aborts(before) == 1
    assert after['lmdp_kv_blocks_used'] == 0
    assert after['lmdp_decode_steps_total'] - before['lmdp_decode_steps_total'] < 300


def test_prefix_cache_serves_a_shared_prompt_head(client, server):
    head = list(range(100, 180))          # five 16-token blocks
    before = server.metrics()
    for tail in ([7, 8, 9], [10, 11]):
        client.completions.create(model='tiny', prompt=[1] + head + tail, max_tokens=2, temperature=0)
    hits = server.metrics()['lmdp_prefix_cache_hit_tokens_total'] - before['lmdp_prefix_cache_hit_tokens_total']
    assert hits >= 80


def test_async_clients_get_an_error_not_a_hang_for_a_bad_request_among_good_ones(aclient, reference):
    good = [[1, 30 + i, 31, 32] for i in range(4)]
    expected = reference(good, GenerationConfig(max_new_tokens=6))

    async def one(prompt):
        try:
            r = await aclient.completions.create(model='tiny', prompt=prompt, max_tokens=6, temperature=0)
            return r.choices[0].text
        except openai.BadRequestError as e:
            return e

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in good[:2] + [[1, 99999]] + good[2:])), 60)

    results = asyncio.run(main())
    assert isinstance(results[2], openai.BadRequestError) and 'vocabulary' in results[2].message
    assert results[:2] + results[3:] == [r.text for r in expected]
