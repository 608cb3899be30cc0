"""Gemma, Gemma 2 and Gemma 3 (text): head_dim is set explicitly, and Gemma 2/3 slide a window on some layers
only."""
from .builder import AutoModelConfigBuilder
from .default import llama_like_config


class GemmaModelConfigBuilder(AutoModelConfigBuilder):

    @classmethod
    def condition(cls, hf_config):
        return hf_config.model_type in ['gemma', 'gemma2', 'gemma3_text']

    @classmethod
    def build(cls, hf_config, model_path: str = None, **kwargs):
        # Gemma 2/3 mix sliding and global layers: the port reads the window per layer from hf_config,
        # so the model-wide figure stays -1 (not every layer slides).
        return llama_like_config(hf_config, head_dim=hf_config.head_dim, sliding_window=-1)
