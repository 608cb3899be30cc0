"""`check_model`: can lmdp run this checkpoint, and if not, what exactly to fix.

It runs the checks `pipeline()` runs before it reads any weight (`lmdp.preflight`), so every problem loading would
raise is reported here first, in the same words, plus a build of the model on the meta device (no memory).
"""
import os
from dataclasses import dataclass, field

_IMPL_NAMES = {'lmdp': 'lmdp port', 'transformers': 'transformers fallback', 'hybrid': 'partial port (hybrid)'}


@dataclass
class ModelCheck:
    """The answer of `check_model`: what was found, and every problem in words a person can act on."""
    model_path: str
    config_parsed: bool = False
    model_type: str | None = None
    architecture: str | None = None
    builder: str | None = None
    model_class: str | None = None
    model_impl: str | None = None          # 'lmdp' (a port), 'transformers' (the fallback) or 'hybrid'
    model_impl_reason: str | None = None   # why that path, in a sentence
    model_config: object = None
    weight_files: list[str] = field(default_factory=list)
    num_tensors: int | None = None
    tokenizer: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self):
        yes = lambda v: v if v else '-'  # noqa: E731
        tensors = f', {self.num_tensors} tensors (headers read)' if self.num_tensors is not None else ''
        lines = [f'checkpoint     {self.model_path}',
                 f"config.json    {'parsed' if self.config_parsed else 'NOT parsed'}"
                 + (f' (model_type {self.model_type})' if self.model_type else ''),
                 f'architecture   {yes(self.architecture)}',
                 f'config builder {yes(self.builder)}',
                 f'model class    {yes(self.model_class)}',
                 f'runs as        {yes(_IMPL_NAMES.get(self.model_impl))}'
                 + (f': {self.model_impl_reason}' if self.model_impl_reason else ''),
                 f'tokenizer      {yes(self.tokenizer)}',
                 f'weights        {len(self.weight_files)} file(s){tensors}']
        if self.model_config is not None:
            c = self.model_config
            lines.append(f'ModelConfig    hidden {c.hidden_size}, layers {c.num_layers}, heads {c.num_attention_heads}'
                         f'/{c.num_key_value_heads} kv, head_dim {c.head_dim}, vocab {c.vocab_size}, '
                         f'sliding_window {c.sliding_window}, dtype {str(c.dtype).replace("torch.", "")}, '
                         f'eos {c.eos_token_id}')
        lines += [f'note: {n}' for n in self.notes]
        lines += [f'PROBLEM: {p}' for p in self.problems] or ['OK: lmdp can load this checkpoint']
        return '\n'.join(lines)


def check_model(model_path: str, trust_remote_code: bool = False, dtype='auto', custom_module_map=None,
                model_impl: str = 'auto', tp: int = 1) -> ModelCheck:
    """Check a checkpoint folder without loading its weights; never raises for a bad checkpoint. model_impl as
    in PytorchEngineConfig: the report says which path the checkpoint takes (its port or the transformers
    fallback) and why; tp > 1 also checks that the model splits over that many tensor-parallel ranks."""
    from .configurations import AutoModelConfigBuilder
    from .preflight import check_all

    state = check_all(model_path, trust_remote_code, dtype, custom_module_map, model_impl, tp)
    report = ModelCheck(str(model_path), problems=state.problems, notes=state.notes)
    hf_config = state.hf_config
    if hf_config is not None:
        report.config_parsed = True
        report.model_type = getattr(hf_config, 'model_type', None)
        archs = getattr(hf_config, 'architectures', None) or []
        report.architecture = archs[0] if archs else None
        try:
            report.builder = AutoModelConfigBuilder.find_builder(hf_config).__name__
        except ValueError:
            pass                          # reported by the ModelConfig check
    report.model_config = state.model_config
    if state.model_class is not None:
        report.model_class = f'{state.model_class.__module__}.{state.model_class.__qualname__}'
    report.model_impl, report.model_impl_reason = state.impl, state.impl_reason
    if state.tokenizer is not None:
        report.tokenizer = type(state.tokenizer.model).__name__
    if state.manifest is not None:
        report.weight_files = [os.path.basename(f) for f in state.manifest.files]
        report.num_tensors = len(state.manifest.tensors) if state.manifest.headers_read else None
    return report
