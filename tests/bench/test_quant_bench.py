"""`lmdp bench --quant`: the quantised copies of a bench checkpoint and the bytes their decode step reads."""
import glob
import json
import os

import pytest
from safetensors.torch import load_file

from lmdp.bench.__main__ import main
from lmdp.bench.checkpoint import ensure_checkpoint, ensure_quantized, quantized_dir, step_bytes
from lmdp.bench.shapes import SHAPES


@pytest.fixture(scope='module')
def bench_tiny(tmp_path_factory):
    return ensure_checkpoint(SHAPES['tiny'], str(tmp_path_factory.mktemp('bench')))


def _loaded_step_bytes(path):
    """The same count from the tensors themselves (not their headers)."""
    total = 0
    for file in glob.glob(os.path.join(path, '*.safetensors')):
        for name, t in load_file(file).items():
            total += t.nbytes // t.shape[0] if 'embed_tokens' in name else t.nbytes
    return total


def test_bf16_step_bytes_are_the_shapes_decode_bytes_plus_one_embedding_row(bench_tiny):
    shape = SHAPES['tiny']
    assert step_bytes(bench_tiny) == shape.decode_weight_bytes() + 2 * shape.hidden
    assert step_bytes(bench_tiny) == _loaded_step_bytes(bench_tiny)


@pytest.mark.parametrize('quant, dtypes', [('fp8', {'F8_E4M3'}), ('awq', {'I32'})])
def test_quantised_copies_are_written_once_and_counted_from_their_tensors(bench_tiny, quant, dtypes):
    path = ensure_quantized(bench_tiny, quant)
    assert path == quantized_dir(bench_tiny, quant) and path.endswith(f'_tiny-{quant}')
    config = json.load(open(os.path.join(path, 'config.json')))
    assert config['quantization_config']['quant_method'] == {'fp8': 'fp8', 'awq': 'awq'}[quant]
    assert step_bytes(path) == _loaded_step_bytes(path)
    assert step_bytes(path) < 0.8 * step_bytes(bench_tiny)
    stamp = os.path.getmtime(os.path.join(path, 'config.json'))
    assert ensure_quantized(bench_tiny, quant) == path
    assert os.path.getmtime(os.path.join(path, 'config.json')) == stamp      # not written again


def test_an_unknown_format_is_refused_by_name(bench_tiny):
    with pytest.raises(ValueError, match="quant must be one of \\['awq', 'fp8'\\], got 'int4'"):
        ensure_quantized(bench_tiny, 'int4')


def test_the_cli_refuses_an_unknown_format_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(['tiny', '--quant', 'int4'])
    assert "--quant: invalid choice: 'int4'" in capsys.readouterr().err
