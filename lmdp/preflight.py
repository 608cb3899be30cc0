"""The checks a checkpoint folder must pass before lmdp loads its weights, shared by `pipeline()` (which stops at the
first problem) and `lmdp check` (which reports every problem), so the two agree, in the same words.

In order: the custom module map runs; config.json parses (before the tokenizer, which would parse it again and fail
less clearly); a model class serves it (its port, or the transformers fallback); the ModelConfig builds (required
fields, rope settings) and the model builds on the meta device; generation_config.json holds valid settings; the
tokenizer loads; every weight file's header reads and no tensor is in two files; the tensor shapes agree with the
config. All of it takes milliseconds beyond the tokenizer's load: no weight is read and no memory is allocated for
the model.
"""
import os
from dataclasses import dataclass, field

from .errors import ArchitectureError, LmdpError


@dataclass
class Preflight:
    """What the checks found; a field stays None when its check failed or could not run."""
    model_path: str
    trust_remote_code: bool = False
    dtype: object = 'auto'
    custom_module_map: object = None
    model_impl: str = 'auto'
    tp: int = 1
    impl: str | None = None                # which path serves it: 'lmdp', 'transformers' or 'hybrid'
    impl_reason: str | None = None
    module_map: dict | None = None
    raw_config: dict | None = None
    hf_config: object = None
    model_config: object = None
    model_class: object = None
    gen_config: object = None
    eos_ids: list[int] = field(default_factory=list)
    tokenizer: object = None
    manifest: object = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _module_map(state: Preflight):
    from .models.registry import merged_module_map
    if state.custom_module_map is None:
        return
    try:
        state.module_map = merged_module_map(state.custom_module_map)
    except (LmdpError, FileNotFoundError, TypeError):
        raise
    except Exception as e:      # the user's file raised while it ran
        raise ArchitectureError(f'custom module map {os.fspath(state.custom_module_map)!r} could not be run '
                                f'({type(e).__name__}: {e}); fix the file') from e


def _config(state: Preflight):
    from .hf_config import load_hf_config, read_config_dict
    state.raw_config = read_config_dict(state.model_path)
    state.hf_config = load_hf_config(state.model_path, state.trust_remote_code)


def _model_config(state: Preflight):
    from .config import build_model_config
    state.model_config = build_model_config(state.hf_config, state.model_path, state.dtype, state.raw_config)
    vocab = state.model_config.vocab_size
    stray = [t for t in state.model_config.eos_token_id if not 0 <= t < vocab]
    if stray:
        state.notes.append(f'eos_token_id {stray} in config.json is outside the vocabulary [0, {vocab}): it can never '
                           'be generated, so lmdp ignores it as a stop id')


def _quantization(state: Preflight):
    """A quantised checkpoint's scheme is one lmdp runs (lmdp.quant_config), before anything is built."""
    from .quant_config import parse_quant_config
    parse_quant_config(state.raw_config.get('quantization_config'), f'config.json in {state.model_path!r}')


def _quantized_tensors(state: Preflight):
    from .quant_config import check_quantized_tensors, parse_quant_config
    scheme = parse_quant_config(state.raw_config.get('quantization_config'))
    check_quantized_tensors(scheme, state.manifest.tensors, repr(state.model_path))


def _model_class(state: Preflight):
    from .fallback import choose_model_class, cuda_graph_refusal
    choice = choose_model_class(state.hf_config, state.module_map or state.custom_module_map, state.model_impl)
    cls = choice.model_class
    state.impl, state.impl_reason = choice.impl, choice.reason
    if choice.impl != 'lmdp':
        state.notes.append('CUDA graphs for decode: ' + (cuda_graph_refusal(state.hf_config)
                                                         or "yes, the model's transformers code allows them"))
    state.model_class = cls
    for attr in ('forward', 'prepare_inputs_for_generation', 'load_weights'):
        if not callable(getattr(cls, attr, None)):
            raise ArchitectureError(f'{cls.__name__} has no {attr}(); the engine calls it on every model (see the '
                                    'model contract in the seed guide)')
    if not hasattr(cls, 'get_logits'):
        state.notes.append(f'{cls.__name__} has no get_logits(): forward must return logits, and the engine will '
                           'compute them for every prefill token')


def _model_build(state: Preflight):
    """Build the model on the meta device (no memory, milliseconds): rope settings and other values only the
    model's constructor reads fail here, before the tokenizer, the weights or any device memory."""
    from .engine.model_agent import build_model
    if state.impl not in (None, 'lmdp'):
        return      # the fallback measures its KV layout with a real one-token forward: nothing to build on meta
    build_model(state.model_config, device='meta', custom_module_map=state.module_map or state.custom_module_map,
                load_weights=False, model_impl=state.model_impl)


def _tensor_parallel(state: Preflight):
    """tp > 1: the model builds for the first and the last rank (on the meta device), so a size that does not split
    evenly over the ranks is named before any process starts."""
    if state.tp <= 1:
        return
    from .distributed import kv_heads_per_rank, simulated_tp
    from .engine.model_agent import build_model
    from .errors import ConfigError
    if state.impl not in (None, 'lmdp'):
        raise ConfigError(f'tp={state.tp}: tensor parallelism needs an lmdp port, and this model runs on the '
                          f'transformers fallback ({state.impl_reason}); use tp=1 or write a port from lmdp.nn blocks')
    try:
        kv_heads_per_rank(state.model_config.num_key_value_heads, state.tp)
        for rank in sorted({0, state.tp - 1}):
            with simulated_tp(state.tp, rank):
                build_model(state.model_config, device='meta', load_weights=False, model_impl=state.model_impl,
                            custom_module_map=state.module_map or state.custom_module_map)
    except (ValueError, NotImplementedError) as e:
        cause = e.__cause__ if isinstance(e, ConfigError) and e.__cause__ is not None else e
        raise ConfigError(f'tp={state.tp} does not fit this model: {cause}') from e


def _generation_config(state: Preflight):
    from .hf_config import generation_eos_ids
    from .messages import GenerationConfig
    state.gen_config = GenerationConfig.from_pretrained(state.model_path)
    state.eos_ids = generation_eos_ids(state.model_path)


def _tokenizer(state: Preflight):
    from .tokenizer import Tokenizer
    state.tokenizer = Tokenizer(state.model_path, state.trust_remote_code)


def _weights(state: Preflight):
    from .weight_loader import scan_checkpoint
    state.manifest = scan_checkpoint(state.model_path)
    if state.manifest.ignored:
        state.notes.append(f"not read (as transformers would not read them): {', '.join(state.manifest.ignored)}")


def _shapes(state: Preflight):
    from .weight_loader.config_shapes import check_config_against_weights
    check_config_against_weights(state.model_config, state.manifest, state.raw_config,
                                 f'config.json in {state.model_path!r}')


# (check, the fields it needs), in the order they run
CHECKS: list[tuple] = [
    (_module_map, ()),
    (_config, ()),
    (_quantization, ('raw_config',)),
    (_model_class, ('hf_config',)),
    (_model_config, ('hf_config',)),
    (_model_build, ('model_config', 'model_class')),
    (_tensor_parallel, ('model_config', 'model_class')),
    (_generation_config, ()),
    (_tokenizer, ('hf_config',)),
    (_weights, ()),
    (_shapes, ('model_config', 'manifest')),
    (_quantized_tensors, ('raw_config', 'manifest')),
]


def run_checks(state: Preflight, collect: bool) -> Preflight:
    """Run the checks in order. collect=False: raise the first problem; True: record each in `state.problems`
    (a check whose inputs failed is skipped; a broken module map or config.json stops the rest)."""
    for check, needs in CHECKS:
        if any(getattr(state, need) is None for need in needs):
            continue
        try:
            check(state)
        except (LmdpError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
            if not collect:
                raise
            state.problems.append(str(e))
            if check in (_module_map, _config, _quantization):
                break
    return state


def preflight(model_path: str, backend_config) -> Preflight:
    """Everything `lmdp check` checks, raising the first problem (lmdp's own errors, naming file and field)."""
    state = Preflight(os.fspath(model_path), backend_config.trust_remote_code, backend_config.dtype,
                      backend_config.custom_module_map, backend_config.model_impl, backend_config.tp)
    return run_checks(state, collect=False)


def check_all(model_path: str, trust_remote_code: bool = False, dtype='auto', custom_module_map=None,
              model_impl: str = 'auto', tp: int = 1) -> Preflight:
    """Every check, every problem recorded (never raises for a bad checkpoint)."""
    return run_checks(Preflight(os.fspath(model_path), trust_remote_code, dtype, custom_module_map, model_impl, tp),
                      collect=True)

