"""Llama and the families that share its config (Mistral, Qwen2/3)."""
from .builder import AutoModelConfigBuilder
from .default import llama_like_config


class LlamaModelConfigBuilder(AutoModelConfigBuilder):

    @classmethod
    def condition(cls, hf_config):
        return hf_config.model_type in ('llama', 'mistral', 'qwen2', 'qwen3')

    @classmethod
    def build(cls, hf_config, model_path: str = None, **kwargs):
        return llama_like_config(hf_config)
