"""Which files of a checkpoint folder hold its weights, their headers checked, and streaming their tensors shard by
shard, without holding the whole model in memory.

The files are the ones transformers would read: those `model.safetensors.index.json` names, else
`model.safetensors`, else the one `*.safetensors` file there is (likewise for `pytorch_model*.bin`). Before any
tensor is read, every chosen safetensors file's header is parsed and checked against the file's size, so a
truncated or corrupt file is an error naming it, and a tensor held by two files (or by a stray file beside
`model.safetensors` that transformers would ignore) is an error naming both, never a silent override.
"""
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import WeightLoadError

INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'

# bits per element of the safetensors dtypes (a dtype missing here is passed through unchecked)
_BITS = {'BOOL': 8, 'U8': 8, 'I8': 8, 'F8_E5M2': 8, 'F8_E4M3': 8, 'F8_E8M0': 8, 'I16': 16, 'U16': 16, 'F16': 16,
         'BF16': 16, 'I32': 32, 'U32': 32, 'F32': 32, 'F64': 64, 'I64': 64, 'U64': 64, 'C64': 64, 'F4': 4,
         'F6_E2M3': 6, 'F6_E3M2': 6}
_MAX_HEADER = 100 << 20       # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int | None:
        """Bytes of the tensor's data by its header, or None for a dtype of unknown width."""
        bits = _BITS.get(self.dtype)
        if bits is None:
            return None
        count = 1
        for d in self.shape:
            count *= d
        return -(-count * bits // 8)          # sub-byte types (F4, F6) round up to whole bytes


@dataclass
class CheckpointManifest:
    """What a checkpoint's weight files hold, read from their headers only."""
    files: list[str]                                          # the files to read, full paths
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_of: dict[str, str] = field(default_factory=dict)     # tensor name -> file name
    ignored: list[str] = field(default_factory=list)          # weight files in the folder that are not read
    headers_read: bool = False                                # False for .bin checkpoints (no header to read)


def _weight_files(model_path: str) -> tuple[list[str], list[str]]:
    """(the files transformers would read, the other weight files in the folder), as names in `model_path`."""
    if not os.path.isdir(model_path):
        raise WeightLoadError(f'{model_path!r} is not a folder; pass the checkpoint folder')
    present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_path, '*.safetensors')))
    for index in (INDEX, BIN_INDEX):
        if os.path.isfile(os.path.join(model_path, index)):
            files = _files_in_index(model_path, index)
            return files, [f for f in present if f not in files]
    if 'model.safetensors' in present:
        return ['model.safetensors'], [f for f in present if f != 'model.safetensors']
    if len(present) == 1:
        return present, []
    if len(present) > 1:
        raise WeightLoadError(f'{model_path!r} holds {len(present)} safetensors files ({", ".join(present)}) but no '
                              f'{INDEX} saying which to read, and none is named model.safetensors; transformers '
                              'would not load it either. Add the index the checkpoint came with, or keep one file')
    bins = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_path, 'pytorch_model*.bin')))
    if 'pytorch_model.bin' in bins:
        return ['pytorch_model.bin'], [b for b in bins if b != 'pytorch_model.bin']
    if len(bins) == 1:
        return bins, []
    if len(bins) > 1:
        raise WeightLoadError(f'{model_path!r} holds {len(bins)} .bin weight files ({", ".join(bins)}) but no '
                              f'{BIN_INDEX} saying which to read; add the index the checkpoint came with')
    raise WeightLoadError(f'{model_path!r} holds no weights (*.safetensors, {INDEX} or pytorch_model*.bin)')


def _files_in_index(model_path: str, index: str) -> list[str]:
    path = os.path.join(model_path, index)
    try:
        with open(path, encoding='utf-8') as f:
            weight_map = json.load(f).get('weight_map')
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise WeightLoadError(f'{index} in {model_path!r} is not a JSON object with a "weight_map" ({e}); the '
                              'download may be broken: fetch the file again') from e
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise WeightLoadError(f'{index} in {model_path!r} has no "weight_map" of tensor names to file names; the '
                              'download may be broken: fetch the file again')
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not os.path.isfile(os.path.join(model_path, f))]
    if absent:
        raise WeightLoadError(f'{index} in {model_path!r} names shard(s) that are not there: {", ".join(absent)}; '
                              'the download is incomplete')
    return files


def _index_map(model_path: str) -> dict[str, str] | None:
    path = os.path.join(model_path, INDEX)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)['weight_map']


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds (name -> dtype, shape), read from its header; WeightLoadError naming the
    file and what is wrong when the header is unreadable or does not match the file's size."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightLoadError(f'{name} is {size} bytes long, too short to be a safetensors file (an empty or '
                                  f'interrupted download?): {path}')
        n = int.from_bytes(head, 'little')
        if n > min(size - 8, _MAX_HEADER):
            raise WeightLoadError(f'{name} is not a readable safetensors file: its first 8 bytes announce a '
                                  f'{n}-byte header but the file has {size} bytes (corrupt, truncated or not '
                                  f'safetensors): {path}')
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f'{name} is not a readable safetensors file: its header is not valid JSON ({e}); '
                              f'the file is corrupt: {path}') from None
    if not isinstance(header, dict):
        raise WeightLoadError(f'{name} is not a readable safetensors file: its header is not a JSON object: {path}')
    tensors, end = {}, 0
    for tensor, entry in header.items():
        if tensor == '__metadata__':
            continue
        try:
            dtype, shape, (begin, stop) = entry['dtype'], tuple(entry['shape']), entry['data_offsets']
            assert all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= stop
        except (TypeError, KeyError, ValueError, AssertionError):
            raise WeightLoadError(f'{name}: the header entry of tensor {tensor!r} is malformed ({entry!r:.100}); '
                                  f'the file is corrupt: {path}') from None
        info = TensorInfo(dtype, shape)
        if info.nbytes is not None and stop - begin != info.nbytes:
            raise WeightLoadError(f'{name}: tensor {tensor!r} ({dtype}, shape {list(shape)}) should take '
                                  f'{info.nbytes} bytes but its header gives it {stop - begin}; the '
                                  f'file is corrupt: {path}')
        tensors[tensor] = info
        end = max(end, stop)
    data = size - 8 - n
    if end > data:
        raise WeightLoadError(f'{name} is truncated: its header describes {end} bytes of tensor data but the file '
                              f'holds {data} (an interrupted download or copy?); fetch it again: {path}')
    if end < data:
        raise WeightLoadError(f'{name} is corrupt: it holds {data - end} bytes after its tensors that its header '
                              f'does not describe (the safetensors library refuses such a file): {path}')
    return tensors


def _check_bin(path: str):
    """A PyTorch .bin file is a zip archive (torch.save since 1.6) or a bare pickle; a zip must be whole."""
    import zipfile
    name = os.path.basename(path)
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic.startswith(b'PK'):
        if not zipfile.is_zipfile(path):
            raise WeightLoadError(f'{name} is truncated or corrupt: it starts as a zip archive (torch.save) but its '
                                  f'directory is missing; fetch it again: {path}')
    elif not magic.startswith(b'\x80'):
        raise WeightLoadError(f'{name} is not a PyTorch checkpoint (neither a zip archive nor a pickle): {path}')


def scan_checkpoint(model_path: str) -> CheckpointManifest:
    """The weight files to read and every tensor they hold, from the headers alone; WeightLoadError for a folder
    with no weights, a corrupt or truncated file, or a tensor that two files hold."""
    files, others = _weight_files(model_path)
    manifest = CheckpointManifest([os.path.join(model_path, f) for f in files], ignored=list(others))
    if not all(f.endswith('.safetensors') for f in files):
        for f in files:
            _check_bin(os.path.join(model_path, f))
        return manifest
    for f in files:
        for tensor, info in read_safetensors_header(os.path.join(model_path, f)).items():
            if tensor in manifest.file_of:
                raise WeightLoadError(f'tensor {tensor!r} is in two weight files, {manifest.file_of[tensor]} and '
                                      f'{f}, in {model_path!r}; one would silently override the other. Remove the '
                                      'stray file or fix the index')
            manifest.tensors[tensor] = info
            manifest.file_of[tensor] = f
    manifest.headers_read = True
    index = _index_map(model_path)
    if index is not None:
        wrong = [t for t, f in index.items() if manifest.file_of.get(t) != f]
        if wrong:
            t = wrong[0]
            where = manifest.file_of.get(t)
            raise WeightLoadError(f'{INDEX} in {model_path!r} says tensor {t!r} is in {index[t]}, but '
                                  + (f'it is in {where}' if where else 'no weight file holds it')
                                  + f' ({len(wrong)} such tensor(s)); the index and the shards do not match: '
                                  'fetch the checkpoint again')
    else:
        _refuse_shadowing_strays(model_path, manifest)
    return manifest


def _refuse_shadowing_strays(model_path: str, manifest: CheckpointManifest):
    """Without an index transformers reads model.safetensors alone; a stray file that holds some of the same
    tensors means the folder is ambiguous (which did the user mean?), so it is refused, naming both files."""
    chosen = os.path.basename(manifest.files[0])
    for stray in manifest.ignored:
        try:
            names = read_safetensors_header(os.path.join(model_path, stray))
        except WeightLoadError:
            continue                    # unreadable, and not read anyway
        shared = sorted(set(names) & set(manifest.file_of))
        if shared:
            raise WeightLoadError(f'{stray} and {chosen} in {model_path!r} both hold {shared[0]!r}'
                                  + (f' (and {len(shared) - 1} more tensor(s))' if len(shared) > 1 else '')
                                  + f'; with no {INDEX}, transformers reads {chosen} alone and ignores {stray}. '
                                  f'Remove {stray}, or write an index naming the file each tensor comes from')


def checkpoint_files(model_path: str) -> list[str]:
    """The weight files of a checkpoint folder (full paths), as transformers would pick them, headers checked."""
    return scan_checkpoint(model_path).files


def iter_checkpoint(model_path: str, files: list[str] | None = None,
                    device: str = 'cpu') -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, one shard at a time (`files`: already-checked files to read)."""
    for path in files if files is not None else checkpoint_files(model_path):
        if path.endswith('.bin'):
            try:
                state = torch.load(path, map_location=device, weights_only=True)
            except Exception as e:
                raise WeightLoadError(f'could not read {os.path.basename(path)} ({type(e).__name__}: {e}); the file '
                                      f'may be truncated or not a PyTorch checkpoint: {path}') from e
            yield from state.items()
            del state
            continue
        from safetensors import safe_open
        try:
            with safe_open(path, framework='pt', device=str(device)) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor      # the consumer's own errors do not come back through this yield
        except Exception as e:
            raise WeightLoadError(f'could not read {os.path.basename(path)} ({type(e).__name__}: {e}); the file may '
                                  f'be truncated or not safetensors: {path}') from e
