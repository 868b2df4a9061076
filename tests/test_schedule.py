"""The lr and the schedule lengths follow the global batch and the dataset size, as in the official
trainers, without the config being changed; explicit step counts win."""

import copy

import numpy as np
import pytest

from configs import ar_fashion_mnist, ar_imagenet, tokenizer_fashion_mnist, tokenizer_imagenet
from detailflow_jax import optim
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.preflight.programs import stand_in_schedule

IMAGENET_TRAIN = 1_281_167


def _tokenizer(batch, **overrides):
    config = tokenizer_imagenet.get_config("DF-16")
    config.batch_size = batch
    config.update(overrides)
    return config


def test_imagenet_tokenizer_scales_lr_and_counts_epochs_with_the_batch():
    at_256 = optim.resolve_tokenizer_schedule(_tokenizer(256), IMAGENET_TRAIN)
    at_512 = optim.resolve_tokenizer_schedule(_tokenizer(512), IMAGENET_TRAIN)
    # train_tokenizer.py: lr x B/256, min lr 0.1x that, 1 warm-up epoch, 250 epochs of len(loader) =
    # N // B steps.
    assert (at_256.steps_per_epoch, at_512.steps_per_epoch) == (5_004, 2_502)
    assert (at_256.warmup_steps, at_256.total_steps) == (5_004, 1_251_000)
    assert (at_512.warmup_steps, at_512.total_steps) == (2_502, 625_500)
    assert np.isclose(at_256.lr, 1e-4) and np.isclose(at_512.lr, 2e-4)
    assert np.isclose(at_256.min_lr, 1e-5) and np.isclose(at_512.min_lr, 2e-5)
    # timm's warmup_lr_init is absolute, not scaled
    assert at_256.warmup_lr == at_512.warmup_lr == 1e-5


def test_the_schedule_function_follows_the_resolved_numbers():
    s = optim.resolve_tokenizer_schedule(_tokenizer(512), IMAGENET_TRAIN)
    lr = optim.tokenizer_schedule(s)
    assert np.isclose(lr(0), 1e-5)
    assert np.isclose(
        lr(s.warmup_steps),
        s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + np.cos(np.pi * 2_502 / 625_500)),
        rtol=1e-6,
    )
    assert np.isclose(lr(s.total_steps), 2e-5, rtol=1e-6)


def test_resolving_does_not_change_the_config():
    for config, resolve, size in (
        (_tokenizer(512), optim.resolve_tokenizer_schedule, IMAGENET_TRAIN),
        (ar_imagenet.get_config("N=128,batch=512"), optim.resolve_ar_schedule, IMAGENET_TRAIN),
    ):
        before = copy.deepcopy(config.to_dict())
        resolve(config, size)
        assert config.to_dict() == before


def test_explicit_step_counts_override_the_epochs():
    s = optim.resolve_tokenizer_schedule(_tokenizer(512, total_steps=1_000), IMAGENET_TRAIN)
    assert (s.total_steps, s.warmup_steps, s.steps_per_epoch) == (1_000, 2_502, 2_502)
    config = _tokenizer(512, total_steps=1_000)
    config.optim.warmup_steps = 0  # 0 is "no warm-up", not "derive"
    s = optim.resolve_tokenizer_schedule(config, IMAGENET_TRAIN)
    assert (s.total_steps, s.warmup_steps) == (1_000, 0)
    assert float(optim.tokenizer_schedule(s)(0)) == pytest.approx(s.lr)


def test_epochs_need_the_dataset_size_and_say_so():
    with pytest.raises(ConfigError, match="total_steps is derived from epochs.*not known"):
        optim.resolve_tokenizer_schedule(_tokenizer(256), None)
    with pytest.raises(ConfigError, match=r"dataset size \(100\) holds no full batch"):
        optim.resolve_tokenizer_schedule(_tokenizer(256), 100)


def test_imagenet_ar_keeps_the_lr_and_counts_epochs_with_the_batch():
    # train_c2i.py: no lr scaling, 300 epochs of N // B steps, int(5%) warm-up from 0.005 lr, cosine
    # to 0.01 lr.
    for batch, per_epoch in ((256, 5_004), (512, 2_502)):
        s = optim.resolve_ar_schedule(
            ar_imagenet.get_config(f"N=128,batch={batch}"), IMAGENET_TRAIN
        )
        assert (s.steps_per_epoch, s.total_steps) == (per_epoch, 300 * per_epoch)
        assert s.warmup_steps == int(0.05 * 300 * per_epoch)
        assert (
            np.isclose(s.lr, 1e-4) and np.isclose(s.min_lr, 1e-6) and np.isclose(s.warmup_lr, 5e-7)
        )


def test_fashion_mnist_recipes_resolve_to_their_stated_numbers():
    tok = optim.resolve_tokenizer_schedule(tokenizer_fashion_mnist.get_config(), 60_000)
    assert (tok.total_steps, tok.warmup_steps, tok.steps_per_epoch) == (4000, 200, 3750)
    assert np.isclose(tok.lr, 2e-3) and np.isclose(tok.min_lr, 2e-4) and tok.warmup_lr == 1e-5
    # one record per extracted image
    ar = optim.resolve_ar_schedule(ar_fashion_mnist.get_config(), 20_000)
    assert (ar.total_steps, ar.warmup_steps) == (2_000, 100)
    assert (
        np.isclose(ar.lr, 1e-3) and np.isclose(ar.min_lr, 1e-5) and np.isclose(ar.warmup_lr, 5e-6)
    )
    # The explicit counts need no dataset size (tests and tools build the steps without data).
    assert (
        optim.resolve_tokenizer_schedule(tokenizer_fashion_mnist.get_config(), None).total_steps
        == 4000
    )


def test_the_preflight_stand_in_resolves_every_recipe_without_data():
    s = stand_in_schedule(optim.resolve_tokenizer_schedule, _tokenizer(256))
    assert (s.steps_per_epoch, s.total_steps) == (1, 250)
