"""Broken checkpoints: each is refused before any weight is read, with an error that names the file and what is
wrong, and `lmdp check` reports the same problem in the same words."""
import json
import pathlib

import pytest
import torch

from lmdp.check_env import check_model
from lmdp.errors import WeightLoadError


def _header(path: pathlib.Path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], 'little')
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, 'little') + raw + body


def _resized(path):
    """model.safetensors with one tensor's shape changed in its header (its byte range left as it was)."""
    header, body = _header(path)
    header['model.norm.weight']['shape'] = [65]
    return _with_header(header, body)


def _junk_header(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], 'little')
    return data[:8] + b'{not json' + data[17:8 + n] + data[8 + n:]


def _single(ckpt):
    return (ckpt / 'model.safetensors').read_bytes()


# (files to write over the tiny checkpoint, from its model.safetensors path; words the error must hold)
SINGLE_FILE = {
    'truncated to half': (lambda p: {'model.safetensors': p.read_bytes()[:p.stat().st_size // 2]},
                          ['model.safetensors is truncated', 'fetch it again']),
    'cut inside its header': (lambda p: {'model.safetensors': p.read_bytes()[:40]},
                              ['model.safetensors is not a readable safetensors file', 'header']),
    'four bytes long': (lambda p: {'model.safetensors': b'\x01\x02\x03\x04'},
                        ['model.safetensors is 4 bytes long', 'too short']),
    'empty': (lambda p: {'model.safetensors': b''}, ['model.safetensors is 0 bytes long']),
    'text, not safetensors': (lambda p: {'model.safetensors': b'version https://git-lfs.github.com/spec/v1\n' * 3},
                              ['model.safetensors is not a readable safetensors file']),
    'header that is not JSON': (lambda p: {'model.safetensors': _junk_header(p)},
                                ['model.safetensors', 'header is not valid JSON']),
    "a tensor's shape disagreeing with its bytes": (lambda p: {'model.safetensors': _resized(p)},
                                                    ["'model.norm.weight'", 'should take 260 bytes',
                                                     'gives it 256']),
    'bytes after the tensors': (lambda p: {'model.safetensors': p.read_bytes() + b'\x00' * 16},
                                ['model.safetensors is corrupt', '16 bytes after its tensors']),
    'two files, neither model.safetensors, no index': (
        lambda p: {'model.safetensors': None, 'a.safetensors': p.read_bytes(), 'b.safetensors': p.read_bytes()},
        ['holds 2 safetensors files', 'a.safetensors, b.safetensors', 'model.safetensors.index.json']),
    'no weights at all': (lambda p: {'model.safetensors': None}, ['holds no weights']),
    'a .bin that is no checkpoint': (lambda p: {'model.safetensors': None, 'pytorch_model.bin': b'hello' * 10},
                                     ['pytorch_model.bin is not a PyTorch checkpoint']),
}


def _refused_before_loading(make_pipe, path, monkeypatch):
    """The pipeline's error, asserting no model was built and no tensor read before it came."""
    import lmdp.engine.engine as engine_module
    built = []
    monkeypatch.setattr(engine_module.ModelAgent, 'from_pretrained',
                        classmethod(lambda cls, *a, **k: built.append(a) or pytest.fail('the model was built')))
    with pytest.raises(WeightLoadError) as info:
        make_pipe(path)
    assert not built
    return str(info.value)


@pytest.mark.parametrize('case', list(SINGLE_FILE))
def test_a_broken_weight_file_is_named_before_loading(case, tiny, ckpt_copy, make_pipe, monkeypatch):
    files, words = SINGLE_FILE[case]
    path = ckpt_copy(tiny, files=files(pathlib.Path(tiny) / 'model.safetensors'))
    message = _refused_before_loading(make_pipe, path, monkeypatch)
    for word in words:
        assert word in message, f'{case}: {word!r} not in {message!r}'
    assert message in check_model(path).problems, 'lmdp check must report what loading raises, in its words'


def test_a_truncated_bin_is_named(tiny, ckpt_copy, make_pipe, monkeypatch):
    state = {'x': torch.zeros(1000)}
    good = pathlib.Path(ckpt_copy(tiny)) / 'state.bin'
    torch.save(state, good)
    path = ckpt_copy(tiny, files={'model.safetensors': None, 'pytorch_model.bin': good.read_bytes()[:3000]})
    message = _refused_before_loading(make_pipe, path, monkeypatch)
    assert 'pytorch_model.bin is truncated or corrupt' in message
    assert message in check_model(path).problems


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
    from lmdp.tiny import make_tiny
    path = make_tiny('llama', tmp_path_factory.mktemp('sharded'), num_hidden_layers=2, max_shard_size='150KB')
    index = json.loads((path / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) >= 3
    return str(path)


def _index_edit(edit):
    def files(ckpt: pathlib.Path):
        index = json.loads((ckpt / 'model.safetensors.index.json').read_text())
        edit(index, ckpt)
        return {'model.safetensors.index.json': json.dumps(index)}
    return files


def _shards(index):
    return sorted(set(index['weight_map'].values()))


def _duplicate_into_last(index, ckpt):
    from safetensors.torch import load_file, save_file
    shards = _shards(index)
    first, last = load_file(ckpt / shards[0]), load_file(ckpt / shards[-1])
    name = sorted(first)[0]
    save_file(dict(last, **{name: first[name]}), ckpt / shards[-1])


def _move_entry(index, ckpt):
    shards = _shards(index)
    name = sorted(t for t, f in index['weight_map'].items() if f == shards[0])[0]
    index['weight_map'][name] = shards[1]


SHARDED = {
    'an index naming a shard that is not there': (
        _index_edit(lambda index, ckpt: index['weight_map'].update({'extra.weight': 'model-09-of-09.safetensors'})),
        WeightLoadError, ['names shard(s) that are not there', 'model-09-of-09.safetensors']),
    'an index that is not JSON': (lambda ckpt: {'model.safetensors.index.json': '{"weight_map": '},
                                  WeightLoadError, ['model.safetensors.index.json', 'not a JSON object']),
    'an index without a weight_map': (lambda ckpt: {'model.safetensors.index.json': '{"metadata": {}}'},
                                      WeightLoadError, ['has no "weight_map"']),
    'an index placing a tensor in the wrong shard': (_index_edit(_move_entry), WeightLoadError,
                                                     ['the index and the shards do not match', 'but it is in']),
    'a tensor in two shards': (_index_edit(_duplicate_into_last), WeightLoadError, ['is in two weight files']),
    'a truncated shard': (lambda ckpt: {name: (ckpt / name).read_bytes()[:-100] for name in
                                        [sorted(p.name for p in ckpt.glob('*.safetensors'))[1]]},
                          WeightLoadError, ['is truncated', '-of-']),
}


@pytest.mark.parametrize('case', list(SHARDED))
def test_a_broken_sharded_checkpoint_is_named_before_loading(case, sharded, tmp_path, ckpt_copy, make_pipe,
                                                            monkeypatch):
    import shutil
    edit, error_type, words = SHARDED[case]
    scratch = tmp_path / 'scratch'
    shutil.copytree(sharded, scratch)
    path = ckpt_copy(str(scratch), files=edit(scratch))
    message = _refused_before_loading(make_pipe, path, monkeypatch)
    for word in words:
        assert word in message, f'{case}: {word!r} not in {message!r}'
    assert message in check_model(path).problems


def test_files_the_index_does_not_name_are_not_read(sharded, ckpt_copy, make_pipe, nothing_lost):
    """As transformers: a leftover consolidated file beside an index is ignored (check notes it), even when it
    holds zeroed copies of the model's tensors."""
    from safetensors.torch import save_file
    path = ckpt_copy(sharded)
    save_file({'model.norm.weight': torch.zeros(64)}, f'{path}/consolidated.safetensors')
    report = check_model(path)
    assert report.ok and any('consolidated.safetensors' in n for n in report.notes)
    out = make_pipe(path)([1, 2, 3], _gen())
    assert out.token_ids == make_pipe(sharded)([1, 2, 3], _gen()).token_ids


def test_a_stray_file_that_shares_no_tensor_is_ignored(tiny, ckpt_copy, make_pipe):
    from safetensors.torch import save_file
    path = ckpt_copy(tiny)
    save_file({'unrelated.weight': torch.ones(3)}, f'{path}/adapter.safetensors')
    assert make_pipe(path)([1, 2, 3], _gen()).token_ids == make_pipe(tiny)([1, 2, 3], _gen()).token_ids
    assert any('adapter.safetensors' in n for n in check_model(path).notes)


def test_a_missing_tensor_names_the_parameter(tiny, ckpt_copy, make_pipe):
    from safetensors.torch import load_file, save_file
    path = ckpt_copy(tiny)
    tensors = load_file(f'{path}/model.safetensors')
    del tensors['model.layers.1.mlp.up_proj.weight']
    save_file(tensors, f'{path}/model.safetensors')
    with pytest.raises(WeightLoadError, match=r"model.layers.1.mlp.gate_up_proj.weight \[shard 1\].*"
                                              r"'model.layers.1.mlp.up_proj.weight'"):
        make_pipe(path)


def _gen():
    from lmdp import GenerationConfig
    return GenerationConfig(max_new_tokens=4, ignore_eos=True)
