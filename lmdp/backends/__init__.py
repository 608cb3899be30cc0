"""Per-device backends. `cuda` holds the CUDA-graph runner; the ops themselves dispatch in lmdp.kernels."""
