"""Weight loading: checkpoint streaming, `load_weight`, and coverage tracking."""
from .checkpoint import CheckpointManifest, checkpoint_files, iter_checkpoint, read_safetensors_header, scan_checkpoint
from .model_weight_loader import load_model_weights, load_weight

__all__ = ['CheckpointManifest', 'checkpoint_files', 'iter_checkpoint', 'load_model_weights', 'load_weight',
           'read_safetensors_header', 'scan_checkpoint']
