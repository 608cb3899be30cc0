"""The static scan for what breaks CUDA-graph capture: it finds host syncs and data-dependent shapes in the port's
own step code, with a fix for each, and stays quiet about lmdp's built-in ports and layers."""
import importlib
import importlib.util
import textwrap

import pytest

from lmdp.widgets.host_sync_scan import RULES, port_classes, scan_host_syncs

BROKEN = textwrap.dedent('''
    import torch
    from torch import nn
    from lmdp.nn import RMSNorm


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(4)
            n = torch.ones(1).item()            # __init__ runs at build time: not a finding

        def forward(self, x, mask):
            if (x > 0).any():
                x = x * 2
            kept = x[mask > 0]
            idx = torch.nonzero(mask)
            print('shapes', x.shape)
            return x


    class Port(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x, mask):
            scale = x.abs().max().item()
            lens = mask.sum(-1).cpu().tolist()
            return self.block(x, mask) / scale

        def load_weights(self, weights):
            for name, w in weights:
                print(name, w.sum().item())        # host-side by design: not a finding
''')


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / 'broken_port.py'
    path.write_text(BROKEN)
    spec = importlib.util.spec_from_file_location('broken_port', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finds_each_capture_breaker_with_its_line_and_fix(broken):
    found = scan_host_syncs(broken.Port())
    got = {(f.function, f.pattern) for f in found}
    assert got == {('Block.forward', 'if on a tensor'), ('Block.forward', 'boolean mask index'),
                   ('Block.forward', '.nonzero()'), ('Block.forward', 'print()'),
                   ('Port.forward', '.item()'), ('Port.forward', '.cpu()'), ('Port.forward', '.tolist()')}
    item = next(f for f in found if f.pattern == '.item()')
    assert item.code == 'scale = x.abs().max().item()'
    assert BROKEN.splitlines()[item.line - 1].strip() == item.code
    assert item.file.endswith('broken_port.py') and item.fix == RULES['.item()'][1] and 'torch.where' in item.fix


def test_a_class_alone_is_scanned_without_its_submodules(broken):
    assert {f.function for f in scan_host_syncs(broken.Port)} == {'Port.forward'}


def test_lmdp_layers_are_not_the_port(broken):
    names = [c.__name__ for c in port_classes(broken.Port())]
    assert names == ['Port', 'Block']


@pytest.mark.parametrize('port', ['lmdp.models.llama.LlamaForCausalLM', 'lmdp.models.gemma.GemmaForCausalLM'])
def test_the_built_in_ports_are_graph_safe(port):
    from lmdp.model_inputs import StepContextManager
    from lmdp.tiny import tiny_config
    module, _, name = port.rpartition('.')
    cls = getattr(importlib.import_module(module), name)
    model = cls(tiny_config('gemma' if 'gemma' in module else 'llama'), StepContextManager())
    assert len(port_classes(model)) >= 5          # the model and its layers were all read
    assert scan_host_syncs(model) == []
