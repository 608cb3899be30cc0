"""The figures `lmdp bench` reports, each measured the same way lmdeploy's bench script measures them."""
import random
import time

import torch

from .latency import TokenClock


def copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device='cuda').normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


def words(n: int, rng: random.Random) -> str:
    """n single-token words of the bench tokenizer."""
    return ' '.join(f't{rng.randrange(3, 4000)}' for _ in range(n))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def batch1_decode(generate_one, prompt_len: int = 128, new_tokens: int = 256, pairs: int = 3) -> float:
    """Decode tok/s of one request: (new_tokens - 1) / (T(new_tokens) - T(1)), best of `pairs` pairs.

    `generate_one(prompt, n)` generates exactly n tokens. Subtracting the 1-token run removes prefill and
    request overheads, leaving the decode steps alone.
    """
    prompt = words(prompt_len, random.Random(0))
    generate_one(prompt, 8)                                       # warm-up
    best = 0.0
    for _ in range(pairs):
        t1, _ = _timed(lambda: generate_one(prompt, 1))
        tn, _ = _timed(lambda: generate_one(prompt, new_tokens))
        best = max(best, (new_tokens - 1) / (tn - t1))
    return best


def throughput_workload(num_requests: int = 256, seed: int = 0):
    """Prompts and output lengths drawn as lmdeploy's bench draws them (same generator, same order)."""
    rng = random.Random(seed)
    ins = [rng.randint(100, 1024) for _ in range(num_requests)]
    outs = [rng.randint(100, 1024) for _ in range(num_requests)]
    prompts = [words(n, rng) for n in ins]
    return prompts, outs


def streamed_run(stream_infer, prompts, gens) -> dict:
    """The workload once more, streamed: its output tok/s, and time to first token and inter-token latency from
    the arrival of each request's tokens (`lmdp.bench.latency`). `stream_infer` is lmdp's or lmdeploy's."""
    _sync()
    clock = TokenClock()
    for r in stream_infer(prompts, gen_config=gens, do_preprocess=False):
        clock.seen(r.index, r.generate_token_len)
    _sync()
    seconds = time.perf_counter() - clock.start
    return dict(tp_stream_out_tokens=clock.tokens, tp_stream_wall_s=round(seconds, 2),
                tp_stream_out_tok_s=round(clock.tokens / seconds, 1), **clock.figures())


def lmdp_figures(model_path: str, throughput: bool = True, eager_mode: bool = False, model_impl: str = 'auto',
                 mixed_prefill: tuple[bool, ...] = (False,), max_prefill_token_num: int = 4096) -> dict:
    """bs1 decode, and the 256-request run (batch, then streamed for the latencies) once per scheduling policy in
    `mixed_prefill` on the same engine; the first policy's figures are the headline."""
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    config = PytorchEngineConfig(session_len=4096, max_batch_size=256, cache_max_entry_count=0.8,
                                 eager_mode=eager_mode, model_impl=model_impl, mixed_prefill=mixed_prefill[0],
                                 max_prefill_token_num=max_prefill_token_num)
    start = time.perf_counter()
    pipe = pipeline(model_path, backend_config=config)
    out = {'build_s': round(time.perf_counter() - start, 1), 'model_class': type(pipe.engine.agent.model).__name__,
           'max_prefill_token_num': max_prefill_token_num}
    out.update(_engine_notes(pipe.engine))

    def generate_one(prompt, n):
        gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, do_sample=False)
        return pipe([prompt], gen_config=gen, do_preprocess=False)
    out['bs1_decode_tok_s'] = round(batch1_decode(generate_one), 1)
    if throughput:
        prompts, outs = throughput_workload()
        gens = [GenerationConfig(max_new_tokens=m, min_new_tokens=m, ignore_eos=True, do_sample=False) for m in outs]
        pipe(prompts[:16], gen_config=gens[:16], do_preprocess=False)      # warm-up
        for i, mixed in enumerate(mixed_prefill):
            pipe.engine.scheduler.mixed_prefill = mixed
            pipe.engine.stats = type(pipe.engine.stats)()
            seconds, responses = _timed(lambda: pipe(prompts, gen_config=gens, do_preprocess=False))
            generated = sum(r.generate_token_len for r in responses)
            figures = dict(tp_requests=len(prompts), tp_out_tokens=generated, tp_wall_s=round(seconds, 2),
                           tp_out_tok_s=round(generated / seconds, 1), mixed_prefill=mixed,
                           **step_split(pipe.engine.stats))
            figures.update(streamed_run(pipe.stream_infer, prompts, gens))
            if i == 0:
                out.update(figures)
            if len(mixed_prefill) > 1:
                out.setdefault('tp_by_mixed_prefill', {})['on' if mixed else 'off'] = figures
    pipe.close()
    pipe = None        # (the closure above holds the name: drop the engine, keep the cell)
    import gc
    gc.collect()      # the next pipeline of the same call gets the memory back for its KV pool
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def step_split(stats) -> dict:
    """Where a run's wall time went, from the engine's step clock: prefill and decode-only steps, their count,
    seconds, mean and longest time (a kernel compiled mid-run stands out there), and the mean batch of a
    decode-only step."""
    out = {}
    for kind in ('prefill', 'decode'):
        steps, seconds = getattr(stats, f'{kind}_steps'), getattr(stats, f'{kind}_seconds')
        out[f'tp_{kind}_steps'], out[f'tp_{kind}_s'] = steps, round(seconds, 2)
        if steps:
            out[f'tp_{kind}_step_ms'] = round(1e3 * seconds / steps, 2)
            out[f'tp_{kind}_step_max_ms'] = round(1e3 * getattr(stats, f'{kind}_max_seconds'), 2)
    if stats.decode_steps and not stats.mixed_steps:     # (mixed steps' decode rows are counted with them)
        out['tp_decode_batch_mean'] = round(stats.decode_tokens / stats.decode_steps, 1)
    return out


def _engine_notes(engine) -> dict:
    """What the engine runs: the CUDA-graph buckets captured (and why not where not), the fallback's kernels."""
    notes = {}
    graphs = getattr(engine.runner, 'graphs', None)
    if graphs is not None:
        results = graphs.results.values()
        notes['cuda_graphs_captured'] = sum(r.captured for r in results)
        notes['cuda_graphs_buckets'] = len(graphs.results)
        reasons = sorted({r.reason for r in results if not r.captured and r.reason})
        if reasons:
            notes['cuda_graphs_not_captured'] = reasons
    fast = getattr(engine.agent.model, 'fast_paths', None)
    if fast is not None:
        notes['fallback_fast_paths'] = fast
    return notes


def hf_batch1_decode(model_path: str, new_tokens: int = 256) -> float:
    """transformers' eager `generate`, batch 1, measured like the engines (the baseline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16,
                                                 attn_implementation='eager').cuda().eval()

    def generate_one(prompt, n):
        ids = tok(prompt, return_tensors='pt').input_ids.cuda()
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1)
    with torch.inference_mode():
        figure = batch1_decode(generate_one, new_tokens=new_tokens, pairs=1)
    model = None
    torch.cuda.empty_cache()
    return figure
