"""DiffAugment: identity at p = 0, exact translation / cutout geometry, determinism, per-call group
decisions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.losses.diffaug import cutout, diff_augment, parse_policy, translation


def key(seed):
    # RBG keys: XLA:CPU compiles partitionable-threefry random ops ~10x slower, which dominates
    # these tiny tests.
    return jax.random.key(seed, impl="rbg")


B, H, W = 6, 16, 24


def images(seed=0):
    return jax.random.uniform(key(seed), (B, H, W, 3), minval=-1, maxval=1)


def test_policy_parsing():
    assert parse_policy("color,translation,cutout_0.2") == [("color", None), ("translation", 0.125),
                                                            ("cutout", 0.2)]
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        parse_policy("color,blur")
    with pytest.raises(ValueError, match="not a number"):
        parse_policy("cutout_x")


def test_p_zero_is_identity_and_p_one_always_augments():
    x = images()
    np.testing.assert_array_equal(diff_augment(key(1), x, "color,translation,cutout_0.5", p=0.0), x)
    for seed in range(3):
        assert not np.allclose(diff_augment(key(seed), x, "color", p=1.0), x)


def test_deterministic_given_key_and_jittable():
    x = images()
    aug = jax.jit(lambda k, x: diff_augment(k, x, "color,translation,cutout_0.2", p=0.5))
    np.testing.assert_array_equal(aug(key(3), x), aug(key(3), x))
    outs = [aug(key(s), x) for s in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_each_group_is_decided_once_for_the_whole_batch():
    x = images()
    seen = set()
    for seed in range(40):
        changed = np.any(np.asarray(diff_augment(key(seed), x, "color", p=0.5)) != np.asarray(x),
                         axis=(1, 2, 3))
        assert changed.all() or not changed.any()  # all samples or none
        seen.add(bool(changed.all()))
    assert seen == {True, False}


def test_translation_shifts_by_at_most_an_eighth_with_zero_fill():
    # Every pixel holds its own (row, col) + 1, so each output pixel tells where it came from (0 =
    # padding).
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    x = jnp.asarray(np.stack([rows + 1, cols + 1, np.ones_like(rows)], -1), jnp.float32)[
        None
    ].repeat(B, 0)
    out = np.asarray(translation(key(0), x))
    assert out.shape == x.shape
    shifts = set()
    for b in range(B):
        inside = out[b, ..., 2] == 1
        dy = out[b, ..., 0][inside] - 1 - rows[inside]
        dx = out[b, ..., 1][inside] - 1 - cols[inside]
        assert len(set(dy)) == 1 and len(set(dx)) == 1  # one rigid shift per sample
        dy, dx = int(dy[0]), int(dx[0])
        assert abs(dy) <= 2 and abs(dx) <= 3  # round(16/8), round(24/8)
        assert inside.sum() == (H - abs(dy)) * (W - abs(dx))  # the rest is zero padding
        assert np.all(out[b][~inside] == 0)
        shifts.add((dy, dx))
    assert len(shifts) > 1


def test_cutout_zeroes_one_clipped_square_per_sample():
    x = jnp.ones((200, H, W, 3))
    out = np.asarray(cutout(key(0), x, ratio=0.5))
    side_h, side_w = 8, 12
    zero = out[..., 0] == 0
    assert np.all(out[zero] == 0) and np.all(out[~zero] == 1)
    full = 0
    for b in range(out.shape[0]):
        r = np.flatnonzero(zero[b].any(1))
        c = np.flatnonzero(zero[b].any(0))
        assert zero[b].sum() == len(r) * len(c)  # a rectangle ...
        assert np.all(np.diff(r) == 1) and np.all(np.diff(c) == 1)
        # ... of at most the cutout size, clipped at borders
        assert 0 < len(r) <= side_h and 0 < len(c) <= side_w
        full += (len(r), len(c)) == (side_h, side_w)
    # the centre is uniform: about a quarter of the squares fit entirely
    assert 0.2 < full / out.shape[0] < 0.6
