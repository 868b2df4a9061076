"""End to end on a tiny tokenizer and GPT: extraction -> AR training (with its sample grids) -> the
sampling command (PNG grid with one row per class, coarse-to-fine strip, ADM npz), EMA weights by
default, converted directories."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import ar_fashion_mnist, tokenizer_fashion_mnist
from detailflow_jax import sharding
from detailflow_jax.data.codes import read_metadata
from detailflow_jax.eval.sample import load_generator, sample
from detailflow_jax.inference import pictures
from detailflow_jax.inference.weights import load_gpt
from detailflow_jax.params_io import restore_params, save_params
from detailflow_jax.tokenizer.extract import extract_codes
from detailflow_jax.tokenizer.model import init_params
from detailflow_jax.tokenizer.resolution import ResolutionTables
from detailflow_jax.train import ar as ar_train

TOKENIZER_CONFIG = "configs/tokenizer_fashion_mnist.py:smoke"
GPT_CONFIG = "configs/gpt.py:tiny,K=64"  # the GPT of configs/ar_fashion_mnist.py:smoke


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tok_params = init_params(tokenizer_fashion_mnist.get_config("smoke").model, jax.random.key(0))
    tokenizer = save_params(root / "tok", tok_params)
    config = ar_fashion_mnist.get_config("smoke")
    config.update(total_steps=2, sample_every=0, checkpoint_every=2, data_threads=1)
    extract_codes(config, tokenizer, str(root / "codes"), TOKENIZER_CONFIG)
    config.codes_dir = str(root / "codes")
    state = jax.device_get(ar_train.train(config, str(root / "ar")))
    return root, state


def test_training_writes_class_grids_from_the_ema_weights(trained):
    root, state = trained
    grid = Image.open(root / "ar" / "images" / "samples_2.png")
    # smoke: 1 sample per class, 10 classes of 32 px shown at 128, rows labelled with the codes'
    # class names
    names = read_metadata(str(root / "codes")).class_names
    layout = pictures.grid_layout(10, 1, 128, pictures.class_labels(range(10), names))
    assert grid.size == (layout.width, layout.height)
    assert (root / "ar" / "images" / "coarse_to_fine_2.png").is_file()
    counts = ResolutionTables.from_model_config(
        tokenizer_fashion_mnist.get_config("smoke").model
    ).token_counts
    # one per token count
    assert Image.open(root / "ar" / "images" / "samples_2.gif").n_frames == len(counts)
    mesh = sharding.make_mesh((-1, 1, 1))
    for ema, key in ((True, "ema"), (False, "params")):
        _, params, _ = load_gpt(str(root / "ar"), mesh, ema=ema)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), state[key])
    assert not np.array_equal(state["ema"]["output"]["kernel"], state["params"]["output"]["kernel"])


def test_sample_command_writes_grid_strip_and_adm_npz(trained):
    root, state = trained
    # Both from converted directories (the EMA weights exported as a bare parameter tree).
    gpt_dir = save_params(root / "gpt_ema", state["ema"])
    names = root / "names.txt"
    names.write_text("".join(f"garment {k}\n" for k in range(10)))
    paths = sample(
        gpt_dir,
        str(root / "samples"),
        tokenizer=str(root / "tok"),
        gpt_config=GPT_CONFIG,
        tokenizer_config=TOKENIZER_CONFIG,
        classes=[3, 1, 4],
        num_per_class=2,
        num_samples=11,
        npz=True,
        batch_size=8,
        cfg_scale=1.5,
        top_k=10,
        class_names_file=str(names),
    )
    grid = Image.open(paths["samples"])
    # the rows, in the order asked for, named from the file
    labels = ["garment 3", "garment 1", "garment 4"]
    layout = pictures.grid_layout(3, 2, 128, labels)
    assert grid.size == (layout.width, layout.height)
    strip = np.asarray(Image.open(paths["coarse_to_fine"]))
    # one row per class
    assert strip.shape[0] == pictures.grid_layout(3, 1, 128, labels, ["t = 1"]).height
    assert Image.open(paths["refinement"]).n_frames > 1
    with np.load(paths["npz"]) as data:
        assert data["arr_0"].shape == (11, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert data["labels"].shape == (11,) and data["labels"].max() < 10


def test_generator_from_the_ar_workdir_finds_its_tokenizer_and_settings(trained):
    root, _ = trained
    mesh = sharding.make_mesh((-1, 1, 1))
    generator, config = load_generator(str(root / "ar"), mesh, top_k=7)
    tok_params = restore_params(root / "tok")
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(generator.decoder.params), tok_params
    )
    assert (
        generator.settings.cfg_scale == config.sampling.cfg_scale and generator.settings.top_k == 7
    )


@pytest.mark.parametrize("args, message", [
    ([], "Flag --gpt must have a value"),
    (["--gpt", "/nonexistent", "--out", "/tmp/x", "--tokenizer", "/nonexistent"], "does not exist"),
])
def test_command_line_errors_are_one_line(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "detailflow_jax.eval.sample", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
