"""Notebook views of a port: per-layer parity error, CUDA-graph eligibility, weight coverage.

Each view has a data model (plain dataclasses, testable without a browser) and an HTML rendering; the
`*_view` functions wrap that HTML in ipywidgets with selectors. ipywidgets is imported only when a view is built,
so `import lmdp`, the engine and the parity harness never need it.

    from lmdp.widgets import parity_view, cuda_graph_view, coverage_view
    parity_view(report)                       # a parity.ParityReport
    cuda_graph_view(model_path, custom_module_map=...)
    coverage_view(model_path, custom_module_map=...)
"""

from .._lazy import lazy_getattr

_LAZY = {
    # data models
    'LayerErrorTable': 'lmdp.widgets.layer_errors',
    'layer_error_table': 'lmdp.widgets.layer_errors',
    'METRICS': 'lmdp.widgets.layer_errors',
    'GraphEligibility': 'lmdp.widgets.graph_eligibility',
    'graph_eligibility': 'lmdp.widgets.graph_eligibility',
    'HostSyncFinding': 'lmdp.widgets.host_sync_scan',
    'scan_host_syncs': 'lmdp.widgets.host_sync_scan',
    'WeightCoverage': 'lmdp.widgets.weight_coverage',
    'weight_coverage': 'lmdp.widgets.weight_coverage',
    'coverage_from_report': 'lmdp.widgets.weight_coverage',
    # views (these import ipywidgets when called)
    'parity_view': 'lmdp.widgets.layer_error_view',
    'cuda_graph_view': 'lmdp.widgets.graph_eligibility_view',
    'coverage_view': 'lmdp.widgets.weight_coverage_view',
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(globals(), _LAZY)
