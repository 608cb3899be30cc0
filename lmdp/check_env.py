"""`check_model`: can lmdp run this checkpoint, and if not, what exactly to fix."""
import os
from dataclasses import dataclass, field
from typing import List, Optional

from .errors import ConfigError


_IMPL_NAMES = {'lmdp': 'lmdp port', 'transformers': 'transformers fallback', 'hybrid': 'partial port (hybrid)'}


@dataclass
class ModelCheck:
    """The answer of `check_model`: what was found, and every problem in words a person can act on."""
    model_path: str
    config_parsed: bool = False
    model_type: Optional[str] = None
    architecture: Optional[str] = None
    builder: Optional[str] = None
    model_class: Optional[str] = None
    model_impl: Optional[str] = None          # 'lmdp' (a port), 'transformers' (the fallback) or 'hybrid'
    model_impl_reason: Optional[str] = None   # why that path, in a sentence
    model_config: object = None
    weight_files: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self):
        yes = lambda v: v if v else '-'  # noqa: E731
        lines = [f'checkpoint     {self.model_path}',
                 f"config.json    {'parsed' if self.config_parsed else 'NOT parsed'}"
                 + (f' (model_type {self.model_type})' if self.model_type else ''),
                 f'architecture   {yes(self.architecture)}',
                 f'config builder {yes(self.builder)}',
                 f'model class    {yes(self.model_class)}',
                 f'runs as        {yes(_IMPL_NAMES.get(self.model_impl))}'
                 + (f': {self.model_impl_reason}' if self.model_impl_reason else ''),
                 f'weights        {len(self.weight_files)} file(s)']
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
                model_impl: str = 'auto') -> ModelCheck:
    """Check a checkpoint folder without loading its weights; never raises for a bad checkpoint. model_impl as
    in PytorchEngineConfig: the report says which path the checkpoint takes (its port or the transformers
    fallback) and why."""
    from .configurations import AutoModelConfigBuilder
    from .configurations.default import BUILTIN_BUILDERS, unset_required_fields
    from .config import ModelConfig
    from .hf_config import load_hf_config, read_config_dict
    from .fallback import choose_model_class, cuda_graph_refusal
    from .models.registry import merged_module_map
    from .weight_loader import checkpoint_files

    report = ModelCheck(str(model_path))
    if custom_module_map is not None:
        # read the user's map first: a ConfigBuilder it imports must be registered before the builder is picked
        try:
            custom_module_map = merged_module_map(custom_module_map)
        except (ValueError, FileNotFoundError, TypeError, ImportError, SyntaxError) as e:
            report.problems.append(f'custom module map: {e}')
            return report
    try:
        raw = read_config_dict(model_path)
        hf_config = load_hf_config(model_path, trust_remote_code)
    except ConfigError as e:
        report.problems.append(str(e))
        return report
    report.config_parsed = True
    report.model_type = getattr(hf_config, 'model_type', None)
    archs = getattr(hf_config, 'architectures', None) or []
    report.architecture = archs[0] if archs else None

    try:
        builder = AutoModelConfigBuilder.find_builder(hf_config)
        report.builder = builder.__name__
        if builder.__name__ in BUILTIN_BUILDERS:
            for name in unset_required_fields(raw, hf_config):
                report.problems.append(f"config.json does not set {name}; transformers would fill in its default "
                                       f'({getattr(hf_config, name, None)!r}), which almost never matches the '
                                       f'weights. Add "{name}" to config.json')
        report.model_config = ModelConfig.from_hf_config(hf_config, model_path, dtype)
    except (ConfigError, ValueError, TypeError) as e:
        report.problems.append(f'{report.builder or "config builder"}: {e}')

    try:
        choice = choose_model_class(hf_config, custom_module_map, model_impl)
        model_cls = choice.model_class
        report.model_class = f'{model_cls.__module__}.{model_cls.__qualname__}'
        report.model_impl, report.model_impl_reason = choice.impl, choice.reason
        if choice.impl != 'lmdp':
            report.notes.append('CUDA graphs for decode: ' + (cuda_graph_refusal(hf_config) or 'yes, the model\'s '
                                                              'transformers code allows them'))
        for attr in ('forward', 'prepare_inputs_for_generation', 'load_weights'):
            if not callable(getattr(model_cls, attr, None)):
                report.problems.append(f'{model_cls.__name__} has no {attr}(); the engine calls it on every '
                                       'model (see the model contract in the seed guide)')
        if not hasattr(model_cls, 'get_logits'):
            report.notes.append(f'{model_cls.__name__} has no get_logits(): forward must return logits, and the '
                                'engine will compute them for every prefill token')
    except (ValueError, FileNotFoundError, TypeError) as e:
        report.problems.append(str(e))

    try:
        report.weight_files = [os.path.basename(f) for f in checkpoint_files(model_path)]
    except ValueError as e:
        report.problems.append(str(e))
    if not any(os.path.isfile(os.path.join(model_path, f)) for f in ('tokenizer.json', 'tokenizer.model')):
        report.notes.append('no tokenizer.json or tokenizer.model: text prompts will not work, token ids will')
    return report
