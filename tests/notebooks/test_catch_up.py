"""catch_up: a notebook opened out of order gets the files the earlier notebooks write (their last version), and
files the reader wrote are never touched."""
import glob
import importlib.util
import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(folder):
    spec = importlib.util.spec_from_file_location('catch_up_under_test', os.path.join(folder, 'catch_up.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_catch_up_replays_the_last_version_of_each_file_and_keeps_yours(tmp_path):
    for path in glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')) + [os.path.join(REPO, 'notebooks',
                                                                                      'catch_up.py')]:
        shutil.copy(path, tmp_path)
    (tmp_path / 'my_port').mkdir()
    (tmp_path / 'my_port' / 'gemma_mlp.py').write_text('# mine\n')
    written = _load(str(tmp_path)).catch_up('05_registration')
    port = tmp_path / 'my_port'
    assert (port / 'gemma_mlp.py').read_text() == '# mine\n'
    assert 'my_port/gemma_mlp.py' not in written and 'my_port/module_map.py' not in written   # 05 writes that
    # 02 writes a plain-RMSNorm gemma_norm.py, then the fix: the fix wins
    assert 'class GemmaRMSNorm(RMSNorm)' in (port / 'gemma_norm.py').read_text()
    # 02 borrows generation.py and loading.py from the Llama port; 03 and 04 replace them
    assert 'def prepare_inputs_for_generation' in (port / 'generation.py').read_text()
    assert 'stacked_params_mapping = [' in (port / 'loading.py').read_text()
    assert (port / 'tiny-gemma' / 'config.json').is_file()
    assert _load(str(tmp_path)).catch_up('05_registration') == []     # a second call has nothing to do
