"""Each rank holds its shard of every sharded weight and a copy of the replicated ones, nothing more."""
import pytest
from rank_probe import parameter_bytes

from lmdp.engine.tp.spmd import run_on_ranks

# weights every rank keeps whole: norms (1-D, [hidden]) and MoE routers
REPLICATED = ('norm', 'router', '.gate.weight')


@pytest.mark.parametrize('family, world', [('llama', 2), ('qwen3', 2), ('mixtral', 2)])
def test_each_rank_holds_its_share_of_the_parameters(tmp_path, family, world):
    from lmdp.tiny import make_tiny
    # a vocabulary that divides (the tokenizer's 512) and one layer keep the run short; q/k/v, o, MLP or
    # experts, embedding and lm_head all shard
    path = str(make_tiny(family, tmp_path / family, num_hidden_layers=1))
    full = parameter_bytes(path)
    replicated = sum(b for name, b in full.items() if any(key in name for key in REPLICATED))
    sharded = sum(full.values()) - replicated
    expected = sharded / world + replicated
    per_rank = run_on_ranks(world, parameter_bytes, path)
    for rank, params in enumerate(per_rank):
        assert params.keys() == full.keys()
        held = sum(params.values())
        assert abs(held - expected) <= 0.05 * expected, (
            f'rank {rank} holds {held} bytes, expected {expected:.0f} ({sharded} sharded / {world} + {replicated} '
            f'replicated); largest: {sorted(params.items(), key=lambda kv: -kv[1])[:4]}')
