"""`lmdp bench moe`'s checkpoint and roofline: the writer's checkpoint is a Qwen3-MoE transformers loads, and the
roofline's bytes are the parameters a batch-1 decode step reads (all but the input embedding and the experts not
chosen)."""
import pytest
import torch

from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.shapes import SHAPES


def test_moe_checkpoint_and_active_bytes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    shape = SHAPES['moe-tiny']
    path = ensure_checkpoint(shape, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.head_dim) == (16, 4, 128, 64)
    total = sum(p.numel() for p in model.parameters())
    assert 2 * total == shape.weight_bytes()
    unchosen = shape.layers * (shape.experts - shape.top_k) * 3 * shape.hidden * shape.moe_intermediate
    embedding = shape.vocab * shape.hidden
    assert 2 * (total - unchosen - embedding) == shape.decode_weight_bytes()
    assert AutoTokenizer.from_pretrained(path)('t5 t6').input_ids == [8, 9]     # one token per word


def test_fewer_layers_keep_the_layer_shape_in_a_folder_of_their_own(tmp_path):
    """`lmdp bench moe --layers 8`: the same layer, fewer of them; the roofline's bytes follow the layer count and
    the checkpoint gets its own folder, so neither engine reads a stale checkpoint of the full depth."""
    from transformers import AutoConfig

    from lmdp.bench.checkpoint import checkpoint_dir
    from lmdp.bench.shapes import with_layers
    full = SHAPES['moe-tiny']
    one = with_layers(full, 1)
    assert (one.name, one.layers, one.hidden, one.experts, one.top_k) == ('moe-tiny-1l', 1, 256, 16, 4)
    assert with_layers(full, None) is full and with_layers(full, full.layers) is full
    per_layer = full.decode_weight_bytes() - one.decode_weight_bytes()
    assert per_layer > 0
    assert with_layers(full, 3).decode_weight_bytes() - full.decode_weight_bytes() == per_layer
    assert checkpoint_dir(one, str(tmp_path)) != checkpoint_dir(full, str(tmp_path))
    cfg = AutoConfig.from_pretrained(ensure_checkpoint(one, str(tmp_path)))
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.hidden_size) == (1, 16, 256)
    with pytest.raises(ValueError, match='at least 1 decoder layer'):
        with_layers(full, 0)


def test_bench_refuses_a_bad_layer_count_before_any_work(capsys):
    from lmdp.bench.__main__ import main
    with pytest.raises(SystemExit):
        main(['moe', '--layers', '0'])
    assert "--layers: expected a whole number >= 1, got '0'" in capsys.readouterr().err
