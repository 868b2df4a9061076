"""Weight import: released shapes without allocating, error messages, and the CLI."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.tokenizer import get_config
from detailflow_jax.convert.state_dict import ConversionError, load_state_dict
from detailflow_jax.convert.tokenizer import (TRAIN_ONLY_PREFIXES, convert_tokenizer_state_dict,
                                              state_dict_key_map)
from detailflow_jax.params_io import restore_params
from detailflow_jax.tokenizer.config import from_fixture_config
from detailflow_jax.tokenizer.model import abstract_params, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"DF-16": 128, "DF-32": 256, "DF-64": 512}


@pytest.fixture(scope="module")
def real_shapes(repo_fixtures):
    return json.loads(
        (repo_fixtures / "official_parity" / "real_checkpoint_shapes.json").read_text()
    )


@pytest.fixture(scope="module")
def tiny(repo_fixtures):
    folder = repo_fixtures / "official_parity" / "tiny_a"
    cfg = from_fixture_config(json.loads((folder / "config.json").read_text()))
    return folder, cfg, load_state_dict(folder / "tokenizer_state_dict.npz")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_checkpoint_shapes_map_onto_model(variant, real_shapes):
    """Every non-train-only tensor of the released state dict has a Flax leaf of the right shape,
    and vice versa."""
    shapes = {k: tuple(v) for k, v in real_shapes[f"tokenizer_N{VARIANTS[variant]}"].items()}
    model_cfg = get_config(variant).model
    abstract = abstract_params(model_cfg)   # jax.eval_shape: nothing allocated
    key_map = state_dict_key_map(model_cfg)
    imported = {k: v for k, v in shapes.items() if not k.startswith(TRAIN_ONLY_PREFIXES)}
    assert sorted(s.torch_key for s in key_map.values()) == sorted(imported)
    for path, source in key_map.items():
        leaf = abstract
        for name in path:
            leaf = leaf[name]
        assert source.torch_shape(leaf.shape) == shapes[source.torch_key], source.torch_key
    assert count_params(abstract) == sum(math.prod(s) for s in imported.values())


def test_df16_param_count(real_shapes):
    # Encoder 184.50M + decoder 85.94M + convs/codebook 0.09M (docs/model.md#parameter-counts);
    # global_token_proj (2.24M) is train-only.
    assert count_params(abstract_params(get_config("DF-16").model)) == 270_533_832


def test_train_only_tensors_skipped_or_kept(tiny):
    _, cfg, state = tiny
    state = dict(
        state,
        **{
            "global_token_proj.0.weight": np.zeros((16, 8), np.float32),
            "repa_model.visual_model.post_layernorm.weight": np.ones((4,), np.float32),
        },
    )
    result = convert_tokenizer_state_dict(state, cfg)
    assert result.skipped == ["global_token_proj.0.weight", "quantize.codebook_used",
                              "repa_model.visual_model.post_layernorm.weight"]
    assert result.train_only is None
    kept = convert_tokenizer_state_dict(state, cfg, keep_train_only=True)
    assert sorted(kept.train_only) == result.skipped
    # Linear weights are transposed into Dense kernels.
    np.testing.assert_array_equal(
        result.params["quant_conv"]["kernel"], state["quant_conv.weight"].T
    )


def test_missing_key_is_named(tiny):
    _, cfg, state = tiny
    state = {k: v for k, v in state.items() if k != "decoder.mask_token"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): decoder\.mask_token"):
        convert_tokenizer_state_dict(state, cfg)


def test_unexpected_key_is_named(tiny):
    _, cfg, state = tiny
    state = dict(state, **{"decoder.extra_head.weight": np.zeros((3, 2), np.float32)})
    with pytest.raises(
        ConversionError, match=r"unexpected keys .*decoder\.extra_head\.weight \(3, 2\)"
    ):
        convert_tokenizer_state_dict(state, cfg)


def test_wrong_shape_names_key_and_both_shapes(tiny):
    _, cfg, state = tiny
    state = dict(state, **{"refine_conv.weight": np.zeros((64, 9), np.float32)})
    with pytest.raises(
        ConversionError, match=r"refine_conv\.weight: checkpoint \(64, 9\) vs model \(64, 8\)"
    ):
        convert_tokenizer_state_dict(state, cfg)


def test_config_mismatch_is_reported(tiny):
    _, cfg, state = tiny
    cfg = copy.deepcopy(cfg)
    cfg.decoder.depth = 3   # checkpoint has 2 decoder layers
    with pytest.raises(ConversionError, match=r"decoder\.visual_model\.encoder\.layers\.2\."):
        convert_tokenizer_state_dict(state, cfg)


def test_cli_writes_restorable_params(tiny, tmp_path):
    folder, cfg, state = tiny
    out = tmp_path / "params"
    args = [
        "--checkpoint",
        str(folder / "tokenizer_state_dict.npz"),
        "--config",
        os.path.join(ROOT, "configs", "tokenizer.py") + ":tiny",
        "--config.model.codebook_size=64",
        "--out",
        str(out),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    run = subprocess.run(
        [sys.executable, "-m", "detailflow_jax.convert.tokenizer", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "282,024 parameters" in run.stdout and "quantize.codebook_used" in run.stdout
    restored = restore_params(out)
    np.testing.assert_array_equal(
        restored["quantizer"]["codebook"], state["quantize.embedding.weight"]
    )
    again = subprocess.run(
        [sys.executable, "-m", "detailflow_jax.convert.tokenizer", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0 and "--force" in again.stderr
