"""Model ports and the registry that maps architectures to them."""
from .module_map import LMDP_PYTORCH_MODEL_PATH, MODULE_MAP
from .registry import get_model_class, load_custom_module_map, merged_module_map

__all__ = ['LMDP_PYTORCH_MODEL_PATH', 'MODULE_MAP', 'get_model_class', 'load_custom_module_map',
           'merged_module_map']
