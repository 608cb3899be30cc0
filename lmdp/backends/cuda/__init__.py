from .graph_runner import CaptureResult, CUDAGraphRunner, default_capture_batch_sizes

__all__ = ['CaptureResult', 'CUDAGraphRunner', 'default_capture_batch_sizes']
