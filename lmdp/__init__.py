"""lmdp: a model-porting workbench for a paged-attention LLM inference engine."""

__version__ = '0.1.0'
