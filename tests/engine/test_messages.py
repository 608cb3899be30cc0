"""Configs from the checkpoint, and a package import that stays light."""
import json
import subprocess
import sys
from pathlib import Path

from lmdp import GenerationConfig


def test_generation_defaults_come_from_the_checkpoint(tmp_path):
    (tmp_path / 'generation_config.json').write_text(json.dumps(
        {'do_sample': True, 'temperature': 0.6, 'top_p': 0.9, 'eos_token_id': [2, 6], 'transformers_version': 'x'}))
    g = GenerationConfig.from_pretrained(str(tmp_path), max_new_tokens=7)
    assert (g.do_sample, g.temperature, g.top_p, g.max_new_tokens) == (True, 0.6, 0.9, 7)
    assert g.top_k == GenerationConfig().top_k                   # unset there: lmdp's default
    assert GenerationConfig.from_pretrained(str(tmp_path / 'none')) == GenerationConfig()


def test_the_pipeline_stops_on_the_checkpoint_eos_ids(pipe):
    assert {2} <= pipe._eos_ids and 2 in pipe.engine.sampling_params(GenerationConfig()).stop_ids
    assert 2 not in pipe.engine.sampling_params(GenerationConfig(ignore_eos=True)).stop_ids


def test_import_lmdp_loads_neither_torch_nor_transformers():
    code = ('import sys, lmdp; assert "torch" not in sys.modules and "transformers" not in sys.modules; '
            'from lmdp import GenerationConfig, PytorchEngineConfig; assert "transformers" not in sys.modules; '
            'from lmdp import pipeline; assert callable(pipeline)')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).parents[2])
