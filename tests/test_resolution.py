"""Resolution tables against the official ``ResolutionDegradation`` tables stored in every parity
config.json."""

import json

import pytest

from detailflow_jax.tokenizer.resolution import (
    ResolutionTables,
    admissible_token_counts,
    canvas_size,
)


def _as_int_dict(d):
    return {int(k): int(v) for k, v in d.items()}


def _check(tables: ResolutionTables, expected: dict):
    assert tables.content_res == _as_int_dict(expected["token2res"])
    assert tables.canvas == _as_int_dict(expected["token2dec_out_res"])
    assert tables.best_token == _as_int_dict(expected["decres2besttoken"])


@pytest.mark.parity
def test_fixture_tables(parity_folder):
    cfg = json.loads((parity_folder / "config.json").read_text())
    tables = ResolutionTables(
        cfg["image_size"], cfg["num_latent_tokens"], cfg["group_size"], cfg["causal_num"]
    )
    _check(tables, cfg["resolution_tables"]["fixture"])
    assert tables.canvas == _as_int_dict(cfg["decode_token_counts"])


@pytest.mark.parity
@pytest.mark.parametrize("num_tokens", [128, 256, 512])
def test_released_tables(parity_folder, num_tokens):
    cfg = json.loads((parity_folder / "config.json").read_text())
    _check(
        ResolutionTables(256, num_tokens, 8, 8), cfg["resolution_tables"][f"N{num_tokens}_g8_R256"]
    )


def test_released_counts_and_canvases():
    tables = ResolutionTables(256, 128, 8, 8)
    assert tables.token_counts[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert len(tables.token_counts) == 8 + 15
    # one compiled step per canvas (docs/model.md#static-shapes)
    assert len(tables.canvas_sizes) == 14
    assert len(ResolutionTables(256, 256, 8, 8).canvas_sizes) == 16


def test_causal_num_larger_than_group():
    assert admissible_token_counts(32, 4, 8) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 32]


def test_paper_rounding_matches_paper_figure_labels():
    # Paper figures label 8 tok -> 16, 24 -> 64, 64 -> 160, 80 -> 192 (nearest-16), the code gives
    # 32/80/176/208.
    paper = ResolutionTables(256, 128, 8, 8, rounding="nearest").canvas
    code = ResolutionTables(256, 128, 8, 8).canvas
    assert [paper[t] for t in (8, 24, 64, 80)] == [16, 64, 160, 192]
    assert [code[t] for t in (8, 24, 64, 80)] == [32, 80, 176, 208]


def test_bad_rounding_is_an_error():
    with pytest.raises(ValueError, match="rounding"):
        canvas_size(40, 256, rounding="round")
