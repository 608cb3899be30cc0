"""Builds a model from a checkpoint folder and runs one step of it."""
import logging
import time
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..model_inputs import ModelInputs, StepContext, StepContextManager
from ..models.registry import CustomModuleMap, merged_module_map
from ..weight_loader import iter_checkpoint, load_model_weights, scan_checkpoint

logger = logging.getLogger('lmdp')


@dataclass
class LoadReport:
    """What a weight load covered: port parameters no checkpoint tensor filled, checkpoint tensors that filled
    nothing (those listed in the model's `ignored_checkpoint_keys` excluded)."""
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unused


def load_weights_with_report(model, model_path: str, strict: bool = True) -> LoadReport:
    """Load the checkpoint into `model` (progress bar on a terminal); strict=False reports missing parameters
    instead of raising WeightLoadError."""
    tracker = load_model_weights(model, model_path, weights=_with_progress(model_path), strict=strict)
    return LoadReport(missing=list(tracker.missing()), unused=list(tracker.unused))


def build_model(model_config: ModelConfig, model_path: str | None = None, device='cpu',
                custom_module_map: CustomModuleMap = None, load_weights: bool = True, strict: bool = True,
                model_impl: str = 'auto'):
    """Instantiate the class that serves the config's architecture (its port, or the transformers fallback: see
    `model_impl`) and (optionally) load its weights."""
    from ..fallback import choose_model_class
    choice = choose_model_class(model_config.hf_config, custom_module_map, model_impl)
    if choice.fell_back and device != 'meta':
        logger.warning(choice.reason)
    elif choice.impl != 'lmdp':
        logger.info(choice.reason)
    model_cls = choice.model_class
    ctx_mgr = StepContextManager()
    try:
        model = model_cls(model_config.hf_config, ctx_mgr, dtype=model_config.dtype, device=torch.device(device))
    except Exception as e:
        raise model_build_error(model_cls, e) from e
    if hasattr(model, 'adjust_model_config'):   # a model that sizes its KV cache its own way (the fallback)
        model.adjust_model_config(model_config)
    # a port written without dtype/device plumbing (plain nn.Linear) still ends up where asked
    # (a parameter marked `keep_dtype` keeps its own: Gemma's float32 norm gains)
    for param in model.parameters():
        dtype = param.dtype if getattr(param, 'keep_dtype', False) else model_config.dtype
        if param.is_floating_point() and (param.dtype != dtype or param.device != torch.device(device)):
            param.data = param.data.to(device=device, dtype=dtype)
    model.eval()
    if load_weights:
        load_weights_with_report(model, model_path, strict=strict)
    return model, ctx_mgr


def model_build_error(model_cls, error: Exception) -> ConfigError:
    """The error for a model class that can't be built from its config (in the same words for `lmdp check`)."""
    if isinstance(error, ConfigError):
        return error
    return ConfigError(f'{model_cls.__name__} could not be built from config.json ({type(error).__name__}: {error}); '
                       'a value in config.json is probably missing or of the wrong type for this model')


def _with_progress(model_path: str):
    """The checkpoint's tensors behind a progress bar (shown only when stderr is a terminal; none without tqdm)."""
    manifest = scan_checkpoint(model_path)        # every header checked before any tensor is read
    try:
        from tqdm import tqdm
    except ImportError:
        return iter_checkpoint(model_path, manifest.files)
    total = len(manifest.tensors) if manifest.headers_read else None
    return tqdm(iter_checkpoint(model_path, manifest.files), total=total, desc='loading weights', unit='tensor',
                disable=None, leave=False)


class ModelAgent:
    """A model, its step-context manager and the forward of one packed step."""

    def __init__(self, model, ctx_mgr: StepContextManager, model_config: ModelConfig, device='cpu',
                 load_report: LoadReport | None = None):
        self.model, self.ctx_mgr, self.model_config = model, ctx_mgr, model_config
        self.device = torch.device(device)
        self.load_report = load_report   # set by from_pretrained: what the weight load covered

    @classmethod
    def from_pretrained(cls, model_path: str, dtype='auto', device='cpu', custom_module_map: CustomModuleMap = None,
                        trust_remote_code: bool = False, strict: bool = True, model_impl: str = 'auto') -> 'ModelAgent':
        """strict=False: parameters the checkpoint never filled are listed in `agent.load_report.missing`
        (their values are garbage) instead of raising WeightLoadError. model_impl: 'auto' (the port when there is
        one, else the transformers fallback), 'lmdp' or 'transformers'."""
        start = time.perf_counter()
        if custom_module_map is not None:
            # read the user's map first: a ConfigBuilder it imports must be registered before the config is built
            custom_module_map = merged_module_map(custom_module_map)
        from ..fallback import choose_model_class
        from ..hf_config import load_hf_config
        # which class serves it (or why nothing can) is said before the config is read as a ModelConfig, whose
        # errors would be about fields a model that can't run anyway does not have
        choose_model_class(load_hf_config(model_path, trust_remote_code), custom_module_map, model_impl)
        model_config = ModelConfig.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        model, ctx_mgr = build_model(model_config, model_path, device, custom_module_map, load_weights=False,
                                     model_impl=model_impl)
        report = load_weights_with_report(model, model_path, strict=strict)
        if report.missing:   # only reached when not strict
            logger.warning('%d parameter(s) were never loaded from %s (their values are garbage): %s',
                           len(report.missing), model_path, ', '.join(report.missing))
        logger.info('loaded %s (%s, %s) in %.1f s', model_path, type(model).__name__, model_config.dtype,
                    time.perf_counter() - start)
        return cls(model, ctx_mgr, model_config, device, load_report=report)

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs, kv_caches) -> torch.Tensor:
        """The model's raw output for the step, `[T, hidden]` (or `[T, vocab]` for a port that returns logits)."""
        context = StepContext.new(inputs, self.model_config, kv_caches)
        with self.ctx_mgr.context(context):
            kwargs = self.model.prepare_inputs_for_generation(past_key_values=kv_caches,
                                                              inputs_embeds=inputs.inputs_embeds, context=context)
            output = self.model(**kwargs)
        return output.reshape(-1, output.size(-1))

    @torch.inference_mode()
    def get_logits(self, output: torch.Tensor) -> torch.Tensor:
        """float32 logits of the given rows of `forward`'s output."""
        get_logits = getattr(self.model, 'get_logits', None)
        logits = output if get_logits is None else get_logits(output)
        return logits.float()
