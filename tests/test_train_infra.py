"""Checkpointing (state + grain iterator, resharding), schedules and the optimiser masks."""

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from detailflow_jax import optim, sharding
from detailflow_jax.ar.model import GPT, GPTConfig, init_params, unstack_layers
from detailflow_jax.checkpoint import Checkpointer
from detailflow_jax.train.metrics import NonFiniteLossError, check_finite
from test_gpt_model import TINY


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())


def test_checkpoint_restores_state_and_data_order_onto_another_mesh(tmp_path):
    mesh_a = sharding.make_mesh((2, 4, 1))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh_a, P("data", "fsdp")))
    state = {"w": w, "step": jnp.int32(7)}
    it = _iterator()
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, state, it)
    ckpt.wait()
    expected_next = [next(it).tolist() for _ in range(2)]

    mesh_b = sharding.make_mesh((1, 1, 8))
    target = {
        "w": jax.ShapeDtypeStruct(
            (8, 8), jnp.float32, sharding=NamedSharding(mesh_b, P(None, "tensor"))
        ),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh_b, P())),
    }
    fresh = _iterator()
    restored = Checkpointer(str(tmp_path / "ckpt")).restore(target, fresh)
    np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8))
    assert restored["w"].sharding.spec == P(None, "tensor")
    assert int(restored["step"]) == 7
    assert [next(fresh).tolist() for _ in range(2)] == expected_next
    ckpt.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore({"x": jnp.zeros(2)})


def test_tokenizer_schedule_matches_timm_formula():
    s = optim.tokenizer_schedule(
        optim.ResolvedSchedule(
            lr=1e-4,
            min_lr=1e-5,
            warmup_lr=1e-5,
            warmup_steps=10,
            total_steps=100,
            steps_per_epoch=10,
        )
    )
    assert np.isclose(s(0), 1e-5) and np.isclose(s(5), 1e-5 + 5 * 9e-5 / 10)
    # After warm-up the cosine runs over the whole run (not offset by the warm-up).
    assert np.isclose(s(50), 1e-5 + 0.5 * 9e-5 * (1 + np.cos(np.pi * 0.5)))
    assert np.isclose(s(100), 1e-5)


def test_ar_schedule_endpoints():
    s = optim.ar_schedule(
        optim.ResolvedSchedule(
            lr=1e-4,
            min_lr=1e-6,
            warmup_lr=5e-7,
            warmup_steps=50,
            total_steps=1000,
            steps_per_epoch=10,
        )
    )
    assert np.isclose(s(0), 5e-7) and np.isclose(s(50), 1e-4) and np.isclose(s(1000), 1e-6)


def test_adamw_decays_only_matrices():
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    tx = optim.adamw(lambda _: 1.0, weight_decay=0.5, clip_norm=None)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 0.5)  # zero gradient: only weight decay moves it
    np.testing.assert_allclose(new["scale"], 1.0)


def test_adamw_decays_the_same_parameters_with_scanned_layers():
    """A scan_layers GPT stacks each layer's RMSNorm scale to (L, D): it must stay undecayed, as
    unrolled."""
    tiny = TINY
    tx = optim.adamw(lambda _: 1.0, weight_decay=0.5, clip_norm=None)

    def decayed(scan_layers):
        """{parameter path: moved by weight decay under a zero gradient}, per layer."""
        params = nn.unbox(
            init_params(GPT(GPTConfig(**tiny, scan_layers=scan_layers)), jax.random.key(0))
        )
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        moved = jax.tree.map(lambda u: u != 0, updates)
        moved = unstack_layers(moved, tiny["n_layer"]) if scan_layers else moved
        return {
            jax.tree_util.keystr(k): bool(np.any(v))
            for k, v in jax.tree_util.tree_leaves_with_path(moved)
        }

    flat_u, flat_s = decayed(False), decayed(True)
    assert flat_s == flat_u
    assert not flat_s["['layers_0']['attention_norm']['scale']"]
    assert flat_s["['layers_0']['attention']['wqkv']['kernel']"]


def test_non_finite_guard_names_the_metric():
    check_finite(3, {"loss": 1.0}, 2)
    with pytest.raises(NonFiniteLossError, match=r"step 4.*'loss'.*step 2\) is intact"):
        check_finite(4, {"loss": float("nan")}, 2)
