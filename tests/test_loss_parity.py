"""Loss-level parity with the official training code (fixture: tests/fixtures/losses_small/, made by
tests/fixtures/make_loss_parity.py): the same inputs and the same random decisions give the same loss terms."""

import json

import jax
import numpy as np
import pytest

from configs import ar_fashion_mnist
from detailflow_jax import config_lib, sharding
from detailflow_jax.convert.gpt import load_gpt_checkpoint
from detailflow_jax.train.ar_step import ARStep
from float_tolerance import F32_EPS

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def folder(repo_fixtures):
    return repo_fixtures / "losses_small"


def ar_trainer(c):
    """The AR trainer at the fixture's sizes, dropout rates 0 (the fixture pins the class drops instead)."""
    g = c["gpt"]
    config = config_lib.override(
        ar_fashion_mnist.get_config("smoke"), correction_prob=c["correction_prob"],
        **{f"model.{k}": v for k, v in dict(
            dim=g["dim"], n_layer=g["layers"], n_head=g["heads"], multiple_of=g["multiple_of"],
            num_classes=g["num_classes"], num_tokens=c["num_latent_tokens"], group_size=c["group_size"],
            causal_num=c["causal_num"], vocab_size=c["codebook_size"], class_dropout=0.0, token_dropout=0.0,
            resid_dropout=0.0, ffn_dropout=0.0).items()})
    return ARStep(config, sharding.make_mesh((-1, 1, 1)))


def test_ar_loss_matches_train_c2i(folder):
    c = json.loads((folder / "config.json").read_text())
    io = np.load(folder / "ar_loss_io.npz")
    trainer = ar_trainer(c)
    params = load_gpt_checkpoint(str(folder / "gpt_state_dict_fp16.npz"), trainer.model_cfg)
    use, dropped = io["use_corrected"], io["class_dropped"]
    assert 0 < use.sum() < len(use) and 0 < dropped.sum() < len(dropped)  # both outcomes of both draws
    # A dropped class is the null class (row num_classes), which is what the official token_drop substitutes.
    labels = np.where(dropped, c["gpt"]["num_classes"], io["labels"])
    loss, _ = jax.jit(trainer.loss_given)(params, io["codes"], labels, use, jax.random.key(0))
    # The official loss is a mean over B x N cross-entropies whose logits come out of float32 matmuls of length
    # at most the MLP width; each of those agrees within n * eps relative, and a mean does not amplify it.
    n = trainer.model_cfg.ffn_dim
    np.testing.assert_allclose(float(loss), float(io["loss"]), rtol=2 * n * F32_EPS, atol=0)
