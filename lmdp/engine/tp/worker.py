"""A worker rank: load this rank's shards of the weights, size the KV cache as rank 0 says, then run rank 0's ops.

`main(spec)` is a child process `pipeline()` started (see launch.spawn); `serve_env` is a rank other than 0 under
torchrun, reached from `pipeline()`. Either way a failure is written to the store for rank 0 to report, and the
process ends: a worker never outlives its group (nor, when spawned, the process that started it).
"""
import os
import pickle
import sys
import threading
import time
import traceback

import torch.distributed as dist

from .health import Heartbeat, report_failure
from .launch import CONTROL_TIMEOUT, Ranks, init_groups, join_env, rank_device


def serve(model_path: str, config, ranks: Ranks, heartbeat: Heartbeat):
    """Build the model runner as the engine builds rank 0's, and follow rank 0's steps until it says stop."""
    from ..cache_engine import CacheEngine, plan_num_blocks
    from ..engine import engine_limits
    from ..model_agent import ModelAgent
    from ..model_runner import ModelRunner
    from .step_sync import follow
    heartbeat.state = 'loading'
    device = config.resolved_device()
    agent = ModelAgent.from_pretrained(model_path, dtype=config.dtype, device=device,
                                       custom_module_map=config.custom_module_map,
                                       trust_remote_code=config.trust_remote_code, model_impl=config.model_impl)
    max_batch_size, session_len = engine_limits(config, agent.model_config, device)
    num_blocks = plan_num_blocks(agent.model_config, config.block_size, device, config.num_gpu_blocks,
                                 config.cache_max_entry_count, session_len, max_batch_size)
    ranks.report('loaded', dict(num_blocks=num_blocks))
    heartbeat.state = 'waiting for the plan'
    plan = ranks.wait_plan()
    cache = CacheEngine(agent.model_config, plan.cache_blocks, plan.block_size, device)
    runner = ModelRunner(agent, cache, plan.max_blocks_per_seq)
    follow(runner, ranks, heartbeat)
    ranks.shutdown()


def _run(job: dict, ranks: Ranks, heartbeat: Heartbeat):
    if job['kind'] == 'engine':
        serve(job['model_path'], job['config'], ranks, heartbeat)
    else:
        from .spmd import run_rank
        run_rank(job, ranks)


def _exit_with_parent(parent: int):
    """A spawned worker ends when the process that started it is gone (killed, or exited without closing)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name='lmdp-tp-parent', daemon=True).start()


def _exit_after(work, ranks: Ranks, heartbeat: Heartbeat):
    """Run a worker's `work()`, then end the process: a failure is written to the store for rank 0 to report.
    No interpreter teardown: a process group's destructor can block on, or abort for, peers that are gone."""
    code = 0
    try:
        work()
    except SystemExit as e:          # rank 0 called the start-up off: it says why itself
        code = 0 if e.code in (None, 0) else 1
    except BaseException as e:       # noqa: BLE001 - whatever it is, rank 0 must hear it and this process must end
        if heartbeat.state != 'idle':
            report_failure(ranks.store, ranks.rank, e)
            print(f'lmdp tensor-parallel rank {ranks.rank} failed:', file=sys.stderr)
            traceback.print_exc()
            code = 1
        # else: rank 0 went away between steps (its process ended without closing the pipeline); nothing was lost
    heartbeat.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(spec: dict):
    """A spawned worker's whole life (its arguments: see launch.spawn)."""
    rank, world = spec['rank'], spec['world']
    _exit_with_parent(spec['parent'])
    if spec.get('threads'):
        import torch
        torch.set_num_threads(spec['threads'])
    host, port = spec['store']
    ranks = Ranks(rank, world, rank_device(spec['device_type'], rank), (host, port))
    heartbeat = Heartbeat(ranks.connect, rank)
    heartbeat.start()

    def work():
        with open(spec['job'], 'rb') as f:
            job = pickle.load(f)
        ranks.store.set(f'ready/{rank}', '1')
        ranks.cpu_group = init_groups(rank, world, ranks.device,
                                      dist.TCPStore(host, port, is_master=False, timeout=CONTROL_TIMEOUT))
        _run(job, ranks, heartbeat)
    _exit_after(work, ranks, heartbeat)


def serve_env(model_path: str, config):
    """A rank other than 0 under torchrun: serve rank 0's steps, then end this process once rank 0 closes its
    pipeline (the script's lines after `pipeline()` run on rank 0 alone; the process ends by `os._exit`)."""
    ranks = join_env(config.resolved_device())
    heartbeat = Heartbeat(ranks.connect, ranks.rank)
    heartbeat.start()
    _exit_after(lambda: serve(model_path, config, ranks, heartbeat), ranks, heartbeat)
