"""What the mixture-of-experts ports share: the sparse MoE block (router → top-k → fused experts, plus an optional
gated shared expert), which layers are sparse, and loading per-expert checkpoint tensors into stacked experts."""
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..nn import SoftmaxTopK, build_fused_moe, build_rowwise_linear, build_shared_expert_gate
from ..nn.moe import expert_params_mapping
from ..weight_loader import load_weight


class SparseMoeBlock(nn.Module):
    """`experts(x, *softmax_topk(gate(x)))`, plus `shared_expert_gate(x, shared_expert(x))` when the family has a
    shared expert (Qwen2-MoE). Children are named as in the checkpoints: `gate` (the router), `experts`,
    `shared_expert`, `shared_expert_gate`."""

    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, hidden_act: str = 'silu', shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, dtype=None, device=None, quant_config=None):
        super().__init__()
        # the router stays whole and unquantised on every rank: each rank routes every token itself
        self.gate = build_rowwise_linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device, is_tp=False)
        self.softmax_topk = SoftmaxTopK(top_k)
        self.experts = build_fused_moe(hidden_size, moe_intermediate_size, num_experts, top_k,
                                       renormalize=renormalize, dtype=dtype, device=device,
                                       quant_config=quant_config, act=hidden_act)
        self.shared_expert = shared_expert
        self.shared_expert_gate = build_shared_expert_gate(hidden_size, dtype, device) if shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.size(-1))
        router_logits = self.gate(x)
        topk_weights, topk_ids = self.softmax_topk(router_logits)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = self.shared_expert_gate(x, shared)
            out = out + shared
        return out.reshape(hidden_states.shape)


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Qwen-MoE's rule: layers in `mlp_only_layers` are dense, and of the rest every `decoder_sparse_step`-th."""
    if layer_idx in (getattr(config, 'mlp_only_layers', None) or ()):
        return False
    step = getattr(config, 'decoder_sparse_step', 1) or 1
    return getattr(config, 'num_experts', 0) > 0 and (layer_idx + 1) % step == 0


class MoeWeightsMixin:
    """`load_weights` for a port whose experts are stacked: per-expert checkpoint tensors
    (`...experts.N.<gate|up|down name>.weight`) and transformers 5's all-experts tensors (`...experts.gate_up_proj`,
    `...experts.down_proj`) go to `experts.gate_up` / `experts.down`; every other tensor to the base class's
    `load_weights`. Set `expert_checkpoint_names` (gate, up, down) and, for checkpoints whose module names differ
    from the port's, `checkpoint_renames` [(checkpoint fragment, port fragment)]."""

    expert_checkpoint_names: Sequence[str] = ('gate_proj', 'up_proj', 'down_proj')
    checkpoint_renames: Sequence[tuple[str, str]] = ()

    def init_expert_mapping(self, num_experts: int):
        """`expert_params_mapping` (lmdeploy's list; it also names the tensor a missing expert shard expects)."""
        # in the checkpoint's own names (hints for missing experts name tensors that exist)
        ckpt_prefix = '.mlp.experts'
        for old, new in self.checkpoint_renames:
            ckpt_prefix = ckpt_prefix.replace(new, old)
        self.expert_params_mapping = expert_params_mapping(num_experts, '.mlp.experts', self.expert_checkpoint_names,
                                                           ckpt_prefix)
        gate, up, down = (re.escape(n) for n in self.expert_checkpoint_names)
        self._expert_re = re.compile(rf'^(.*\.experts)\.(\d+)\.({gate}|{up}|{down})\.(weight|weight_scale_inv)$')
        self._shard_of = dict(zip(self.expert_checkpoint_names, ('gate', 'up', 'down')))

    def match_expert(self, name: str):
        """(parameter name, expert_id, shard_id) for an expert tensor's checkpoint name, else None."""
        m = self._expert_re.match(name)
        if m:
            shard = self._shard_of[m.group(3)]
            return (f"{m.group(1)}.{'down' if shard == 'down' else 'gate_up'}.{m.group(4)}", int(m.group(2)),
                    shard)
        for fused, shard in (('.experts.gate_up_proj', 'gate_up'), ('.experts.down_proj', 'down')):
            if name.endswith(fused):
                return f"{name[:-len(fused)]}.experts.{'down' if shard == 'down' else 'gate_up'}.weight", None, shard
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params = dict(self.named_parameters())

        def others():
            for name, tensor in weights:
                for old, new in self.checkpoint_renames:
                    name = name.replace(old, new)
                hit = self.match_expert(name)
                if hit is None:
                    yield name, tensor
                elif hit[0] in params:
                    load_weight(params[hit[0]], tensor, expert_id=hit[1], shard_id=hit[2])
        super().load_weights(others())
