"""LPIPS-VGG16: parity with the official module, weight conversion from every accepted naming,
start-up errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.convert.lpips import SLICE_STARTS, convert_lpips
from detailflow_jax.convert.state_dict import ConversionError, load_state_dict
from detailflow_jax.losses.lpips import LPIPS, SCALE, SHIFT, channel_normalize, load_lpips_params
from detailflow_jax.losses.vgg import TAPS, VGG16Features
from detailflow_jax.losses.weights import MissingWeightsError


def key(seed):
    # RBG keys: XLA:CPU compiles partitionable-threefry random ops ~10x slower, which dominates
    # these tiny tests.
    return jax.random.key(seed, impl="rbg")


lpips_apply = jax.jit(lambda params, x, y: LPIPS().apply({"params": params}, x, y))


def nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def lpips_fixture(large_fixtures):
    state = load_state_dict(large_fixtures / "losses" / "lpips_state_dict_fp16.npz")
    return state, convert_lpips(state, state), np.load(large_fixtures / "losses" / "lpips_io.npz")


@pytest.mark.parity
def test_lpips_and_vgg_features_match_official(lpips_fixture):
    _, params, io = lpips_fixture
    for a, b, key in [("x1", "x2", "lpips_12"), ("x3", "x4", "lpips_34")]:  # 64² and a 16² canvas
        got = np.asarray(lpips_apply(params, nhwc(io[a]), nhwc(io[b])))
        assert got.shape == io[key].shape
        np.testing.assert_allclose(
            got, io[key], rtol=0, atol=1e-4 * np.abs(io[key]).max(), err_msg=key
        )
    scaled = (nhwc(io["x1"]) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    feats = jax.jit(lambda x: VGG16Features().apply({"params": params["vgg"]}, x))(scaled)
    for tap in TAPS:
        ref = io[f"x1_{tap}"]
        np.testing.assert_allclose(np.asarray(feats[tap]).transpose(0, 3, 1, 2), ref, rtol=0,
                                   atol=1e-4 * np.abs(ref).max(), err_msg=tap)


def _renamed(state, rename):
    return {rename(k): v for k, v in state.items()}


def _local_to_torchvision(key):
    if not key.startswith("net.slice"):
        return key
    _, s, j, kind = key.split(".")
    return f"features.{SLICE_STARTS[int(s[5:]) - 1] + int(j)}.{kind}"


def _local_to_absolute(key):
    if not key.startswith("net.slice"):
        return key
    _, s, j, kind = key.split(".")
    return f"net.{s}.{SLICE_STARTS[int(s[5:]) - 1] + int(j)}.{kind}"


def test_converter_accepts_torchvision_and_lpips_namings(lpips_fixture):
    state, params, _ = lpips_fixture
    vgg = {k: v for k, v in state.items() if k.startswith("net.")}
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    torchvision = _renamed(vgg, _local_to_torchvision)
    # full vgg16 files carry the classifier
    torchvision["classifier.0.weight"] = np.zeros((4, 4), np.float32)
    no_dropout_heads = _renamed(heads, lambda k: k.replace("model.1", "model.0"))
    for vgg_state, head_state in [
        (torchvision, heads),
        (_renamed(vgg, _local_to_absolute), no_dropout_heads),
    ]:
        other = convert_lpips(vgg_state, head_state)
        jax.tree.map(np.testing.assert_array_equal, other, params)
    assert params["vgg"]["conv2_1"]["kernel"].shape == (3, 3, 64, 128)  # features.5 = net.slice2.1


def test_converter_names_missing_keys(lpips_fixture):
    state, _, _ = lpips_fixture
    broken = {k: v for k, v in state.items() if k != "net.slice3.3.weight"}
    with pytest.raises(ConversionError, match="features.12.weight"):
        convert_lpips(broken, broken)
    with pytest.raises(ConversionError, match="lin0.model.1.weight"):
        convert_lpips(state, {})


def test_missing_weights_give_a_start_up_error(tmp_path):
    with pytest.raises(
        MissingWeightsError,
        match=r"--config.losses.lpips_weights=<dir converted by python -m "
        r"detailflow_jax.convert.lpips>",
    ):
        load_lpips_params(None)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_lpips_params(tmp_path / "nope")
    (tmp_path / "vgg.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="is a file"):
        load_lpips_params(tmp_path / "vgg.pth")


def test_lpips_is_zero_for_identical_images(lpips_fixture):
    _, params, _ = lpips_fixture
    x = jax.random.uniform(key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(lpips_apply(params, x, x), 0.0, atol=1e-7)
    assert float(lpips_apply(params, x, -x).min()) > 0


def test_channel_normalize_of_a_dead_pixel_has_a_finite_gradient():
    # An all-zero ReLU pixel: PyTorch's sqrt gives 0 * inf = NaN in the backward pass; ours must
    # stay finite.
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([1.0, 2.0, 0.0, 2.0]))
    np.testing.assert_allclose(channel_normalize(f)[0, 0, 0], [1 / 3, 2 / 3, 0, 2 / 3], rtol=1e-6)
    grad = jax.grad(lambda a: jnp.sum(channel_normalize(a) * jnp.arange(4.0)))(f)
    assert np.isfinite(np.asarray(grad)).all()


def test_cli_round_trip(lpips_fixture, large_fixtures, tmp_path):
    from detailflow_jax.convert.lpips import main

    _, params, _ = lpips_fixture
    npz = str(large_fixtures / "losses" / "lpips_state_dict_fp16.npz")
    main(["--vgg", npz, "--lpips", npz, "--out", str(tmp_path / "lpips")])
    restored = load_lpips_params(tmp_path / "lpips")
    jax.tree.map(np.testing.assert_array_equal, restored["params"], params)


def test_dropout_is_active_in_train_mode_only():
    """Official ``NetLinLayer(use_dropout=True)``: Dropout(0.5) on the squared differences while
    training. Its kept values are doubled, so the train-mode distance is an unbiased estimate of the
    eval-mode one."""
    x = jax.random.uniform(key(10), (2, 16, 16, 3), minval=-1, maxval=1)
    y = jax.random.uniform(key(11), (2, 16, 16, 3), minval=-1, maxval=1)
    params = jax.jit(lambda: LPIPS().init(key(12), x, y)["params"])()
    apply = jax.jit(
        lambda r, train: LPIPS().apply({"params": params}, x, y, train, rngs={"dropout": r}),
        static_argnums=1,
    )
    evals = [np.asarray(apply(key(s), False)) for s in (0, 1)]
    np.testing.assert_array_equal(evals[0], evals[1])  # eval: deterministic, the rng is unused
    # the default call; another compiled program, so float32 rounding may differ in the last bits
    np.testing.assert_allclose(evals[0], np.asarray(lpips_apply(params, x, y)), rtol=1e-6)
    n = 48
    train = np.stack([np.asarray(apply(key(s), True)) for s in range(n)])
    assert not np.allclose(train[0], train[1])
    # The mean of n independent draws is within 5 standard errors of the expectation (the eval
    # value).
    np.testing.assert_array_less(
        np.abs(train.mean(0) - evals[0]), 5 * train.std(0, ddof=1) / np.sqrt(n)
    )
    off = jax.jit(
        lambda r: LPIPS(dropout_rate=0.0).apply({"params": params}, x, y, True, rngs={"dropout": r})
    )
    # the no-dropout option
    np.testing.assert_allclose(np.asarray(off(key(3))), evals[0], rtol=1e-6)
