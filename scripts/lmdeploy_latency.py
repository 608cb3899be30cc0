"""lmdeploy's 256-request run streamed, with time to first token and inter-token latency measured as lmdp bench
measures its own (lmdp.bench.latency, lmdp.bench.measure.streamed_run: same workload, same definitions, same code).

../shared/bench/lmdeploy_bench.py times lmdeploy's batch call only (output tok/s, no latencies); this script adds
the streamed run beside it, with the engine settings that script uses. Run on the GPU machine from the repository
root, after lmdeploy's bundle is installed:

    . .carry/lmdeploy/install.sh || exit 1
    PYTHONPATH=$PWD:$PYTHONPATH python3 scripts/lmdeploy_latency.py /tmp/lmdp_bench/1b    # a checkpoint folder

It prints a line starting with RESULT and writes $OUT/lmdeploy_latency_<folder name>.json.
"""
import json
import os
import sys
import time


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isfile(os.path.join(args[0], 'config.json')):
        raise SystemExit('usage: lmdeploy_latency.py CHECKPOINT_DIR (a folder with config.json and a tokenizer, '
                         'e.g. one lmdp bench wrote)')
    path = os.path.abspath(args[0])
    import torch
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

    from lmdp.bench.measure import streamed_run, throughput_workload
    # lmdeploy_bench.py's settings
    config = PytorchEngineConfig(tp=1, distributed_executor_backend='uni', session_len=4096, max_batch_size=256,
                                 cache_max_entry_count=0.8, enable_metrics=False)
    start = time.perf_counter()
    pipe = pipeline(path, backend_config=config, log_level='WARNING')
    out = {'checkpoint': path, 'device': torch.cuda.get_device_name(0),
           'build_s': round(time.perf_counter() - start, 1)}
    prompts, outs = throughput_workload()
    gens = [GenerationConfig(max_new_tokens=m, min_new_tokens=m, ignore_eos=True, do_sample=False) for m in outs]
    pipe(prompts[:16], gen_config=gens[:16], do_preprocess=False)        # warm-up, as lmdeploy_bench.py does
    out.update(streamed_run(pipe.stream_infer, prompts, gens))
    pipe.close()
    print('RESULT ' + json.dumps(out), flush=True)
    name = os.path.basename(os.path.normpath(path))
    with open(os.path.join(os.environ.get('OUT', '/tmp'), f'lmdeploy_latency_{name}.json'), 'w') as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
