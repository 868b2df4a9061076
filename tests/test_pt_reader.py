"""Reading torch checkpoints without torch: official fixtures, crafted files, refused code, damage.

No torch here: test files are written by a pure-Python pickler that emits torch's globals by name
and torch's storage ids, laid out like ``torch.save`` does (zip archive, or the legacy stream).
"""

import argparse
import collections
import dataclasses
import io
import os
import pickle
import zipfile

import pathlib

import ml_dtypes
import numpy as np
import pytest

from detailflow_jax.convert.pt_reader import PickledNamespace, load_pt, open_pt
from detailflow_jax.convert.state_dict import ConversionError, load_state_dict

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_MADE = pathlib.Path(__file__).resolve().parent / "fixtures" / "pt_reader"  # make_fixtures.py


@dataclasses.dataclass(frozen=True)
class _Global:
    """A global the file names (``torch.FloatStorage``, ...), written by name: nothing imported."""
    module: str
    name: str

    def __call__(self, *args):  # the pickler only checks that a reduce function is callable
        raise AssertionError("never called")


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    kind: str  # "Float", "BFloat16", ...
    numel: int
    view: tuple | None = None  # legacy format only: (view key, element offset, element count)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def __reduce__(self):
        hooks = collections.OrderedDict()
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.size, self.stride, False, hooks))


class _TorchLikePickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save_named_global(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_named_global

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        pid = ("storage", _Global("torch", f"{obj.kind}Storage"), obj.key, "cpu", obj.numel)
        return pid + (obj.view,) if self.legacy else pid  # legacy ids end with the view metadata


def _pickled(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    _TorchLikePickler(buf, legacy).dump(obj)
    return buf.getvalue()


def _write_pt(path, tree, storages: dict, byteorder: str = "little", data_pkl: bytes | None = None):
    """torch's zip layout: archive/data.pkl, archive/byteorder, archive/data/<key> (raw bytes)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _pickled(tree) if data_pkl is None else data_pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, array in storages.items():
            z.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder(
                "<" if byteorder == "little" else ">")).tobytes())
        z.writestr("archive/version", "3\n")
    return path


def _write_legacy_pt(path, tree, storages: dict):
    """torch < 1.6: magic, protocol, sys info, data pickle, storage keys, then per storage its
    int64 element count and bytes."""
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 8}}
    parts = [pickle.dumps(x, protocol=2) for x in (_LEGACY_MAGIC, 1001, sys_info)]
    parts += [_pickled(tree, legacy=True), pickle.dumps(list(storages), protocol=2)]
    for array in storages.values():
        little = array.astype(array.dtype.newbyteorder("<"))
        parts += [np.int64(array.size).astype("<i8").tobytes(), little.tobytes()]
    path.write_bytes(b"".join(parts))
    return path


def _tensor(key, kind, values, offset=0, size=None, stride=None):
    size = values.shape if size is None else size
    stride = tuple(int(s) // values.itemsize for s in values.strides) if stride is None else stride
    return _Tensor(_Storage(key, kind, values.size), offset, tuple(size), tuple(stride))


def _strided(storage: np.ndarray, offset: int, size, stride) -> np.ndarray:
    """Element-by-element reference: out[i, j] = storage[offset + i * stride[0] + j * stride[1]]."""
    out = np.empty(size, storage.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            out[i, j] = storage[offset + i * stride[0] + j * stride[1]]
    return out


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tokenizer", "gpt"])
def test_official_pt_matches_npz(parity_folder, name):
    pt = load_state_dict(parity_folder / f"{name}_state_dict.pt")
    npz = load_state_dict(parity_folder / f"{name}_state_dict.npz")
    assert sorted(pt) == sorted(npz)
    for key in npz:
        assert pt[key].dtype == npz[key].dtype, key
        np.testing.assert_array_equal(pt[key], npz[key], err_msg=key)


@pytest.mark.parametrize("name", ["torch_zip.pt", "torch_legacy.pt"])
def test_files_written_by_torch(name):
    """torch 2.13's own output, both formats: views, offsets, stride 0, every dtype, a Parameter,
    AdamW state and argparse args beside the weights."""
    expected = np.load(TORCH_MADE / "expected.npz")
    tree = load_pt(TORCH_MADE / name)
    model = tree["model"]
    assert sorted(model) == sorted(expected.files)
    for key in expected.files:
        want = expected[key]
        got = model[key].astype(np.float32) if key == "bfloat16" else model[key]
        assert model[key].dtype == (ml_dtypes.bfloat16 if key == "bfloat16" else want.dtype), key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    assert vars(tree["args"]) == dict(lr=1e-4, ema=True, results_dir="out", gpt_ckpt=None,
                                      image_size=256)
    adam = tree["optimizer"]["state"][0]
    assert float(adam["step"]) == 1.0 and adam["exp_avg"].shape == (2, 3)
    np.testing.assert_array_equal(load_state_dict(TORCH_MADE / name, entry="ema")["transposed"],
                                  expected["transposed"])


def test_strided_and_offset_views_of_one_storage(tmp_path):
    storage = np.arange(24, dtype=np.float32) * 0.5 - 3
    views = {"transposed": (0, (3, 4), (1, 3)), "offset_rows": (5, (2, 3), (6, 1)),
             "gapped": (1, (3, 2), (7, 5)), "broadcast": (2, (2, 3), (0, 1))}
    tree = collections.OrderedDict((name, _Tensor(_Storage("0", "Float", 24), off, size, stride))
                                   for name, (off, size, stride) in views.items())
    tree["scalar"] = _Tensor(_Storage("0", "Float", 24), 23, (), ())
    tree["empty"] = _Tensor(_Storage("0", "Float", 24), 0, (0, 4), (4, 1))
    out = load_state_dict(_write_pt(tmp_path / "views.pt", tree, {"0": storage}))
    for name, (off, size, stride) in views.items():
        np.testing.assert_array_equal(out[name], _strided(storage, off, size, stride), err_msg=name)
        assert out[name].flags.c_contiguous and out[name].flags.writeable, name  # copies, not views
    assert out["scalar"].shape == () and out["scalar"] == storage[23]
    assert out["empty"].shape == (0, 4)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_storage_dtypes(tmp_path, byteorder):
    values = {"Float": np.float32([1.5, -2.25]), "Half": np.float16([0.5, 65504]),
              "Double": np.float64([1e-300, 3]), "Long": np.int64([-2 ** 40, 7]),
              "BFloat16": np.array([1.0078125, -3e38], ml_dtypes.bfloat16),
              "Int": np.int32([-5, 2 ** 30]), "Short": np.int16([-300, 4]),
              "Char": np.int8([-128, 1]), "Byte": np.uint8([255, 0]),
              "Bool": np.array([True, False])}
    tree = {kind: _tensor(kind, kind, v) for kind, v in values.items()}
    path = _write_pt(tmp_path / "dtypes.pt", tree, values, byteorder=byteorder)
    raw = load_pt(path)
    for kind, v in values.items():
        assert raw[kind].dtype == v.dtype, kind
        np.testing.assert_array_equal(raw[kind], v, err_msg=kind)
    converted = load_state_dict(path)  # floating tensors become float32, like tensor.float()
    for kind, v in values.items():
        expected = v.astype(np.float32) if kind in ("Float", "Half", "Double", "BFloat16") else v
        assert converted[kind].dtype == expected.dtype, kind
        np.testing.assert_array_equal(converted[kind], expected, err_msg=kind)


def _training_checkpoint():
    """What the official train scripts save: model, ema, optimizer state, steps, argparse args."""
    weight, bias = np.arange(6, dtype=np.float32).reshape(2, 3), np.float32([0.25, -1])
    ema_weight = weight + 100
    storages = {"0": weight, "1": bias, "2": ema_weight, "3": np.float32([3.0]),
                "4": np.zeros(6, np.float32)}
    model = collections.OrderedDict([("fc.weight", _tensor("0", "Float", weight)),
                                     ("fc.bias", _tensor("1", "Float", bias))])
    ema = collections.OrderedDict([("fc.weight", _tensor("2", "Float", ema_weight)),
                                   ("fc.bias", _tensor("1", "Float", bias))])
    optimizer = {"state": {0: {"step": _Tensor(_Storage("3", "Float", 1), 0, (), ()),
                               "exp_avg": _tensor("4", "Float", storages["4"])}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0, 1]}]}
    args = argparse.Namespace(lr=1e-4, ema=True, results_dir="out", gpt_ckpt=None, image_size=256)
    tree = {"model": model, "optimizer": optimizer, "steps": 5000, "args": args, "ema": ema}
    return tree, storages, {"fc.weight": weight, "fc.bias": bias}, ema_weight


@pytest.mark.parametrize("writer", [_write_pt, _write_legacy_pt], ids=["zip", "legacy"])
def test_official_training_checkpoint_layout(tmp_path, writer):
    tree, storages, model, ema_weight = _training_checkpoint()
    path = writer(tmp_path / "0005000.pt", tree, storages)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(model)
    for key in model:
        np.testing.assert_array_equal(loaded[key], model[key])
    np.testing.assert_array_equal(load_state_dict(path, entry="ema")["fc.weight"], ema_weight)
    with open_pt(path) as ckpt:
        args = ckpt.tree["args"]
        assert isinstance(args, PickledNamespace)
        assert (args.lr, args.ema, args.results_dir, args.gpt_ckpt) == (1e-4, True, "out", None)
        assert ckpt.tree["steps"] == 5000
        assert ckpt.tree["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_tensors_outside_the_chosen_entry_are_never_read(tmp_path):
    tree, storages, model, _ = _training_checkpoint()
    del storages["4"]  # optimizer exp_avg: absent, and not needed for the model entry
    loaded = load_state_dict(_write_pt(tmp_path / "ckpt.pt", tree, storages))
    np.testing.assert_array_equal(loaded["fc.weight"], model["fc.weight"])


def test_legacy_storage_view(tmp_path):
    storage = np.arange(8, dtype=np.float32)
    view = _Storage("0", "Float", 8, view=("0v", 3, 4))  # elements 3..6 of storage "0"
    tree = {"w": _Tensor(view, 1, (2,), (2,))}  # elements 1 and 3 of the view
    out = load_state_dict(_write_legacy_pt(tmp_path / "old.pt", tree, {"0": storage}))
    np.testing.assert_array_equal(out["w"], storage[[4, 6]])


class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func, name", [(os.system, "system"), (exec, "exec"), (eval, "eval")])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, func, name):
    """The error names the global as the file spells it ('posix.system', '__builtin__.exec')."""
    marker = tmp_path / "MARKER"
    payload = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    data_pkl = pickle.dumps({"model": {"w": _RunsCode(func, payload)}}, protocol=2)
    assert not marker.exists()
    path = _write_pt(tmp_path / "evil.pt", None, {}, data_pkl=data_pkl)
    with pytest.raises(ConversionError, match=rf"refusing to load '\w+\.{name}' from .*evil\.pt: "
                                              "a checkpoint may only contain tensors"):
        load_state_dict(path)
    assert not marker.exists()
    pickle.loads(data_pkl)  # what torch.load(weights_only=False) would do: the payload is live
    assert marker.exists()


@pytest.mark.parametrize("target", ["torch\nFloatStorage", "torch._utils\n_rebuild_tensor_v2",
                                    "argparse\nNamespace", "collections\nOrderedDict"])
@pytest.mark.parametrize("state", [(None, {"dtype": 5, "fn": 5, "__setstate__": 5}), {"dtype": 5},
                                   ("Float", 5)])
def test_pickle_cannot_rewrite_the_allowed_globals(tmp_path, target, state):
    # GLOBAL <target>, <state>, BUILD: would rewrite an object shared by every later load.
    body = pickle.dumps(state, protocol=2)[2:-1]
    data_pkl = b"\x80\x02c" + target.encode() + b"\n" + body + b"b."
    with pytest.raises(ConversionError, match="tamper.pt"):
        load_state_dict(_write_pt(tmp_path / "tamper.pt", None, {}, data_pkl=data_pkl))
    values = np.float32([1.5, -2])
    later = load_state_dict(_write_pt(tmp_path / "later.pt", {"w": _tensor("0", "Float", values)},
                                      {"0": values}))
    assert later["w"].dtype == np.float32
    np.testing.assert_array_equal(later["w"], values)


def test_a_model_class_is_refused(tmp_path):
    # torch.save(model) pickles the module's class: refused by name, though it is importable.
    data_pkl = pickle.dumps({"model": collections.Counter(a=1)}, protocol=2)
    with pytest.raises(ConversionError, match="refusing to load 'collections.Counter'"):
        load_state_dict(_write_pt(tmp_path / "module.pt", None, {}, data_pkl=data_pkl))


@pytest.mark.parametrize("writer", [_write_pt, _write_legacy_pt], ids=["zip", "legacy"])
def test_truncated_checkpoint(tmp_path, writer):
    tree, storages, _, _ = _training_checkpoint()
    full = writer(tmp_path / "full.pt", tree, storages).read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(full[:len(full) // 2])
    with pytest.raises(ConversionError, match=r"half\.pt.*(truncated|corrupt)") as err:
        load_state_dict(half)
    assert "\n" not in str(err.value)


def test_truncated_official_fixture(tmp_path, parity_folder):
    full = (parity_folder / "gpt_state_dict.pt").read_bytes()
    half = tmp_path / "gpt_state_dict.pt"
    half.write_bytes(full[:len(full) // 2])
    with pytest.raises(ConversionError, match=r"gpt_state_dict\.pt is truncated or corrupt"):
        load_state_dict(half)


def test_missing_storage(tmp_path):
    tree, storages, _, _ = _training_checkpoint()
    del storages["1"]
    with pytest.raises(ConversionError, match=r"storage 'archive/data/1' is missing"):
        load_state_dict(_write_pt(tmp_path / "ckpt.pt", tree, storages))


def test_tensor_reaching_past_its_storage(tmp_path):
    tree = {"w": _Tensor(_Storage("0", "Float", 6), 2, (2, 3), (3, 1))}  # last index 2 + 3 + 2 = 7
    with pytest.raises(ConversionError, match="reaches past its storage of 6 elements"):
        load_state_dict(_write_pt(tmp_path / "ckpt.pt", tree, {"0": np.zeros(6, np.float32)}))


@pytest.mark.parametrize("content, reason", [
    (b"key,value\nlr,0.1\n", "it is not a zip archive"), (b"", "the file is empty"),
    (b"PK\x03\x04 half of an archive", "a truncated zip archive")])
@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_files_that_are_not_archives(tmp_path, content, reason, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(ConversionError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "\n" not in message and "allow_pickle" not in message and "weights" in message
    if suffix == ".npz":
        assert "is not a numpy .npz archive of arrays" in message and reason in message


def test_npz_holding_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, a=np.array([{"lr": 0.1}], dtype=object))
    with pytest.raises(ConversionError, match="objects.npz is not a numpy .npz archive of arrays"):
        load_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_damaged_safetensors(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    expected = r"model\.safetensors is not a readable \.safetensors file"
    with pytest.raises(ConversionError, match=expected) as err:
        load_state_dict(path)
    assert "\n" not in str(err.value)
