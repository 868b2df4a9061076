"""Loss-level parity with the official training code (fixture: tests/fixtures/losses_small/, made by
tests/fixtures/make_loss_parity.py): the same inputs and the same random decisions give the same
loss terms."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ar_fashion_mnist
from detailflow_jax import config_lib, sharding
from detailflow_jax.convert.dino import convert_dino, discriminator_for
from detailflow_jax.convert.gpt import load_gpt_checkpoint
from detailflow_jax.convert.lpips import convert_lpips
from detailflow_jax.convert.state_dict import load_state_dict
from detailflow_jax.losses import diffaug, gan
from detailflow_jax.tokenizer.quantizer import VectorQuantizer, codebook_losses, entropy_loss
from detailflow_jax.train.ar_step import make_ar_step
from detailflow_jax.train.tokenizer_step import TokenizerLosses
from float_tolerance import dot_product_tolerance
from seeded_vgg import lpips_state
from test_tokenizer_training import tiny_config

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def folder(repo_fixtures):
    return repo_fixtures / "losses_small"


def ar_program(c):
    """The AR step at the fixture's sizes, dropout rates 0 (the fixture pins the class drops
    instead)."""
    g = c["gpt"]
    config = config_lib.override(
        ar_fashion_mnist.get_config("smoke"),
        correction_prob=c["correction_prob"],
        **{
            f"model.{k}": v
            for k, v in dict(
                dim=g["dim"],
                n_layer=g["layers"],
                n_head=g["heads"],
                multiple_of=g["multiple_of"],
                num_classes=g["num_classes"],
                num_tokens=c["num_latent_tokens"],
                group_size=c["group_size"],
                causal_num=c["causal_num"],
                vocab_size=c["codebook_size"],
                class_dropout=0.0,
                token_dropout=0.0,
                resid_dropout=0.0,
                ffn_dropout=0.0,
            ).items()
        },
    )
    return make_ar_step(config, sharding.make_mesh((-1, 1, 1)))


# The longest dot product of the tokenizer losses: VGG16's 3x3 convolutions over 512 channels
# (LPIPS).
TOKENIZER_RTOL = dot_product_tolerance(3 * 3 * 512)  # 1.6e-5


def assert_term(got, ref, term, rtol=TOKENIZER_RTOL):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
    print(f"{term}: rel err {err:.1e}")
    np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * np.abs(ref).max(), err_msg=term)


def test_ar_loss_matches_train_c2i(folder):
    c = json.loads((folder / "config.json").read_text())
    io = np.load(folder / "ar_loss_io.npz")
    program = ar_program(c)
    params = load_gpt_checkpoint(str(folder / "gpt_state_dict_fp16.npz"), program.model_cfg)
    use, dropped = io["use_corrected"], io["class_dropped"]
    # both outcomes of both draws
    assert 0 < use.sum() < len(use) and 0 < dropped.sum() < len(dropped)
    # A dropped class is the null class (row num_classes), which is what the official token_drop
    # substitutes.
    labels = np.where(dropped, c["gpt"]["num_classes"], io["labels"])
    loss, _ = jax.jit(program.loss_given)(params, io["codes"], labels, use, jax.random.key(0))
    # A mean over B x N cross-entropies of logits from matmuls of length at most the MLP width; the
    # mean does not amplify their relative error.
    assert_term(loss, io["loss"], "AR loss", rtol=dot_product_tolerance(program.model_cfg.ffn_dim))


# ---------------------------------------------------------------------------------------- tokenizer


def test_codebook_terms_match_vector_quantizer(folder):
    """vq, commit and entropy losses of the official VectorQuantizer (train mode) on given encoder
    outputs: vq and commit skip the positions before noise_end, the entropy takes them all."""
    c = json.loads((folder / "config.json").read_text())
    q, io = c["quantizer_loss"], np.load(folder / "quantizer_loss_io.npz")
    n = c["num_latent_tokens"]
    quantized = VectorQuantizer(c["codebook_size"], q["codebook_dim"]).apply(
        {"params": {"codebook": io["codebook"]}}, io["z"])
    for end in q["noise_ends"]:
        vq, commit = codebook_losses(quantized, np.arange(n) >= end, q["beta"], q["vq_loss_ratio"])
        entropy = q["entropy_loss_ratio"] * entropy_loss(quantized.distances, np.ones(n, bool))
        # The longest sum: the entropy's mean over the B x N token distributions of the K codes.
        rtol = dot_product_tolerance(q["batch"] * n * c["codebook_size"])
        for term, got in (("vq_loss", vq), ("commit_loss", commit), ("entropy_loss", entropy)):
            assert_term(got, io[f"noise_end{end}.{term}"], f"noise_end {end} {term}", rtol=rtol)

# the official DiffAugment calls, in order
AUGMENTED = ("gen_fake", "real", "fake", "strong_real", "strong_fake")
CASES = [
    (half, when) for half in ("with_sc", "without_sc") for when in ("before_disc", "after_disc")
]
# official heads key -> the project's module name, for the spectral-norm vectors and BatchNorm means
SN_CONVS = {"0.0": "block_conv", "1.fn.0": "residual_conv", "2": "out"}
NORMS = {"0.1": "block_norm", "1.fn.1": "residual_norm"}


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tokenizer_losses(folder):
    """(the step's losses, frozen networks, converted DINO heads, fixture arrays, its tokenizer_loss
    settings)."""
    c = json.loads((folder / "config.json").read_text())
    t = c["tokenizer_loss"]
    backbone = load_state_dict(folder / "dino_state_dict_fp16.npz")
    dino = convert_dino(backbone, load_state_dict(folder / "dino_heads_state_dict_fp16.npz"))
    config = tiny_config(
        **{
            "losses.disc_type": "dino",
            "losses.disc_start": t["disc_start"],
            "losses.disc_weight": t["disc_weight"],
            "losses.lpips_weight": 1.0,
            "losses.lpips_warmup": t["perceptual_warmup"],
            "losses.lpips_dropout": 0.0,
            "losses.lecam_weight": t["lecam_weight"],
            "losses.cr_weight": t["cr_weight"],
            "losses.mse_weight": 1.0,
        }
    )
    losses = dataclasses.replace(
        TokenizerLosses.from_config(config), disc=discriminator_for(backbone)
    )
    vgg = lpips_state(t["vgg_seed"])
    frozen = {"lpips": {"params": convert_lpips(vgg, vgg)}, "dino": dino["backbone"]}
    return losses, frozen, dino["heads"], np.load(folder / "tokenizer_loss_io.npz"), t


@pytest.mark.parametrize("half,when", CASES)
def test_tokenizer_losses_match_vq_loss(tokenizer_losses, monkeypatch, half, when):
    """Every term of the official VQLoss, generator and discriminator, from the project's
    TokenizerLosses on the same targets, reconstructions and DiffAugment outputs; t = 1 (without_sc)
    as the project runs it: 2B images whose second half has weight 0 and must not count anywhere
    (here it holds other images)."""
    losses, frozen, heads, io, t = tokenizer_losses
    name = f"{half}.{when}"
    target, recon = nhwc(io["target"]), nhwc(io[f"{name}.recon"])
    b = len(target)
    target2 = np.concatenate([target, target])
    if half == "with_sc":
        weight, pad = np.ones(2 * b, np.float32), lambda a: a
    else:
        weight, pad = np.repeat(np.float32([1, 0]), b), lambda a: np.concatenate([a, -a[::-1]])
    augmented = [pad(nhwc(io[f"{name}.aug_{k}"])) for k in AUGMENTED]
    monkeypatch.setattr(
        diffaug, "diff_augment", lambda key, x, policy, p: jnp.asarray(augmented.pop(0))
    )
    step1 = jnp.int32(io[f"{name}.step"])
    # DINO sees canvases < 224 (no crop); LPIPS dropout 0
    keys = tuple(jax.random.split(jax.random.key(0), 7))
    recon2 = jnp.asarray(pad(recon))
    g_loss, g, disc_stats = losses.image_losses(
        heads, frozen, recon2, jnp.asarray(target2), weight, step1, keys[:3]
    )
    lecam0 = gan.LeCAMState(*(jnp.float32(v) for v in t["lecam_init"]))
    d_loss, (lecam, variables, d) = losses.disc_loss(
        heads["params"],
        dict(heads, **disc_stats),
        frozen,
        recon2,
        jnp.asarray(target2),
        weight,
        step1,
        lecam0,
        keys[3:],
    )
    assert not augmented  # five DiffAugment calls, as in the official loss

    expected = {
        "mse": io[f"{name}.mse"],
        "lpips": np.mean(io[f"{name}.lpips"]),
        "g_adv": io[f"{name}.g_adv"],
        "generator loss": io[f"{name}.loss_gen"],
        "d_hinge": io[f"{name}.d_hinge"],
        "d_lecam": io[f"{name}.d_lecam"],
        "d_cr": io[f"{name}.d_cr"],
        "logits_real": np.mean(io[f"{name}.d_logits_real"]),
        "logits_fake": np.mean(io[f"{name}.d_logits_fake"]),
        "discriminator loss": io[f"{name}.loss_disc"],
    }
    got = {**g, "generator loss": g_loss, **d, "discriminator loss": d_loss}
    for term, ref in expected.items():
        assert_term(got[term], ref, term)
    assert_term(np.array([lecam.real_ema, lecam.fake_ema]), io[f"{name}.lecam_after"], "LeCAM EMAs")
    # The state after the five train-mode calls: each ran a power iteration and a BatchNorm update.
    stats = variables["batch_stats"]
    for h in range(len(stats)):
        for src, dst in SN_CONVS.items():
            for vec in ("u", "v"):
                assert_term(
                    stats[f"head_{h}"][dst][vec],
                    io[f"{name}.heads_after.{h}.{src}.weight_{vec}"],
                    f"head {h} {dst} {vec}",
                )
        for src, dst in NORMS.items():
            assert_term(
                stats[f"head_{h}"][dst]["mean"],
                io[f"{name}.heads_after.{h}.{src}.running_mean"],
                f"head {h} {dst} running mean",
            )
