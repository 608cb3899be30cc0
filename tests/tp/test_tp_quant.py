"""Quantised checkpoints under tensor parallelism (CPU, gloo): the FP8 block scales and AWQ's packed weights,
zero points and scales shard with their rows and columns, so every port passes parity at tp=2; a tensor-parallel
size that would cut through a scale block is refused by name, as a configuration error."""
import pytest

from lmdp.errors import ConfigError

# every rank keeps whole 128-wide FP8 blocks and AWQ groups: 2 of 4 heads of 64, 256 of 512 MLP features
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
            num_hidden_layers=2)


def _quantised(tmp_path, family, fmt, **extra):
    from lmdp.tiny import make_tiny
    return str(make_tiny(family, tmp_path / f'{family}-{fmt}', quantize=fmt, **{**DIMS, **extra}))


@pytest.mark.slow
@pytest.mark.parametrize('family, fmt, extra', [
    ('llama', 'fp8-block', {}),
    ('llama', 'awq', {}),
    ('qwen3_moe', 'fp8-block', dict(moe_intermediate_size=256)),     # FP8 experts: 128 features a rank
])
def test_quantised_port_passes_parity_at_tp2(tmp_path, family, fmt, extra):
    from parity import compare
    report = compare(_quantised(tmp_path, family, fmt, **extra), tp=2, prompts=2, decode_steps=2)
    assert report.passed, report.summary()
    assert report.check('weight_coverage').passed


@pytest.mark.slow
def test_a_split_through_fp8_blocks_is_refused_as_a_config_error(tmp_path):
    from tp_helpers import make_pipe
    # hidden 256 over 4 ranks: each keeps 64 input features of o_proj and down_proj, half a 128-wide block
    path = _quantised(tmp_path, 'llama', 'fp8-block')
    with pytest.raises(Exception) as info:
        make_pipe(path, tp=4)
    text = str(info.value)
    assert 'cut through FP8 scale blocks of 128' in text and 'tensor-parallel size' in text
    assert 'probably missing or of the wrong type' not in text       # not a config.json problem


def test_the_shard_errors_are_config_errors():
    from lmdp.nn import linear
    with pytest.raises(ConfigError, match=r'out_features \(10\) does not split evenly over 3 tensor-parallel ranks'):
        linear._divide(10, 3, 'out_features')
    assert linear._divide(12, 3, 'out_features') == 4
