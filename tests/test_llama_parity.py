"""The Llama port against transformers: packed prefill, paged decode, shuffled blocks (float32, CPU)."""
import pytest
import torch

from lmdp.engine import StepRunner
from parity import compare_logits
from parity.logits import random_prompts


def _hf_rows(hf_model, prompt, generated):
    """Reference logits for the rows lmdp produced: teacher-forced on lmdp's own tokens."""
    with torch.inference_mode():
        ids = torch.tensor([prompt + generated[:-1]])
        return hf_model(ids).logits[0, len(prompt) - 1:]


def test_packed_prefill_and_paged_decode_match_transformers(tiny_llama, hf_llama):
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=64, block_size=16,
                                        shuffle_blocks_seed=123)
    prompts = random_prompts([5, 17, 64], hf_llama.config.vocab_size, seed=1)
    generated, step_logits = runner.generate_greedy(prompts, 9)       # prefill + 8 decode steps

    # the blocks really were handed out out of order: no sequence owns a run of consecutive blocks
    tables = [s.blocks for s in runner.sequences.values()]
    assert any(b - a != 1 for blocks in tables for a, b in zip(blocks, blocks[1:]))
    assert sum(len(t) for t in tables) == sum(-(-(len(p) + 8) // 16) for p in prompts)

    for i, prompt in enumerate(prompts):
        ref = _hf_rows(hf_llama, prompt, generated[i])
        ours = torch.stack([s[i] for s in step_logits])
        rel = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max().item() < 1e-5, f'prompt {i}: relative L2 error per step {rel.tolist()}'
        assert ref.argmax(-1).tolist() == generated[i]
        # and transformers' own cached greedy generation agrees token for token
        hf_out = hf_llama.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False)
        assert hf_out[0, len(prompt):].tolist() == generated[i]


def test_compare_logits_passes_and_reports(tiny_llama):
    report = compare_logits(tiny_llama, prompt_lengths=(5, 17, 64), decode_steps=8, block_size=16)
    assert report.passed, report.summary()
    assert report.max_rel_error < 1e-5
    assert len(report.rel_errors) == 3 and all(len(r) == 9 for r in report.rel_errors)
    assert 'PASS' in report.summary()


def test_compare_logits_catches_a_wrong_norm_eps(tiny_llama, monkeypatch):
    """The comparison can fail: a port with a wrong RMSNorm eps is flagged."""
    from lmdp.nn import norm
    original = norm.RMSNorm.__init__

    def wrong_eps(self, hidden_size, eps=1e-6, *args, **kwargs):
        original(self, hidden_size, eps * 1e5, *args, **kwargs)
    monkeypatch.setattr(norm.RMSNorm, '__init__', wrong_eps)
    report = compare_logits(tiny_llama, prompt_lengths=(5, 17), decode_steps=2)
    assert not report.passed
    assert report.max_rel_error > 1e-4
    assert 'FAIL' in report.summary()


@pytest.mark.parametrize('overrides', [dict(tie_word_embeddings=True), dict(num_key_value_heads=4)],
                         ids=['tied', 'mha'])
def test_llama_variants_match(tmp_path, overrides):
    from lmdp.tiny import make_tiny
    path = make_tiny('llama', tmp_path / 'm', **overrides)
    report = compare_logits(str(path), prompt_lengths=(7, 20), decode_steps=4)
    assert report.passed, report.summary()


def test_mistral_sliding_window_through_the_llama_port(tmp_path):
    """Prompts longer than the 32-token window: the paged kernels must mask what transformers masks."""
    from lmdp.tiny import make_tiny
    path = make_tiny('mistral', tmp_path / 'mistral')
    report = compare_logits(str(path), prompt_lengths=(40, 70), decode_steps=6)
    assert report.passed, report.summary()
