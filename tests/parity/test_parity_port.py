"""What the harness needs from lmdp: the weight-load report on the agent, non-strict loads, loading without tqdm,
one lm_head call for a prefill's every row."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdp.engine import ModelAgent, StepRunner
from lmdp.errors import WeightLoadError
from lmdp.weight_loader import checkpoint_files
from parity.port import load_port


def _rewrite(src, tmp_path, edit):
    dst = tmp_path / 'ckpt'
    dst.mkdir()
    for f in os.listdir(src):
        if not f.endswith('.safetensors'):
            (dst / f).write_bytes(open(os.path.join(src, f), 'rb').read())
    tensors = {}
    for f in checkpoint_files(src):
        tensors.update(load_file(f))
    save_file(edit(tensors), str(dst / 'model.safetensors'), metadata={'format': 'pt'})
    return str(dst)


def test_load_report_and_non_strict_loads(tiny_llama, tmp_path):
    agent = ModelAgent.from_pretrained(tiny_llama, dtype='float32')
    assert agent.load_report.complete and agent.load_report.missing == agent.load_report.unused == []

    def edit(t):
        t['model.extra.weight'] = t.pop('model.norm.weight')
        return t
    path = _rewrite(tiny_llama, tmp_path, edit)
    with pytest.raises(WeightLoadError, match='model.norm.weight'):
        ModelAgent.from_pretrained(path, dtype='float32')
    agent = ModelAgent.from_pretrained(path, dtype='float32', strict=False)
    assert agent.load_report.missing == ['model.norm.weight']
    assert agent.load_report.unused == ['model.extra.weight'] and not agent.load_report.complete
    # the harness reads the same report, from one load
    _, coverage = load_port(path, torch.float32, 'cpu')
    assert (coverage.missing, coverage.unused) == (['model.norm.weight'], ['model.extra.weight'])


def test_weights_load_without_tqdm(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tqdm', None)     # makes `from tqdm import tqdm` fail
    agent = ModelAgent.from_pretrained(tiny_llama, dtype='float32')
    assert agent.load_report.complete


def test_prefill_all_logits_runs_lm_head_once(tiny_llama):
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=16, block_size=16)
    prompts = [list(range(3, 20)), list(range(5, 9)), list(range(7, 40))]
    calls = []
    get_logits = runner.agent.get_logits
    runner.agent.get_logits = lambda rows: calls.append(rows.size(0)) or get_logits(rows)
    out = runner.prefill(prompts, all_logits=True)
    assert calls == [sum(map(len, prompts))]
    assert [x.size(0) for x in out.all_logits] == [len(p) for p in prompts]
    assert torch.equal(out.logits, torch.stack([x[-1] for x in out.all_logits]))
    runner.release()
    last_only = runner.prefill(prompts).logits
    torch.testing.assert_close(out.logits, last_only, rtol=1e-5, atol=1e-5)
