"""Turning a failed CUDA-graph capture into a reason and a fix a person can act on."""

# (substring of the error, reason, fix) — the first match wins
_KNOWN = [
    ('operation not permitted when stream is capturing',
     'the forward synchronises with the host during capture (e.g. .item(), .cpu(), .tolist(), print of a tensor, '
     'or a Python branch on a tensor value)',
     'keep values on the device: replace `if x.item() > 0:` by torch.where, read sizes from the step context '
     '(max_q_seqlen, max_kv_seqlen) instead of from tensors'),
    ('cudaErrorStreamCaptureUnsupported',
     'an operation that cannot be captured ran (a host synchronisation or a blocking copy)',
     'move host-side work out of forward; use non_blocking copies from pinned memory'),
    ('cudaErrorStreamCaptureInvalidated',
     'the capture was invalidated, usually by a synchronising call such as .item() or torch.cuda.synchronize()',
     'remove synchronising calls from forward'),
    ('nonzero', 'an op whose output shape depends on the data (nonzero, masked_select, unique, boolean indexing)',
     'use fixed-shape ops: torch.where, gather with precomputed indices, masks multiplied in'),
    ('data-dependent', 'an op whose output shape depends on the data',
     'use fixed-shape ops: torch.where, gather with precomputed indices, masks multiplied in'),
]


def explain_capture_error(error: BaseException):
    """(reason, fix) for an exception raised while capturing a CUDA graph."""
    text = f'{type(error).__name__}: {error}'
    for needle, reason, fix in _KNOWN:
        if needle.lower() in text.lower():
            return reason, fix
    return (f'capture failed: {text.splitlines()[0][:200]}',
            'run the step eagerly with CUDA_LAUNCH_BLOCKING=1 to find the failing op, or set '
            'support_cuda_graph = False for this model')
