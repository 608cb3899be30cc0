"""`lmdp bench moe`'s checkpoint and roofline: the writer's checkpoint is a Qwen3-MoE transformers loads, and the
roofline's bytes are the parameters a batch-1 decode step reads (all but the input embedding and the experts not
chosen)."""
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
