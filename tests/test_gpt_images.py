"""Tokens -> images through the tokenizer: full decode, coarse-to-fine previews, a labelled PNG
strip."""

import sys

import jax
import numpy as np
from PIL import Image

from detailflow_jax.inference import pictures
from detailflow_jax.inference.images import TokenDecoder
from detailflow_jax.pixels import to_uint8
from detailflow_jax.tokenizer.model import init_params



def test_previews_and_png_strip(tmp_path):
    sys.path.insert(0, ".")
    from configs.tokenizer import model_config
    cfg = model_config("tiny")  # N = 32, g = C = 4, 64 px
    decoder = TokenDecoder(cfg, jax.jit(lambda key: init_params(cfg, key))(jax.random.key(0)))
    codes = np.random.default_rng(0).integers(0, cfg.codebook_size, (2, cfg.num_latent_tokens))
    full = decoder.decode(codes)
    assert full.shape == (2, cfg.image_size, cfg.image_size, 3)
    counts = [1, 32]
    previews = decoder.previews(codes, counts)
    assert [t for t, _ in previews] == counts
    assert [p.shape[1] for _, p in previews] == [decoder.tables.canvas[t] for t in counts]
    np.testing.assert_array_equal(previews[-1][1], to_uint8(full))
    pictures.save_png(
        pictures.strip([(pictures.token_label(t), p) for t, p in previews]), tmp_path / "strip.png"
    )
    # 64 px shown at 128
    layout = pictures.grid_layout(2, 2, 128, column_labels=["t = 1", "t = 32"])
    assert Image.open(tmp_path / "strip.png").size == (layout.width, layout.height)


def test_one_decode_program_per_canvas():
    sys.path.insert(0, ".")
    from configs.tokenizer import model_config
    cfg = model_config("tiny")
    decoder = TokenDecoder(cfg, jax.jit(lambda key: init_params(cfg, key))(jax.random.key(0)))
    codes = np.random.default_rng(1).integers(0, cfg.codebook_size, (2, cfg.num_latent_tokens))
    before = TokenDecoder._decode._cache_size()
    previews = decoder.previews(codes)  # every admissible t
    assert (
        TokenDecoder._decode._cache_size() - before
        == len(decoder.tables.canvas_sizes)
        < len(previews)
    )
