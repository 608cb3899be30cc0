"""The checkpoint shapes the benchmark measures, and their decode rooflines."""
from dataclasses import dataclass


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


SHAPES = {
    'tiny': LlamaShape('tiny', 256, 512, 2, 4, 2, 4096),
    '1b': LlamaShape('1b', 2048, 8192, 16, 32, 8, 128256),     # Llama-3.2-1B, untied
    '8b': LlamaShape('8b', 4096, 14336, 32, 32, 8, 128256),    # Llama-3-8B
}
