"""The notebooks' out-of-tree Gemma port (written from lmdp.nn blocks, never mentioning tensor parallelism beyond
the builders' defaults) runs at tp=2 unchanged and passes parity against transformers."""
import glob
import os
import sys

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'notebooks')


def write_notebook_port(folder) -> str:
    """The files notebooks 00-05 write into my_port/ (the last version of each), in `folder`; returns the module
    map's path."""
    sys.path.insert(0, NOTEBOOKS)
    try:
        from catch_up import _writefile_cells
    finally:
        sys.path.remove(NOTEBOOKS)
    files = {}
    for notebook in sorted(glob.glob(os.path.join(NOTEBOOKS, '0[0-5]_*.ipynb'))):
        for target, text, append in _writefile_cells(notebook):
            files[target] = files.get(target, '') + text if append else text
    for target, text in files.items():
        path = os.path.join(folder, target)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
    return os.path.join(folder, 'my_port', 'module_map.py')


@pytest.mark.slow
def test_notebook_gemma_port_passes_parity_at_tp2(tmp_path):
    from lmdp.tiny import make_tiny
    from parity import compare
    module_map = write_notebook_port(tmp_path)
    path = str(make_tiny('gemma', tmp_path / 'tiny-gemma', num_hidden_layers=2))
    report = compare(path, custom_module_map=module_map, tp=2, prompts=2, decode_steps=3)
    assert report.port_class.endswith('MyGemmaForCausalLM')
    assert report.passed, report.summary()
