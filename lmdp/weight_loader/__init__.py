"""Weight loading: checkpoint streaming, `load_weight`, and coverage tracking."""
from .checkpoint import checkpoint_files, iter_checkpoint
from .model_weight_loader import load_model_weights, load_weight

__all__ = ['checkpoint_files', 'iter_checkpoint', 'load_model_weights', 'load_weight']
