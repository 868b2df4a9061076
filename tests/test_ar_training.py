"""AR training: the self-correction mix, the EMA recurrence, gradient accumulation, the code reader,
and resume after a preemption equal to the uninterrupted run. Codes are synthetic (written directly,
no tokenizer)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import unbox as flax_unbox

from configs import ar_fashion_mnist
from detailflow_jax import config_lib, optim, sharding
from detailflow_jax.ar import model as gpt_model
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.data import codes as codes_lib
from detailflow_jax.train import ar as ar_train
from detailflow_jax.train.ar_step import make_ar_step, self_correction_mix, split_micro_batches
from float_tolerance import assert_same_updates, plain_sgd, reorder_tolerance

N, G, C, K, CLASSES, VIEWS = 32, 4, 4, 64, 10, 2


def write_codes(directory, num_images=40, chunk_size=16, seed=0):
    """A codes directory of random [clean, sc_input, sc_label] sequences, as the extraction command
    writes it."""
    rng = np.random.default_rng(seed)
    num_chunks = -(-num_images // chunk_size)
    meta = codes_lib.CodesMetadata(
        num_tokens=N,
        group_size=G,
        causal_num=C,
        codebook_size=K,
        views=VIEWS,
        view_mode="center_flip",
        num_images=num_images,
        num_classes=CLASSES,
        class_names=[str(i) for i in range(CLASSES)],
        image_size=32,
        chunk_size=chunk_size,
        num_chunks=num_chunks,
        seed=0,
        tokenizer={"path": "", "model": {}},
        data={},
        split="train",
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / codes_lib.METADATA_FILE).write_text(meta.to_json())
    for chunk in range(num_chunks):
        writer = codes_lib.ChunkWriter(str(directory), chunk, num_chunks)
        for i in range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_images)):
            writer.write(i, i % CLASSES, rng.integers(0, K, (VIEWS, N, 3)))
        writer.commit()
    return meta


def tiny_config(codes_dir, **overrides):
    config = ar_fashion_mnist.get_config("smoke")
    config.codes_dir = str(codes_dir)
    config.data_threads = 1
    return config_lib.override(config, **overrides)


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("codes")
    write_codes(directory)
    return directory


def test_self_correction_mix_picks_inputs_and_targets_per_sample():
    # clean 1, in 2, label 3
    codes = np.stack([np.full((3, N), 1), np.full((3, N), 2), np.full((3, N), 3)], axis=-1)
    codes = codes + 10 * np.arange(3)[:, None, None]  # make rows distinguishable
    use = np.array([True, False, True])
    inputs, targets = self_correction_mix(jnp.asarray(codes), jnp.asarray(use), G)
    assert inputs.shape == (3, N - G) and targets.shape == (3, N)
    for b in range(3):
        np.testing.assert_array_equal(inputs[b], codes[b, :N - G, 1 if use[b] else 0])
        np.testing.assert_array_equal(targets[b], codes[b, :, 2 if use[b] else 0])


def test_micro_batches_take_every_nth_row():
    x = np.arange(8)
    np.testing.assert_array_equal(
        split_micro_batches(jnp.asarray(x), 2), [[0, 2, 4, 6], [1, 3, 5, 7]]
    )


def test_code_reader_batches_shuffles_and_picks_views(codes_dir):
    meta, files = codes_lib.open_codes(str(codes_dir))
    assert len(files) == 3 and meta.views == VIEWS
    stream = codes_lib.make_code_iter(str(codes_dir), 8, seed=1, num_threads=1)
    batches = [next(stream) for _ in range(10)]  # two epochs of 40
    stream.close()
    assert batches[0]["codes"].shape == (8, N, 3) and batches[0]["codes"].dtype == np.int16
    # Each epoch is a permutation of the 40 images (labels i % 10 -> every class 4 times).
    for epoch in (batches[:5], batches[5:]):
        labels = np.concatenate([b["label"] for b in epoch])
        np.testing.assert_array_equal(np.bincount(labels, minlength=CLASSES), np.full(CLASSES, 4))
    # Both views occur: compare each sample with the two stored views of its image.
    records = {}
    for path in files:
        from array_record.python.array_record_module import ArrayRecordReader
        reader = ArrayRecordReader(path)
        for data in reader.read_all():
            index, label, codes = codes_lib.decode_record(data, VIEWS, N)
            records[codes[0].tobytes()] = 0
            records[codes[1].tobytes()] = 1
    picked = [records[c.tobytes()] for b in batches for c in b["codes"]]
    assert 0 < np.mean(picked) < 1


def test_incomplete_codes_directory_says_how_to_finish(tmp_path):
    write_codes(tmp_path, num_images=20, chunk_size=8)
    (tmp_path / "codes-00001-of-00003.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="rerun the extraction"):
        codes_lib.open_codes(str(tmp_path))


def test_ema_follows_the_recurrence_and_grad_accum_matches_full_batch(codes_dir, monkeypatch):
    # No randomness (dropouts and the mix off), so one batch split in two micro-batches gives the
    # same update, up to summation order: plain SGD keeps that difference at float32 size
    # (tests/float_tolerance.py).
    monkeypatch.setattr(optim, "adamw", plain_sgd())
    overrides = {
        "model.token_dropout": 0.0,
        "model.resid_dropout": 0.0,
        "model.ffn_dropout": 0.0,
        "model.class_dropout": 0.0,
        "correction_prob": 0.0,
        "ema_decay": 0.5,
        "total_steps": 10,
    }
    mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
    rng = np.random.default_rng(0)
    batches = [{"codes": rng.integers(0, K, (8, N, 3)).astype(np.int16),
                "label": rng.integers(0, CLASSES, 8).astype(np.int32)} for _ in range(3)]
    runs = {}
    for accum in (1, 2):
        program = make_ar_step(tiny_config(codes_dir, grad_accum=accum, **overrides), mesh)
        state, fn = program.init(0), program.step
        params_seen = [jax.device_get(state["params"])]
        losses = []
        for batch in batches:
            state, metrics = fn(state, batch)
            params_seen.append(jax.device_get(state["params"]))
            losses.append(float(metrics["loss"]))
        runs[accum] = (params_seen, jax.device_get(state["ema"]), losses)

    params_seen, ema, _ = runs[1]
    expected = params_seen[0]
    for p in params_seen[1:]:
        expected = jax.tree.map(lambda e, x: 0.5 * e + 0.5 * x, expected, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ema, expected)
    assert not np.allclose(params_seen[-1]["output"]["kernel"], params_seen[0]["output"]["kernel"])

    (p1, ema1, loss1), (p2, ema2, loss2) = runs[1], runs[2]
    jax.tree.map(np.testing.assert_array_equal, p1[0], p2[0])
    # the cross-entropy of every position of the batch, each over the vocabulary
    num_terms = 8 * N * K
    np.testing.assert_allclose(loss1, loss2, rtol=reorder_tolerance(num_terms, 1.0))
    assert_same_updates(p1[0], p1[-1], p2[-1], num_terms)
    assert_same_updates(p1[0], ema1, ema2, num_terms)


def test_resume_after_preemption_equals_uninterrupted_run(codes_dir, tmp_path):
    config = tiny_config(codes_dir, total_steps=6, checkpoint_every=100)
    uninterrupted = jax.device_get(ar_train.train(config, str(tmp_path / "a"), samples=False))
    stopped = ar_train.train(config, str(tmp_path / "b"), stop_at=3, samples=False)
    assert int(stopped["step"]) == 3
    resumed = jax.device_get(ar_train.train(config, str(tmp_path / "b"), samples=False))
    assert int(resumed["step"]) == 6
    for key in ("params", "ema", "opt"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            uninterrupted[key],
            resumed[key],
        )
    # Same data order: the logged losses of the resumed run match step for step.
    logs = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in "ab"
    ]
    losses = [{row["step"]: row["loss"] for row in rows} for rows in logs]
    assert set(losses[0]) == set(losses[1]) == {3, 6}
    for step in (3, 6):
        np.testing.assert_allclose(losses[0][step], losses[1][step], rtol=1e-6)


def test_config_must_match_the_codes(codes_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size"):
        ar_train.train(tiny_config(codes_dir, **{"model.vocab_size": 128}), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="batch_size"):
        ar_train.train(tiny_config(codes_dir, batch_size=8, grad_accum=2), str(tmp_path / "b"))


def compile_step_log(codes_dir: str, gather: bool) -> None:
    """Compiles the AR step on a (2, 2, 2) mesh (8 CPU devices); with ``gather`` the embeddings are
    looked up by gathers. Run in a fresh process (see below): XLA's warnings land on its stderr."""
    if gather:
        gpt_model._lookup = lambda table, ids, train: table(ids)
    program = make_ar_step(tiny_config(codes_dir), sharding.make_mesh((2, 2, 2)))
    batch = {"codes": np.zeros((8, N, 3), np.int16), "label": np.zeros((8,), np.int32)}
    program.step.lower(program.init(0), batch).compile()


def test_sharded_step_partitions_without_replicating_activations(codes_dir):
    """On a (data, fsdp, tensor) = (2, 2, 2) mesh the training step compiles without XLA's
    "involuntary full rematerialization" (a tensor replicated on every device to reshard it). The
    control — the same step with gather-based embedding lookups — shows that the check sees one: the
    gathers' cotangents get replicated.

    Each compile runs in a new process: this one shares a disk compilation cache (a hit skips the
    partitioner and its warnings) and XLA may not repeat a warning."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        JAX_ENABLE_COMPILATION_CACHE="false",
        PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]),
    )
    logs = {}
    for gather in (False, True):
        code = f"import test_ar_training as t; t.compile_step_log({str(codes_dir)!r}, {gather})"
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        logs[gather] = done.stderr
    assert "Involuntary full rematerialization" in logs[True]
    assert "Involuntary full rematerialization" not in logs[False], logs[False][-2000:]


def test_training_lookup_equals_the_gather():
    """The one-hot embedding of training mode gives the gather's values (dropouts off)."""
    GPT, GPTConfig, init_params = gpt_model.GPT, gpt_model.GPTConfig, gpt_model.init_params
    cfg = GPTConfig(
        dim=32,
        n_layer=1,
        n_head=2,
        num_tokens=16,
        group_size=4,
        causal_num=4,
        vocab_size=40,
        num_classes=5,
        multiple_of=16,
        token_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
        class_dropout=0.0,
    )
    model = GPT(cfg)
    params = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(1), x.shape),
                          flax_unbox(init_params(model, jax.random.key(0))))
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, cfg.vocab_size)
    labels = jnp.array([0, 5, 2])  # 5 = the null class row
    run = lambda train: model.apply({"params": params}, tokens, labels, train,  # noqa: E731
                                    rngs={"dropout": jax.random.key(3)})
    np.testing.assert_allclose(run(True), run(False), rtol=1e-6, atol=1e-6)
