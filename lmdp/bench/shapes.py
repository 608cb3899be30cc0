"""The checkpoint shapes the benchmark measures, and their decode rooflines."""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def decode_weight_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes of weight one batch-1 decode step reads: every matrix and norm, but not the input embedding
        table, of which a step gathers one row."""
        h, i, d = self.hidden, self.intermediate, self.head_dim
        attn = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        lm_head = self.vocab * h
        return (self.layers * per_layer + h + lm_head) * bytes_per_param


@dataclass(frozen=True)
class MoeShape:
    """A Qwen3-MoE checkpoint shape: attention with per-head q/k norm, every layer a mixture of experts."""
    name: str
    hidden: int
    moe_intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    vocab: int

    def decode_weight_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes of weight one batch-1 decode step reads: the *active* parameters (attention, the router, the
        top-k experts' MLPs, norms, lm_head); the other experts are not read, nor the input embedding table."""
        h, d = self.hidden, self.head_dim
        attn = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 2 * d
        experts = self.top_k * 3 * h * self.moe_intermediate
        per_layer = attn + self.experts * h + experts + 2 * h
        return (self.layers * per_layer + h + self.vocab * h) * bytes_per_param

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        """Every parameter (what the checkpoint holds, and what a batch that reaches every expert reads)."""
        h, d = self.hidden, self.head_dim
        attn = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h + 2 * d
        per_layer = attn + self.experts * h + self.experts * 3 * h * self.moe_intermediate + 2 * h
        return (self.layers * per_layer + h + 2 * self.vocab * h) * bytes_per_param


SHAPES = {
    'tiny': LlamaShape('tiny', 256, 512, 2, 4, 2, 4096),
    '1b': LlamaShape('1b', 2048, 8192, 16, 32, 8, 128256),     # Llama-3.2-1B, untied
    '8b': LlamaShape('8b', 4096, 14336, 32, 32, 8, 128256),    # Llama-3-8B
    # Qwen3-30B-A3B's layer shape (128 experts of 768, top-8), 24 of its 48 layers: ~31 GB fits a 64 GB disk
    'moe': MoeShape('moe', 2048, 768, 24, 32, 4, 128, 128, 8, 151936),
    'moe-tiny': MoeShape('moe-tiny', 256, 128, 2, 4, 2, 64, 16, 4, 4096),
}


def with_layers(shape, layers=None):
    """`shape` with `layers` decoder layers (the same layer shape, named e.g. 'moe-8l'); `shape` itself for None."""
    if layers is None or layers == shape.layers:
        return shape
    if layers < 1:
        raise ValueError(f'a shape needs at least 1 decoder layer, got layers={layers}')
    return replace(shape, layers=layers, name=f'{shape.name}-{layers}l')
