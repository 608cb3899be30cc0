"""The weight loader's parts on small hand-made models and files: which files a checkpoint is, reading them,
loaders, sharding for tensor parallelism, and the account of what was loaded and what was not."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lmdp.errors import WeightLoadError
from lmdp.weight_loader import checkpoint_files, iter_checkpoint, load_model_weights, load_weight
from lmdp.weight_loader.loaders import check_shape, default_weight_loader, set_weight_loader, split_for_rank
from lmdp.weight_loader.model_weight_loader import expected_checkpoint_name
from lmdp.weight_loader.tracker import LoadTracker, describe_param, record_load, tracking


class Stacked(torch.nn.Module):
    """A model with a plain parameter and two stacked from two checkpoint tensors each (as q/k/v -> qkv_proj)."""
    packed_modules_mapping = {'ab_proj': ['a_proj', 'b_proj'], 'cd_proj': ['c_proj', 'd_proj']}
    STACKS = {'a_proj': ('ab_proj', 'a'), 'b_proj': ('ab_proj', 'b'), 'c_proj': ('cd_proj', 'c'),
              'd_proj': ('cd_proj', 'd')}

    def __init__(self, reports=True):
        super().__init__()
        self.reports = reports        # False: the stacked loader is a user's that does not call record_load
        self.norm = torch.nn.Parameter(torch.zeros(3))
        self.ab_proj = torch.nn.Linear(2, 4, bias=False)
        self.cd_proj = torch.nn.Linear(2, 4, bias=False)
        set_weight_loader(self.ab_proj.weight, self._load_stacked, shards=('a', 'b'))
        set_weight_loader(self.cd_proj.weight, self._load_stacked, shards=('c', 'd'))

    def _load_stacked(self, param, loaded, shard_id):
        rows = slice(0, 2) if shard_id in 'ac' else slice(2, 4)
        check_shape(param, (2, 2), loaded, shard_id)
        with torch.no_grad():
            param[rows] = loaded
        if self.reports:
            record_load(param, shard_id)

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            stacked = self.STACKS.get(name.split('.')[0])
            if stacked:
                load_weight(params[f'{stacked[0]}.weight'], tensor, shard_id=stacked[1])
            elif name in params:
                load_weight(params[name], tensor)


def _tensors():
    return {'norm': torch.arange(3.0), 'a_proj.weight': torch.ones(2, 2), 'b_proj.weight': 2 * torch.ones(2, 2),
            'c_proj.weight': 3 * torch.ones(2, 2), 'd_proj.weight': 4 * torch.ones(2, 2)}


# -- which files, and reading them ----------------------------------------------------------------------------

def test_shards_without_an_index_are_refused_by_name(tmp_path):
    """Several safetensors files and no index: transformers would not load it, so neither do we (which one is the
    model is a guess); the error names the files and what to add."""
    save_file({'x': torch.zeros(2)}, str(tmp_path / 'model-00002-of-00002.safetensors'))
    save_file({'y': torch.ones(3)}, str(tmp_path / 'model-00001-of-00002.safetensors'))
    with pytest.raises(WeightLoadError, match=r'2 safetensors files \(model-00001-of-00002.safetensors, '
                       r'model-00002-of-00002.safetensors\) but no model.safetensors.index.json'):
        checkpoint_files(str(tmp_path))


def test_a_lone_safetensors_file_of_any_name_is_the_model(tmp_path):
    save_file({'y': torch.ones(3)}, str(tmp_path / 'weights.safetensors'))
    assert [f.rsplit('/', 1)[1] for f in checkpoint_files(str(tmp_path))] == ['weights.safetensors']
    got = dict(iter_checkpoint(str(tmp_path)))
    assert set(got) == {'y'} and torch.equal(got['y'], torch.ones(3))


def test_an_index_names_the_shards(tmp_path):
    import json
    save_file({'x': torch.zeros(2), 'z': torch.ones(1)}, str(tmp_path / 'b.safetensors'))
    save_file({'y': torch.ones(3)}, str(tmp_path / 'a.safetensors'))
    save_file({'stray': torch.ones(3)}, str(tmp_path / 'c.safetensors'))        # not in the index: not read
    index = {'weight_map': {'x': 'b.safetensors', 'y': 'a.safetensors', 'z': 'b.safetensors'}}
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
    assert [f.rsplit('/', 1)[1] for f in checkpoint_files(str(tmp_path))] == ['a.safetensors', 'b.safetensors']
    assert sorted(dict(iter_checkpoint(str(tmp_path)))) == ['x', 'y', 'z']


def test_pytorch_bin_shards_are_read_through_their_index(tmp_path):
    import json
    torch.save({'w': torch.full((2,), 5.0)}, tmp_path / 'pytorch_model-00001-of-00002.bin')
    torch.save({'v': torch.full((1,), 7.0)}, tmp_path / 'pytorch_model-00002-of-00002.bin')
    with pytest.raises(WeightLoadError, match=r'2 .bin weight files .* but no pytorch_model.bin.index.json'):
        checkpoint_files(str(tmp_path))
    index = {'weight_map': {'w': 'pytorch_model-00001-of-00002.bin', 'v': 'pytorch_model-00002-of-00002.bin'}}
    (tmp_path / 'pytorch_model.bin.index.json').write_text(json.dumps(index))
    assert [f.rsplit('/', 1)[1] for f in checkpoint_files(str(tmp_path))] == [
        'pytorch_model-00001-of-00002.bin', 'pytorch_model-00002-of-00002.bin']
    got = list(iter_checkpoint(str(tmp_path)))
    assert [n for n, _ in got] == ['w', 'v'] and got[0][1].tolist() == [5.0, 5.0]


class _Payload:
    def __reduce__(self):
        return (print, ('a pickle ran code',))


def test_a_bin_file_can_carry_tensors_only(tmp_path):
    """Loading a .bin must not run what its pickle says (torch.load's weights_only)."""
    torch.save({'w': torch.zeros(1), 'payload': _Payload()}, tmp_path / 'pytorch_model.bin')
    with pytest.raises(Exception, match='[Ww]eights only load failed|weights_only'):
        list(iter_checkpoint(str(tmp_path)))


def test_an_index_is_read_as_utf8_whatever_the_locale(tmp_path):
    """JSON is UTF-8; under an ASCII locale (LC_ALL=C, no UTF-8 mode) a non-ASCII tensor name must still read."""
    import json
    index = {'weight_map': {'embed.wèight': 'model.safetensors'}}
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index, ensure_ascii=False), encoding='utf-8')
    save_file({'embed.wèight': torch.ones(1)}, str(tmp_path / 'model.safetensors'))
    assert len(checkpoint_files(str(tmp_path))) == 1       # here, then in a process with an ASCII locale
    env = dict(os.environ, LC_ALL='C', PYTHONCOERCECLOCALE='0', PYTHONUTF8='0', PYTHONPATH=os.pathsep.join(sys.path))
    code = 'import sys; from lmdp.weight_loader import checkpoint_files; print(len(checkpoint_files(sys.argv[1])))'
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, '1'), out.stderr[-2000:]


def test_an_index_naming_missing_shards_names_them_all(tmp_path):
    import json
    index = {'weight_map': {'x': 'b.safetensors', 'y': 'a.safetensors', 'z': 'c.safetensors'}}
    (tmp_path / 'model.safetensors.index.json').write_text(json.dumps(index))
    save_file({'z': torch.ones(1)}, str(tmp_path / 'c.safetensors'))
    with pytest.raises(WeightLoadError, match='not there: a.safetensors, b.safetensors; the download is incomplete'):
        checkpoint_files(str(tmp_path))


def test_an_index_without_a_weight_map_is_a_weight_load_error(tmp_path):
    (tmp_path / 'model.safetensors.index.json').write_text('{"metadata": {}}')
    with pytest.raises(WeightLoadError, match='has no "weight_map" of tensor names to file names'):
        load_model_weights(Stacked(), str(tmp_path))


def test_bin_shards_load_onto_the_asked_device(tmp_path):
    torch.save({'w': torch.ones(2)}, tmp_path / 'pytorch_model.bin')
    assert [t.device.type for _, t in iter_checkpoint(str(tmp_path), device='meta')] == ['meta']


@pytest.mark.gpu
def test_safetensors_shards_load_onto_the_asked_device(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    save_file({'x': torch.ones(2)}, str(tmp_path / 'model.safetensors'))
    assert [t.device.type for _, t in iter_checkpoint(str(tmp_path), device='cuda')] == ['cuda']


def test_a_folder_without_weights_is_an_error_naming_it(tmp_path):
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(WeightLoadError, match=f"'{tmp_path}' holds no weights"):
        checkpoint_files(str(tmp_path))


def test_an_unreadable_shard_is_an_error_naming_it(tmp_path):
    with pytest.raises(WeightLoadError, match=f"could not read gone.safetensors .*truncated.*: {tmp_path}/gone"):
        list(iter_checkpoint(str(tmp_path), files=[str(tmp_path / 'gone.safetensors')]))


def test_a_truncated_safetensors_file_is_an_error_naming_it(tmp_path):
    save_file({'x': torch.zeros(64)}, str(tmp_path / 'model.safetensors'))
    data = (tmp_path / 'model.safetensors').read_bytes()
    (tmp_path / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightLoadError, match='model.safetensors is truncated: its header describes 256 bytes'):
        list(iter_checkpoint(str(tmp_path)))


# -- loaders ---------------------------------------------------------------------------------------------------

def test_the_default_loader_copies_casts_and_checks_the_shape():
    param = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float16))
    default_weight_loader(param, torch.full((2, 3), 1.5, dtype=torch.float64))
    assert param.dtype == torch.float16 and param.tolist() == [[1.5] * 3] * 2
    with pytest.raises(WeightLoadError, match=r'a parameter of shape \(2, 3\) expects shape \(2, 3\), but the '
                                              r'checkpoint tensor has shape \(3, 2\)'):
        default_weight_loader(param, torch.zeros(3, 2))
    with pytest.raises(WeightLoadError, match=r"\(shard 'q'\) expects shape \(1,\)"):
        check_shape(param, (1,), torch.zeros(2), shard_id='q')


def test_split_for_rank_gives_each_rank_its_slice():
    w = torch.arange(24).view(4, 6)
    assert split_for_rank(w, 0, 1, 0, 'x') is w
    assert split_for_rank(w, 0, 2, 1, 'x').tolist() == w[2:].tolist()
    assert split_for_rank(w, 1, 3, 0, 'x').tolist() == w[:, :2].tolist()
    assert split_for_rank(w, 1, 3, 2, 'x').tolist() == w[:, 4:].tolist()
    with pytest.raises(WeightLoadError, match='rowwise: dimension 1 of size 6 does not split evenly over 4'):
        split_for_rank(w, 1, 4, 0, 'rowwise')


def test_the_default_loader_reports_its_load():
    model = Stacked()
    with tracking(model) as tracker:
        default_weight_loader(model.norm, torch.ones(3))
    assert dict(tracker.loaded) == {'norm': {None}}


def test_set_weight_loader_attaches_the_loader_and_the_shards():
    p = torch.nn.Parameter(torch.zeros(1))
    assert set_weight_loader(p, print) is p and p.weight_loader is print and not hasattr(p, 'lmdp_shards')
    set_weight_loader(p, print, shards=['q', 'k'])
    assert p.lmdp_shards == ('q', 'k')


# -- the account of a load -------------------------------------------------------------------------------------

def test_a_full_load_fills_every_parameter_and_shard():
    model = Stacked()
    tracker = load_model_weights(model, weights=iter(_tensors().items()))
    assert model.norm.tolist() == [0.0, 1.0, 2.0]
    assert model.ab_proj.weight.tolist() == [[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 2
    assert model.cd_proj.weight.tolist() == [[3.0, 3.0]] * 2 + [[4.0, 4.0]] * 2
    assert tracker.missing() == [] and tracker.unused == [] and tracker.seen == list(_tensors())


def test_a_missing_shard_is_named_with_the_checkpoint_tensor_it_expects():
    tensors = _tensors()
    del tensors['b_proj.weight'], tensors['norm']
    with pytest.raises(WeightLoadError) as err:
        load_model_weights(Stacked(), 'ckpt_dir', weights=iter(tensors.items()))
    assert str(err.value).splitlines() == [
        '2 parameter(s) were never loaded from the checkpoint ckpt_dir:', '  norm',
        "  ab_proj.weight [shard 'b'] (checkpoint tensor 'b_proj.weight')",
        'The checkpoint lacks these tensors, or load_weights maps their names wrongly.']
    tracker = load_model_weights(Stacked(), weights=iter(tensors.items()), strict=False)
    assert tracker.missing() == ['norm', "ab_proj.weight [shard 'b']"]


def test_a_stacked_loader_that_does_not_report_itself_still_counts_each_shard():
    tracker = load_model_weights(Stacked(reports=False), weights=iter(_tensors().items()))
    assert tracker.missing() == []
    assert dict(tracker.loaded) == {'norm': {None}, 'ab_proj.weight': {'a', 'b'}, 'cd_proj.weight': {'c', 'd'}}


def test_expected_checkpoint_name_follows_the_packed_mapping():
    model = Stacked()
    assert expected_checkpoint_name(model, "ab_proj.weight [shard 'a']") == 'a_proj.weight'
    assert expected_checkpoint_name(model, "ab_proj.weight [shard 'b']") == 'b_proj.weight'
    assert expected_checkpoint_name(model, 'norm') is None                       # not a shard
    assert expected_checkpoint_name(model, "ab_proj.weight [shard 'c']") is None  # no such shard
    assert expected_checkpoint_name(model, "norm [shard 'a']") is None          # not a packed module
    assert expected_checkpoint_name(model, "cd_proj.weight [shard 'd']") == 'd_proj.weight'   # the second stack
    assert expected_checkpoint_name(model, "ab_proj.bias [shard 'a']") is None  # no such parameter
    assert expected_checkpoint_name(torch.nn.Linear(2, 2), "weight [shard 'a']") is None  # no packed mapping


def test_unused_tensors_are_warned_about_unless_ignored(caplog):
    model = Stacked()
    model.ignored_checkpoint_keys = [r'inv_freq$']
    tensors = dict(_tensors(), **{'extra.weight': torch.zeros(1), 'rotary.inv_freq': torch.zeros(1)})
    with caplog.at_level(logging.WARNING, logger='lmdp'):
        tracker = load_model_weights(model, weights=iter(tensors.items()))
    assert tracker.unused == ['extra.weight']
    assert '1 checkpoint tensor(s) matched no parameter and were ignored: extra.weight' in caplog.text


def test_a_checkpoint_with_no_tensors_is_an_error():
    with pytest.raises(WeightLoadError, match='the checkpoint ckpt yielded no tensors'):
        load_model_weights(Stacked(), 'ckpt', weights=iter([]))


def test_a_loader_that_does_not_report_itself_still_counts():
    model = Stacked()
    set_weight_loader(model.norm, lambda p, w: p.data.copy_(w))        # a user's loader: no record_load
    tracker = load_model_weights(model, weights=iter(_tensors().items()))
    assert tracker.missing() == [] and model.norm.tolist() == [0.0, 1.0, 2.0]


def test_describe_param_names_the_parameter_and_the_tensor_being_loaded():
    model = Stacked()
    assert describe_param(model.norm) == 'a parameter of shape (3,)'       # no load in progress
    with tracking(model) as tracker:
        assert describe_param(model.norm) == "parameter 'norm'"
        for name, _ in tracker.watch(iter([('norm', None)])):
            assert describe_param(model.norm) == "parameter 'norm' (checkpoint tensor 'norm')"
        assert describe_param(torch.zeros(2)) == 'a parameter of shape (2,)'
    assert describe_param(model.norm) == 'a parameter of shape (3,)'


def test_trackers_nest_and_record_only_while_active():
    outer_model, inner_model = Stacked(), Stacked()
    record_load(outer_model.norm)                       # no tracker: nothing happens
    with tracking(outer_model) as outer:
        with tracking(inner_model) as inner:
            record_load(inner_model.norm)
        record_load(outer_model.norm)
    assert dict(inner.loaded) == {'norm': {None}} and dict(outer.loaded) == {'norm': {None}}
    with pytest.raises(RuntimeError):
        with tracking(outer_model):
            raise RuntimeError('a failed load')
    record_load(outer_model.ab_proj.weight, 'a')        # the failed load's tracker is gone too
    assert 'ab_proj.weight' not in outer.loaded


def test_a_tensor_counts_as_used_when_any_load_happened_while_it_was_current():
    model = Stacked()
    tracker = LoadTracker(model, [r'^skip\.'])
    for name, _ in tracker.watch(iter([('a', 0), ('b', 0), ('skip.me', 0), ('c', 0)])):
        if name in ('b',):
            tracker.record(model.norm)
            tracker.record(torch.zeros(1))           # not a parameter of the model: counted for b, no name
    assert tracker.seen == ['a', 'b', 'skip.me', 'c'] and tracker.unused == ['a', 'c']
    assert dict(tracker.loaded) == {'norm': {None}}
    assert tracker.missing() == [f"{p}.weight [shard '{s}']" for p, s in (('ab_proj', 'a'), ('ab_proj', 'b'),
                                                                          ('cd_proj', 'c'), ('cd_proj', 'd'))]


def test_a_loader_error_names_the_parameter_shard_shape_loader_and_cause():
    model = torch.nn.Linear(4, 3, bias=False)

    def picky(param, loaded, shard_id=None):
        raise ValueError(f'rows do not fit ({shard_id})')

    set_weight_loader(model.weight, picky)
    with tracking(model):
        with pytest.raises(WeightLoadError) as info:
            load_weight(model.weight, torch.zeros(5, 4), shard_id='k')
        text = str(info.value)
        assert text.startswith("loading parameter 'weight' (shard 'k') from a tensor of shape (5, 4) failed in ")
        assert text.endswith('picky: ValueError: rows do not fit (k)')
        with pytest.raises(WeightLoadError) as info:
            load_weight(model.weight, torch.zeros(5, 4))
        assert str(info.value).startswith("loading parameter 'weight' from a tensor of shape (5, 4) failed in ")


def test_a_silent_loader_counts_each_expert_shard_and_leaves_all_experts_tensors_to_itself():
    model = torch.nn.Linear(4, 3, bias=False)
    set_weight_loader(model.weight, lambda param, loaded, **kwargs: None)        # records nothing itself
    with tracking(model) as tracker:
        load_weight(model.weight, torch.zeros(3, 4), expert_id=2, shard_id='up')
        load_weight(model.weight, torch.zeros(3, 4), expert_id=None, shard_id='up')
        load_weight(model.weight, torch.zeros(3, 4), shard_id='gate')
    assert tracker.loaded['weight'] == {(2, 'up'), 'gate'}


class _ExpertsModel(torch.nn.Module):
    """Two experts stacked in one parameter, mapped from per-expert checkpoint tensors (as lmdeploy's MoE ports)."""
    expert_params_mapping = [('experts.gate_up', f'experts.{e}.{p}_proj', e, p)
                             for e in range(2) for p in ('gate', 'up')]

    def __init__(self):
        super().__init__()
        self.experts = torch.nn.Module()
        self.experts.gate_up = torch.nn.Linear(2, 2, bias=False)


def test_an_expert_shard_is_named_by_the_checkpoint_tensor_it_comes_from():
    model = _ExpertsModel()
    assert expected_checkpoint_name(model, "experts.gate_up.weight [shard (1, 'up')]") == 'experts.1.up_proj.weight'
    assert expected_checkpoint_name(model, "experts.gate_up.weight [shard (0, 'gate')]") == \
        'experts.0.gate_proj.weight'
    assert expected_checkpoint_name(model, "experts.gate_up.weight [shard (5, 'up')]") is None      # not mapped
    assert expected_checkpoint_name(model, "norm.weight [shard (1, 'up')]") is None


def test_ranges_of_expert_ids():
    from lmdp.weight_loader.model_weight_loader import _ranges
    assert _ranges([7, 0, 1, 2, 3]) == '0-3, 7'
    assert _ranges([4]) == '4' and _ranges([1, 3, 5]) == '1, 3, 5' and _ranges([2, 3]) == '2-3'
