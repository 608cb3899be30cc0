"""Gemma and Gemma 2 ports against transformers (float32, CPU): (1 + w) norms, embedding scale, tanh GELU,
Gemma 2's sandwich norms, alternating sliding window and softcaps."""
import pytest

from lmdp.models import get_model_class
from parity import compare_logits


@pytest.mark.parametrize('family', ['gemma', 'gemma2'])
def test_gemma_family_matches_transformers(tmp_path, family):
    from lmdp.tiny import make_tiny
    path = make_tiny(family, tmp_path / family)
    # 40 and 70 tokens run past gemma2's 32-token window on its sliding layers
    report = compare_logits(str(path), prompt_lengths=(5, 40, 70), decode_steps=6)
    assert report.passed, report.summary()


def test_gemma2_without_its_softcap_would_fail(tmp_path, monkeypatch):
    """The comparison sees Gemma 2's final softcap: dropping it from the port fails parity."""
    from lmdp.models import gemma
    from lmdp.tiny import make_tiny
    path = make_tiny('gemma2', tmp_path / 'g2')
    monkeypatch.setattr(gemma.GemmaForCausalLM, 'get_logits', lambda self, h: self.lm_head(h))
    report = compare_logits(str(path), prompt_lengths=(5, 12), decode_steps=2)
    assert not report.passed


def test_gemma_architectures_are_registered(tmp_path):
    import transformers
    for arch in ('GemmaForCausalLM', 'Gemma2ForCausalLM'):
        cfg = transformers.PretrainedConfig(architectures=[arch])
        assert get_model_class(cfg).__name__ == 'GemmaForCausalLM'
