"""Which model class serves which `config.architectures` entry."""

LMDP_PYTORCH_MODEL_PATH = 'lmdp.models'

MODULE_MAP = {}

MODULE_MAP.update({
    'LlamaForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.llama.LlamaForCausalLM',
    'MistralForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.llama.LlamaForCausalLM',
})

MODULE_MAP.update({
    'GemmaForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.gemma.GemmaForCausalLM',
    'Gemma2ForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.gemma.GemmaForCausalLM',
})

MODULE_MAP.update({
    'Qwen2ForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.qwen2.Qwen2ForCausalLM',
    'Qwen3ForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.qwen3.Qwen3ForCausalLM',
    'Phi3ForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.phi3.Phi3ForCausalLM',
    'Gemma3ForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.gemma3.Gemma3ForCausalLM',
})

MODULE_MAP.update({
    'MixtralForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.mixtral.MixtralForCausalLM',
    'Qwen2MoeForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.qwen2_moe.Qwen2MoeForCausalLM',
    'Qwen3MoeForCausalLM': f'{LMDP_PYTORCH_MODEL_PATH}.qwen3_moe.Qwen3MoeForCausalLM',
})
