"""Code extraction: the stored triples are the tokenizer's clean / self-correction codes of each
view, chunks resume exactly (whatever the batch size), mismatched settings are refused, and
tokenizer weights load from a trainer's work directory."""

import os

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from configs import ar_fashion_mnist, tokenizer_fashion_mnist
from detailflow_jax import sharding
from detailflow_jax.checkpoint import Checkpointer
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.data import codes as codes_lib
from detailflow_jax.data.sources import SyntheticSource
from detailflow_jax.inference.weights import load_tokenizer
from detailflow_jax.params_io import save_params
from detailflow_jax.tokenizer.extract import extract_codes, noise_spans
from detailflow_jax.tokenizer.model import DetailFlowTokenizer, init_params

TOKENIZER_CONFIG = "configs/tokenizer_fashion_mnist.py:smoke"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    model_cfg = tokenizer_fashion_mnist.get_config("smoke").model
    params = init_params(model_cfg, jax.random.key(0))
    path = str(tmp_path_factory.mktemp("tok") / "params")
    save_params(path, params)
    return model_cfg, params, path


def extract_config(**extract):
    # 24 synthetic images, chunks of 10, centre + mirror views
    config = ar_fashion_mnist.get_config("smoke")
    config.extract.update(extract)
    return config


@pytest.fixture(scope="module")
def extracted(tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("codes"))
    result = extract_codes(extract_config(), tokenizer[2], out, TOKENIZER_CONFIG)
    return out, result


def read_chunks(out):
    meta, files = codes_lib.open_codes(out)
    records = [codes_lib.decode_record(r, meta.views, meta.num_tokens)
               for path in files for r in ArrayRecordReader(path).read_all()]
    return meta, files, records


def test_codes_are_the_clean_and_self_correction_codes_of_each_view(tokenizer, extracted):
    model_cfg, params, _ = tokenizer
    out, result = extracted
    meta, files, records = read_chunks(out)
    assert result["images"] == 24 and result["chunks_done"] == 3 and len(files) == 3
    assert (meta.num_tokens, meta.group_size, meta.causal_num, meta.codebook_size, meta.views) == (
        32,
        4,
        4,
        64,
        2,
    )
    source = SyntheticSource(24, 32, 10, seed=0)
    assert [r[0] for r in records] == list(range(24))
    assert [r[1] for r in records] == [int(x) for x in source.labels]

    codes = np.stack([r[2] for r in records]).astype(np.int32)  # (24, views, N, 3)
    images = source.images.astype(np.float32) / 127.5 - 1
    encode = jax.jit(
        lambda x: DetailFlowTokenizer(model_cfg).apply({"params": params}, x, method="encode")
    )
    np.testing.assert_array_equal(codes[:, 0, :, 0], encode(images)["indices"])
    np.testing.assert_array_equal(codes[:, 1, :, 0], encode(images[:, :, ::-1])["indices"])

    spans = noise_spans(meta.seed, np.arange(24), 32, 4, 4)
    pos = np.arange(32)
    perturbed = 0
    for (noise_idx, noise_end), c in zip(spans, codes):
        clean, sc_input, sc_label = c[..., 0], c[..., 1], c[..., 2]
        np.testing.assert_array_equal(sc_input[:, pos < noise_idx], clean[:, pos < noise_idx])
        np.testing.assert_array_equal(sc_label[:, pos < noise_end], clean[:, pos < noise_end])
        np.testing.assert_array_equal(sc_input[:, pos >= noise_end], sc_label[:, pos >= noise_end])
        perturbed += np.sum(sc_input[:, noise_idx:noise_end] != clean[:, noise_idx:noise_end])
    assert perturbed > 0  # the noisy window really holds other (top-k) codes
    # One span per image, shared by its views; single tokens inside the causal group, whole groups
    # after it.
    assert all((e - i == 1) if i < 4 else (e - i == 4 and i % 4 == 0 and e <= 28) for i, e in spans)


def test_rerun_skips_finished_chunks_and_rewrites_missing_ones_identically(
    tokenizer, extracted, tmp_path
):
    out, _ = extracted
    copy = tmp_path / "codes"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes((open(os.path.join(out, name), "rb")).read())
    original = {n: (copy / n).read_bytes() for n in os.listdir(copy)}
    missing = "codes-00001-of-00003.array_record"
    (copy / missing).unlink()
    (copy / (missing + ".tmp-123")).write_bytes(b"left over by a killed run")
    kept_mtime = os.path.getmtime(copy / "codes-00000-of-00003.array_record")

    # Another batch size: an image's codes do not depend on the batch it lands in.
    result = extract_codes(extract_config(batch_size=16), tokenizer[2], str(copy), TOKENIZER_CONFIG)
    assert (result["chunks_done"], result["chunks_skipped"], result["images"]) == (1, 2, 10)
    assert os.path.getmtime(copy / "codes-00000-of-00003.array_record") == kept_mtime
    for name, data in original.items():
        assert (copy / name).read_bytes() == data, name


def test_other_settings_in_the_same_directory_are_refused(tokenizer, extracted):
    out, _ = extracted
    with pytest.raises(ConfigError, match="view"):
        extract_codes(extract_config(views="center"), tokenizer[2], out, TOKENIZER_CONFIG)


def test_converted_directory_needs_its_config(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer_config"):
        extract_codes(extract_config(), tokenizer[2], str(tmp_path))


def test_tokenizer_loads_from_a_training_workdir(tokenizer, tmp_path):
    model_cfg, params, _ = tokenizer
    config = tokenizer_fashion_mnist.get_config("smoke")
    (tmp_path / "config.json").write_text(config.to_json())
    state = {"step": np.int32(5), "params": params, "opt": {"mu": params}}
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(5, state)
    checkpointer.close()
    mesh = sharding.make_mesh((-1, 1, 1))
    loaded_cfg, loaded = load_tokenizer(str(tmp_path), mesh)
    assert loaded_cfg.num_latent_tokens == model_cfg.num_latent_tokens
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


def _tokenizer_workdir(path, params_by_step: dict) -> str:
    """A tokenizer training work directory holding a checkpoint per step."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(tokenizer_fashion_mnist.get_config("smoke").to_json())
    checkpointer = Checkpointer(str(path / "checkpoints"))
    for step, params in params_by_step.items():
        checkpointer.save(step, {"step": np.int32(step), "params": params})
    checkpointer.close()
    return str(path)


def test_codes_of_an_older_tokenizer_checkpoint_are_not_reused(tokenizer, tmp_path):
    model_cfg, params, _ = tokenizer
    workdir = _tokenizer_workdir(tmp_path / "tok", {5: params})
    out = str(tmp_path / "codes")
    extract_codes(extract_config(), workdir, out)
    assert codes_lib.read_metadata(out).tokenizer["step"] == 5
    # The tokenizer trains further: its step-6 weights give other codes.
    _tokenizer_workdir(tmp_path / "tok", {6: init_params(model_cfg, jax.random.key(1))})
    with pytest.raises(ConfigError, match=r"tokenizer\.step: 5 -> 6.*pass --overwrite"):
        extract_codes(extract_config(), workdir, out)
    _, _, before = read_chunks(out)  # refused: the old codes are still there

    result = extract_codes(extract_config(), workdir, out, overwrite=True)
    _, _, after = read_chunks(out)
    assert result["chunks_done"] == 3 and codes_lib.read_metadata(out).tokenizer["step"] == 6
    assert len(before) == len(after) == 24
    assert any((b[2] != a[2]).any() for b, a in zip(before, after))
