"""Every shipped port passes parity against transformers with the port on two ranks (float32, gloo), and Llama
with 2 KV heads on four (each KV head replicated on two ranks)."""
import pytest

from lmdp.tiny import TINY_FAMILIES


def _parity(tmp_path, family, tp):
    from lmdp.tiny import make_tiny
    from parity import compare
    path = str(make_tiny(family, tmp_path / family, num_hidden_layers=2))
    return compare(path, tp=tp, prompts=2, decode_steps=2)


@pytest.mark.slow
@pytest.mark.parametrize('family', list(TINY_FAMILIES))
def test_port_passes_parity_at_tp2(tmp_path, family):
    report = _parity(tmp_path, family, 2)
    assert report.passed, report.summary()
    # the sharded taps were put back together: k (whole or replicated heads) and the attention core are compared
    compared = {t.tap for t in report.taps if t.port is not None}
    assert {'layers.0.k', 'layers.0.attn_core'} & compared, sorted(compared)


@pytest.mark.slow
def test_llama_two_kv_heads_passes_parity_at_tp4(tmp_path):
    report = _parity(tmp_path, 'llama', 4)
    assert report.passed, report.summary()
