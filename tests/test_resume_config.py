"""A resume checks the work directory's config.json: other model settings are refused, other
changes listed."""

import logging
import os

import pytest

from configs import tokenizer_fashion_mnist
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.train import run_config


def trained_workdir(tmp_path, config):
    """A work directory as a trainer leaves it: config.json and one checkpoint step."""
    os.makedirs(tmp_path / "checkpoints" / "6")
    run_config.save(config, str(tmp_path))
    return str(tmp_path)


def test_other_model_settings_are_refused_naming_the_field_and_both_values(tmp_path):
    workdir = trained_workdir(tmp_path, tokenizer_fashion_mnist.get_config("smoke"))
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.model.encoder.width = 64
    refusal = r"trained with model\.encoder\.width=32, you asked for 64"
    with pytest.raises(ConfigError, match=refusal):
        run_config.check_resume(config, workdir)


def test_other_training_settings_are_listed_and_allowed(tmp_path, caplog):
    trained = tokenizer_fashion_mnist.get_config("smoke")
    workdir = trained_workdir(tmp_path, trained)
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.total_steps, config.optim.lr, config.model.remat = 9, trained.optim.lr / 4, True
    with caplog.at_level(logging.WARNING):
        diff = run_config.check_resume(config, workdir)
    assert diff == {
        "total_steps": (trained.total_steps, 9),
        "optim.lr": (trained.optim.lr, trained.optim.lr / 4),
        "model.remat": (trained.model.remat, True),
    }
    assert "total_steps 6 -> 9" in caplog.text


def test_a_work_directory_without_checkpoints_is_a_fresh_start(tmp_path):
    # Stopped before the first checkpoint: config.json without checkpoints.
    run_config.save(tokenizer_fashion_mnist.get_config("smoke"), str(tmp_path))
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.model.encoder.width = 64
    assert run_config.check_resume(config, str(tmp_path)) == {}
