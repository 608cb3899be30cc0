"""Tensor parallelism for the engine: starting the ranks (launch), keeping them in step (step_sync), the workers'
side (worker), naming a rank that fails (health), and running a function on every rank (spmd)."""
from .launch import RankPlan, Ranks, check_world, env_rank, join_env, spawn
from .step_sync import LeaderModelRunner


def start_ranks(model_path: str, config) -> Ranks:
    """Rank 0 of an engine with `config.tp` ranks: start the others (or, under torchrun, meet them) and join the
    process groups. Every rank then builds its own shard of the engine (lmdp.engine.tp.worker.serve)."""
    device_type = config.resolved_device()
    launched = env_rank()
    check_world(config.tp, device_type, launched)
    if launched is not None:
        if launched[0] != 0:
            raise RuntimeError(f'rank {launched[0]} builds no engine; pipeline() serves rank 0 there '
                               '(lmdp.engine.tp.worker.serve_env)')
        return join_env(device_type)
    return spawn(config.tp, device_type, dict(kind='engine', model_path=model_path, config=config))


__all__ = ['LeaderModelRunner', 'RankPlan', 'Ranks', 'start_ranks']
