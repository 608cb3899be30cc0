"""`TransformersForCausalLM`: any decoder transformers ships, run by lmdp's engine on its own modeling code.

The transformers model is built from the config with lmdp's paged attention as its attention implementation
(`attention.py`) and its weights uninitialised; the checkpoint then streams in through lmdp's loader
(`weights.py`). Its top-level modules become this module's children under their own names (`model`, `lm_head`;
`gpt_neox`, `embed_out`; ...), so parameter names are the checkpoint's and the parity harness finds its taps
(`model.layers.N.self_attn`, ...) where it finds them on the reference.

The engine's contract is met as a port meets it: `forward` runs the base model on the packed `[1, T]` step and
returns hidden states, `get_logits` applies the model's own head -- whatever its CausalLM forward does after the
base model (a softcap, a logit scale), it still does, because that forward is what runs.
"""
import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ArchitectureError
from ..model_inputs import StepContext, StepContextManager
from ..weight_loader import load_weight
from ..weight_loader.tracker import record_load
from .attention import ATTN_IMPLEMENTATION, PagedStep, paged_step, register_paged_attention
from .support import cuda_graph_refusal, kv_layout, refusals
from .weights import CheckpointNames, attach_merge_loaders

logger = logging.getLogger('lmdp')


def build_hf_model(hf_config, dtype: torch.dtype | None, device) -> nn.Module:
    """The transformers CausalLM for `hf_config` with paged attention, parameters allocated but not initialised."""
    from transformers import AutoModelForCausalLM

    from ..quiet import quiet_transformers
    register_paged_attention()
    config = copy.deepcopy(hf_config)
    try:   # skip the random init: every parameter is about to be overwritten by the checkpoint
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib
        no_init_weights = contextlib.nullcontext
    device = torch.device(device or 'cpu')
    with quiet_transformers(), torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model.tie_weights()   # skipped with the init; a tied head must share the embedding's parameter before loading
    return model.to(device).eval()


class _HiddenOnly:
    """The base model's output as the CausalLM forward reads it: the hidden states, and None for everything
    else it may ask for (router logits, a cache)."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name):
        return None

    def __getitem__(self, index):
        if index == 0:
            return self.last_hidden_state
        raise IndexError(index)


class _ReturnHidden:
    """Stands in for the base model's forward while the CausalLM forward turns hidden states into logits."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden

    def __call__(self, *args, **kwargs):
        return _HiddenOnly(self.hidden)


class TransformersForCausalLM(nn.Module):
    """The transformers fallback: a checkpoint's own transformers modeling code on lmdp's paged KV cache."""

    packed_modules_mapping = {}
    #: progressive porting: the Swaps `hybrid(...)` classes apply as they are built (see hybrid.py)
    swaps = ()
    #: run lmdp's kernels under the transformers code where they compute the same (fast_paths.py)
    use_lmdp_kernels = True

    def adjust_model_config(self, model_config):
        """Size the KV cache as this model's attention produces k/v (measured by `_probe_kv_layout`: a config may
        name its head counts its own way); the sliding window is per layer, read by the attention function."""
        kv_heads, k_dim, v_dim = self.kv_layout
        model_config.num_key_value_heads, model_config.k_head_dim, model_config.v_head_dim = kv_heads, k_dim, v_dim
        model_config.head_dim = k_dim
        model_config.num_layers = self.num_layers
        model_config.sliding_window = -1
        return model_config

    def __init__(self, config, ctx_mgr: StepContextManager = None, dtype: torch.dtype = None,
                 device: torch.device = None):
        super().__init__()
        why = refusals(config)
        if why:
            raise ArchitectureError(f'the transformers fallback cannot serve {_arch(config)}: ' + '; '.join(why))
        hf = build_hf_model(config, dtype, device)
        self.ctx_mgr = ctx_mgr
        # the transformers model is not a child: its children are ours, under their own names
        object.__setattr__(self, 'hf_model', hf)
        for name, child in hf.named_children():
            self.add_module(name, child)
        for name, param in hf.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.config = hf.config
        self.hf_class = type(hf).__name__
        self.num_layers = int(getattr(hf.config.get_text_config(), 'num_hidden_layers', 0) or 0)
        self.kv_layout = self._probe_kv_layout(config)
        self.swapped = {}       # module name -> the Swap that made it native
        self.cuda_graph_refusal = cuda_graph_refusal(config)
        self.support_cuda_graph = self.cuda_graph_refusal is None
        if self.cuda_graph_refusal:
            logger.info('%s: no CUDA graphs: %s', self.hf_class, self.cuda_graph_refusal)
        self.checkpoint_names = CheckpointNames(hf, dict(self.named_parameters()))
        attach_merge_loaders(dict(self.named_parameters()), self.checkpoint_names)
        self.ignored_checkpoint_keys = [r'rotary_emb\.inv_freq', r'\.masked_bias$', r'\.attn\.bias$']
        self.ignored_checkpoint_keys += list(getattr(hf, '_keys_to_ignore_on_load_unexpected', None) or [])
        if self._tied_head():
            head = self._head_name()
            if head:
                self.ignored_checkpoint_keys.append(rf'^{head}\.weight$')
        if self.swaps:
            from .hybrid import apply_swaps
            apply_swaps(self, self.swaps, carry_weights=False)
        self.fast_paths = []
        if self.use_lmdp_kernels:
            from .fast_paths import install
            self.fast_paths = install(self)

    # -- the model contract ---------------------------------------------------------------------------------

    @property
    def base_model(self) -> nn.Module:
        return self.hf_model.base_model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata=None,
                inputs_embeds: torch.Tensor = None, **kwargs) -> torch.Tensor:
        step = PagedStep(past_key_values, attn_metadata)
        with paged_step(step):
            if inputs_embeds is not None:
                out = self.base_model(inputs_embeds=inputs_embeds.reshape(1, -1, inputs_embeds.size(-1)),
                                      position_ids=position_ids, use_cache=False)
            else:
                out = self.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        if len(step.served) != len(past_key_values):
            missed = sorted(set(range(len(past_key_values))) - step.served)
            raise RuntimeError(f'{self.hf_class}: the attention of layer(s) {missed} never reached lmdp\'s paged '
                               'attention (its code computes attention without transformers\' attention interface), '
                               'so their KV cache was not written; this model cannot run on the fallback')
        hidden = out.last_hidden_state if hasattr(out, 'last_hidden_state') else out[0]
        return hidden[0]

    def get_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The CausalLM's own forward from the base model's output on: head, then any softcap or scale."""
        base = self.base_model
        base.forward = _ReturnHidden(hidden_states[None])   # an instance attribute shadows the class's forward
        try:
            out = self.hf_model(inputs_embeds=hidden_states[None], use_cache=False)
        finally:
            del base.forward
        return out.logits[0]

    def get_input_embeddings(self):
        return self.hf_model.get_input_embeddings()

    def prepare_inputs_for_generation(self, past_key_values, inputs_embeds: torch.Tensor | None = None,
                                      context: StepContext = None):
        return dict(input_ids=context.input_ids, position_ids=context.position_ids,
                    past_key_values=past_key_values, attn_metadata=context.attn_metadata,
                    inputs_embeds=inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        swapped = self._swapped_loaders()
        for name, tensor in weights:
            if swapped:
                canonical = self.checkpoint_names.canonical(name)
                prefix = next((p for p in swapped if canonical.startswith(p + '.')), None)
                if prefix is not None:    # a native module: its own loader, names relative to it
                    module, swap = swapped[prefix]
                    from .hybrid import load_module_weights
                    load_module_weights(module, [(canonical[len(prefix) + 1:], tensor)], swap.stacked_params_mapping)
                    continue
            target = self.checkpoint_names.resolve(name)
            if target is None:
                if name in buffers:     # a persistent buffer saved with the weights
                    with torch.no_grad():
                        buffers[name].copy_(tensor.to(buffers[name].dtype))
                    record_load(buffers[name])
                continue
            param_name, shard = target
            if shard is None:
                load_weight(params[param_name], tensor)
            else:
                load_weight(params[param_name], tensor, shard_id=shard)

    # -- helpers --------------------------------------------------------------------------------------------

    def _swapped_loaders(self):
        return {name: (self.get_submodule(name), swap) for name, swap in self.swapped.items()}

    @torch.no_grad()
    def _probe_kv_layout(self, hf_config) -> tuple[int, int, int]:
        """(kv heads, k head dim, v head dim) as every layer's attention actually produces them: one token through
        the (not yet loaded) model, with an attention function that only records shapes. A layer whose attention
        never reaches the interface is found here, before a cache is sized."""
        device = next(self.parameters()).device
        step = PagedStep([], None, probe={})
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        with paged_step(step):
            self.base_model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)
        missed = sorted(set(range(self.num_layers)) - set(step.probe))
        if missed:
            raise ArchitectureError(f'{self.hf_class}: the attention of layer(s) {missed} does not go through '
                                    'transformers\' attention interface, so lmdp\'s paged cache cannot serve it; '
                                    'this model cannot run on the transformers fallback')
        layouts = set(step.probe.values())
        if len(layouts) != 1:
            raise ArchitectureError(f'{self.hf_class}: layers produce keys/values of different shapes '
                                    f'{sorted(layouts)}; lmdp\'s KV cache holds one shape for every layer')
        (k_heads, k_dim), (v_heads, v_dim) = layouts.pop()
        if k_heads != v_heads:
            raise ArchitectureError(f'{self.hf_class}: keys have {k_heads} heads but values {v_heads}')
        expected = kv_layout(hf_config)
        if expected != (k_heads, k_dim, v_dim):
            logger.info('%s: the config reads as kv heads/k dim/v dim %s, the attention produces %s; the cache '
                        'follows the attention', self.hf_class, expected, (k_heads, k_dim, v_dim))
        return k_heads, k_dim, v_dim

    def _head_name(self) -> str | None:
        head = self.hf_model.get_output_embeddings()
        for name, module in self.named_modules():
            if module is head:
                return name
        return None

    def _tied_head(self) -> bool:
        head, embed = self.hf_model.get_output_embeddings(), self.hf_model.get_input_embeddings()
        return head is not None and embed is not None and head.weight is embed.weight

    def extra_repr(self):
        return f'transformers fallback of {self.hf_class}'


def _arch(hf_config) -> str:
    return (getattr(hf_config, 'architectures', None) or [getattr(hf_config, 'model_type', '?')])[0]
