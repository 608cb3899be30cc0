"""Checkpoint files judged from their headers alone (lmdp/weight_loader/checkpoint.py), on files written here byte
by byte: what a header says a file holds, where a damaged file is caught, and which files a folder's weights are."""
import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from lmdp.errors import WeightLoadError
from lmdp.weight_loader.checkpoint import TensorInfo, read_safetensors_header, scan_checkpoint

DTYPES = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.int8: 'I8', torch.int64: 'I64',
          torch.bool: 'BOOL', torch.uint8: 'U8'}


def _raw(path, header: dict, data: bytes = b'', announce: int | None = None):
    """A safetensors-like file: 8-byte little-endian header length (`announce`, else the real one), JSON, data."""
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if announce is None else announce).to_bytes(8, 'little') + text + data)
    return str(path)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text('abcdefgh.', min_size=1, max_size=6),
                       st.tuples(st.sampled_from(sorted(DTYPES, key=str)), st.lists(st.integers(0, 4), max_size=3)),
                       max_size=4))
def test_the_header_names_every_tensor_with_its_dtype_and_shape(tmp_path_factory, spec):
    """Whatever safetensors writes (zero-sized tensors and an empty file included) reads back exactly."""
    path = tmp_path_factory.mktemp('h') / 'model.safetensors'
    save_file({name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}, str(path))
    assert read_safetensors_header(str(path)) == {name: TensorInfo(DTYPES[dtype], tuple(shape))
                                                  for name, (dtype, shape) in spec.items()}


def test_sub_byte_dtypes_take_their_bytes_rounded_up(tmp_path):
    """Three 4-bit values take 2 bytes; 1.5 or 1 is a corrupt file."""
    entry = {'dtype': 'F4', 'shape': [3], 'data_offsets': [0, 2]}
    assert read_safetensors_header(_raw(tmp_path / 'a.safetensors', {'w': entry}, b'\0\0')) == \
        {'w': TensorInfo('F4', (3,))}
    short = dict(entry, data_offsets=[0, 1])
    with pytest.raises(WeightLoadError, match='should take 2 bytes'):
        read_safetensors_header(_raw(tmp_path / 'b.safetensors', {'w': short}, b'\0'))


def test_an_unknown_dtype_is_passed_through_unchecked(tmp_path):
    entry = {'dtype': 'F128', 'shape': [2], 'data_offsets': [0, 3]}
    assert read_safetensors_header(_raw(tmp_path / 'a.safetensors', {'w': entry}, b'\0' * 3)) == \
        {'w': TensorInfo('F128', (2,))}


def test_a_header_that_fills_the_file_exactly_is_whole(tmp_path):
    """No tensor data at all: the announced header length is the file's size - 8, which is allowed; one byte more
    is not, and the error names both numbers."""
    path = _raw(tmp_path / 'a.safetensors', {'__metadata__': {'format': 'pt'}})
    assert read_safetensors_header(path) == {}
    size = os.path.getsize(path)
    for announce in (size - 7, size, size + 8):
        bad = _raw(tmp_path / 'b.safetensors', {'__metadata__': {'format': 'pt'}}, announce=announce)
        with pytest.raises(WeightLoadError) as info:
            read_safetensors_header(bad)
        assert f'{announce}-byte' in str(info.value) and f'has {size} bytes' in str(info.value), announce


@pytest.mark.parametrize('entry', [
    {'dtype': 'F32', 'shape': [2, -1], 'data_offsets': [0, 8]},          # a negative dimension
    {'dtype': 'F32', 'shape': [2.0], 'data_offsets': [0, 8]},            # not an integer
    {'dtype': 'F32', 'shape': [2], 'data_offsets': [8, 0]},              # ends before it begins
    {'dtype': 'F32', 'shape': [2], 'data_offsets': [-8, 0]},             # begins before the data
    {'dtype': 'F32', 'shape': [2]},                                      # no offsets
])
def test_a_malformed_entry_is_corrupt_and_named(tmp_path, entry):
    with pytest.raises(WeightLoadError, match="tensor 'w' is malformed"):
        read_safetensors_header(_raw(tmp_path / 'a.safetensors', {'w': entry}, b'\0' * 8))


def test_the_data_must_end_where_the_last_tensor_does(tmp_path):
    entry = {'dtype': 'I8', 'shape': [4], 'data_offsets': [0, 4]}
    with pytest.raises(WeightLoadError, match='holds 3 bytes after its tensors'):
        read_safetensors_header(_raw(tmp_path / 'a.safetensors', {'w': entry}, b'\0' * 7))
    with pytest.raises(WeightLoadError, match='describes 4 bytes of tensor data but the file holds 2'):
        read_safetensors_header(_raw(tmp_path / 'b.safetensors', {'w': entry}, b'\0' * 2))


def _folder(tmp_path, **files):
    tmp_path.mkdir(exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / name.replace('_st', '.safetensors')))
    return str(tmp_path)


def test_the_manifest_lists_each_tensor_its_file_and_what_is_ignored(tmp_path):
    folder = _folder(tmp_path, model_st={'a': torch.zeros(2), 'b': torch.zeros(1, 3, dtype=torch.float16)},
                     adapter_st={'lora': torch.zeros(1)})
    manifest = scan_checkpoint(folder)
    assert manifest.files == [os.path.join(folder, 'model.safetensors')] and manifest.headers_read is True
    assert manifest.tensors == {'a': TensorInfo('F32', (2,)), 'b': TensorInfo('F16', (1, 3))}
    assert manifest.file_of == {'a': 'model.safetensors', 'b': 'model.safetensors'}
    assert manifest.ignored == ['adapter.safetensors']


def test_a_stray_holding_the_models_tensors_is_refused_naming_both_files_and_the_count(tmp_path):
    tensors = {'a': torch.zeros(2), 'b': torch.zeros(2), 'c': torch.zeros(2)}
    folder = _folder(tmp_path / 'one', model_st=tensors, zz_st={'b': torch.ones(2), 'x': torch.ones(1)})
    with pytest.raises(WeightLoadError, match=r"zz.safetensors and model.safetensors in .* both hold 'b';") as info:
        scan_checkpoint(folder)
    assert 'more tensor' not in str(info.value)
    folder = _folder(tmp_path / 'three', model_st=tensors, zz_st=dict(tensors))
    with pytest.raises(WeightLoadError, match=r"both hold 'a' \(and 2 more tensor\(s\)\)"):
        scan_checkpoint(folder)


def test_an_unreadable_stray_is_skipped_and_the_next_one_still_checked(tmp_path):
    folder = _folder(tmp_path, model_st={'a': torch.zeros(2)}, zz_st={'a': torch.ones(2)})
    (tmp_path / 'aa.safetensors').write_bytes(b'\1\2\3')          # sorts first; not read, so not an error
    with pytest.raises(WeightLoadError, match='zz.safetensors and model.safetensors'):
        scan_checkpoint(folder)


def test_an_index_that_disagrees_with_the_shards_names_the_first_tensor_and_where_it_is(tmp_path):
    folder = _folder(tmp_path, one_st={'a': torch.zeros(2), 'b': torch.zeros(2)}, two_st={'c': torch.zeros(2)})
    index = {'a': 'one.safetensors', 'b': 'two.safetensors', 'c': 'one.safetensors'}
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': index}))
    with pytest.raises(WeightLoadError, match=r"says tensor 'b' is in two.safetensors, but it is in "
                                              r"one.safetensors \(2 such tensor"):
        scan_checkpoint(folder)
    index = {'a': 'one.safetensors', 'b': 'one.safetensors', 'c': 'two.safetensors', 'd': 'two.safetensors'}
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': index}))
    with pytest.raises(WeightLoadError, match=r"says tensor 'd' is in two.safetensors, but no weight file holds it"):
        scan_checkpoint(folder)


def test_a_legacy_pickle_bin_is_a_checkpoint(tmp_path):
    """torch.save before zip archives (and with _use_new_zipfile_serialization=False) writes a bare pickle."""
    torch.save({'w': torch.ones(2)}, tmp_path / 'pytorch_model.bin', _use_new_zipfile_serialization=False)
    manifest = scan_checkpoint(str(tmp_path))
    assert manifest.files == [str(tmp_path / 'pytorch_model.bin')] and manifest.headers_read is False


def test_stray_bins_beside_pytorch_model_bin_are_ignored_and_listed(tmp_path):
    for name in ('pytorch_model.bin', 'pytorch_model-old.bin'):
        torch.save({'w': torch.ones(2)}, tmp_path / name)
    manifest = scan_checkpoint(str(tmp_path))
    assert manifest.files == [str(tmp_path / 'pytorch_model.bin')]
    assert manifest.ignored == ['pytorch_model-old.bin']
    (tmp_path / 'pytorch_model.bin').unlink()
    assert scan_checkpoint(str(tmp_path)).files == [str(tmp_path / 'pytorch_model-old.bin')]   # the only one


def _zip_bin(path):
    torch.save({'w': torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize('case', ['four bytes', 'header not JSON', 'header a list', 'bin not a checkpoint',
                                  'bin zip cut short', 'index not JSON', 'not a folder', 'a tensor in two files'])
def test_each_refusal_names_the_file_or_tensor_at_fault(tmp_path, case):
    named = 'model.safetensors'
    if case == 'four bytes':
        (tmp_path / named).write_bytes(b'\1\2\3\4')
    elif case == 'header not JSON':
        text = b'{not json'
        (tmp_path / named).write_bytes(len(text).to_bytes(8, 'little') + text)
    elif case == 'header a list':
        text = b'[1, 2]'
        (tmp_path / named).write_bytes(len(text).to_bytes(8, 'little') + text)
    elif case == 'bin not a checkpoint':
        named = 'pytorch_model.bin'
        (tmp_path / named).write_bytes(b'hello' * 10)
    elif case == 'bin zip cut short':
        named = 'pytorch_model.bin'
        _zip_bin(tmp_path / named)
    elif case == 'index not JSON':
        named = 'model.safetensors.index.json'
        (tmp_path / named).write_text('{"weight_map": ')
    elif case == 'not a folder':
        named = 'plain-file'
        (tmp_path / named).write_text('x')
        with pytest.raises(WeightLoadError) as info:
            scan_checkpoint(str(tmp_path / named))
        assert named in str(info.value)
        return
    else:
        _folder(tmp_path, a_st={'w': torch.zeros(1)}, b_st={'w': torch.zeros(1)})
        (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(
            {'weight_map': {'w': 'a.safetensors', 'x': 'b.safetensors'}}))
        named = "'w'"
    with pytest.raises(WeightLoadError) as info:
        scan_checkpoint(str(tmp_path))
    assert named in str(info.value), str(info.value)


@pytest.mark.parametrize('weight_map', [{'w': 1}, ['model.safetensors'], {}, {'w': ['model.safetensors']}])
def test_an_index_whose_weight_map_is_not_names_to_files_is_refused(tmp_path, weight_map):
    _folder(tmp_path, model_st={'w': torch.zeros(1)})
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    with pytest.raises(WeightLoadError, match='has no "weight_map" of tensor names to file names'):
        scan_checkpoint(str(tmp_path))


def test_two_shared_tensors_count_one_more_and_an_indexed_folder_lists_its_strays(tmp_path):
    folder = _folder(tmp_path / 'two', model_st={'a': torch.zeros(1), 'b': torch.zeros(1)},
                     zz_st={'a': torch.zeros(1), 'b': torch.zeros(1)})
    with pytest.raises(WeightLoadError, match=r"both hold 'a' \(and 1 more tensor\(s\)\);"):
        scan_checkpoint(folder)
    folder = _folder(tmp_path / 'index', one_st={'a': torch.zeros(1)}, old_st={'a': torch.ones(1)})
    index = {'weight_map': {'a': 'one.safetensors'}}
    (tmp_path / 'index' / 'model.safetensors.index.json').write_text(json.dumps(index))
    assert scan_checkpoint(folder).ignored == ['old.safetensors']


def test_a_size_mismatch_states_both_byte_counts(tmp_path):
    header = {'a': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},
              'b': {'dtype': 'F32', 'shape': [4], 'data_offsets': [16, 28]}}
    with pytest.raises(WeightLoadError, match=r"tensor 'b' \(F32, shape \[4\]\) should take 16 bytes but its header "
                                              r'gives it 12;'):
        read_safetensors_header(_raw(tmp_path / 'a.safetensors', header, b'\0' * 28))
