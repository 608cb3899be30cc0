"""Which model class serves which `config.architectures` entry."""

LMDP_PYTORCH_MODEL_PATH = 'lmdp.models'

MODULE_MAP = {}

MODULE_MAP.update({
    'LlamaForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.llama.LlamaForCausalLM',
    'MistralForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.llama.LlamaForCausalLM',
})
