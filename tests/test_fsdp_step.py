"""The FSDP train step shards what FSDP should: parameters and optimizer state over the fsdp axis,
activations over the batch (sharding rules from the config), gradients reduce-scattered; and the
GPT's remat policy is the config's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import ar_fashion_mnist, tokenizer_fashion_mnist
from detailflow_jax import sharding
from detailflow_jax.ar import model as gpt_model
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.preflight import __main__ as preflight
from detailflow_jax.preflight import programs
from detailflow_jax.train.ar_step import make_ar_step
from detailflow_jax.train.tokenizer_step import abstract_frozen, make_tokenizer_step
from float_tolerance import reorder_tolerance
from test_preflight import TINY_AR, _cli, _json_line, needs_libtpu

# A vocabulary large next to the width: the (batch, length, vocab) logits dwarf every weight, so a
# step that moves activations instead of weights shows in the numbers.
WIDE_VOCAB = dict(vocab_size=512)


def _config(mesh, **rules):
    config = ar_fashion_mnist.get_config("smoke")
    config.model.update(WIDE_VOCAB)
    config.batch_size = 16
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.sharding_rules.update(rules)
    return config


def test_fsdp_step_moves_weights_not_activations():
    """Against the data-parallel step on the same 8 devices: FSDP may add the all-gathers of the
    weights, but not temporaries or an all-reduce bigger than the gradients (which data parallelism
    all-reduces whole; a few metric scalars aside). Before the activations were pinned, the
    partitioner sharded them over embed like the weights and all-reduced (batch, length, vocab)
    cotangents: 5.8x the temporaries and 6.5x the all-reduced bytes."""
    fsdp, data = (preflight.run(_config(mesh), "cpu:8") for mesh in ((1, 8, 1), (8, 1, 1)))
    assert fsdp["temp_bytes"] <= 2 * data["temp_bytes"], (fsdp["temp_bytes"], data["temp_bytes"])
    summed = lambda r: r["collectives"]["all-reduce"]["bytes"]  # noqa: E731
    assert summed(fsdp) <= 1.1 * summed(data), (summed(fsdp), summed(data))  # + a few scalars
    assert fsdp["bytes_accessed_per_chip"] <= data["bytes_accessed_per_chip"]


@needs_libtpu
def test_fsdp_gradients_are_reduce_scattered_on_tpu():
    """XLA:TPU writes a reduce-scatter as an all-reduce-scatter fusion; the preflight counts those.
    What is left all-reduced is the loss, the metrics and the gradients of the few small replicated
    parameters (before the fix: every gradient, 7x their size)."""
    result = _cli(
        TINY_AR
        + [
            "--config.model.vocab_size=512",
            "--config.batch_size=16",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=4",
        ],
        "v5e:2x2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = _json_line(result.stdout)
    collectives = report["collectives"]
    assert collectives["reduce-scatter"]["count"] >= 1, collectives
    params = make_ar_step(_config((8, 1, 1)), sharding.make_mesh((8, 1, 1))).abstract_state[
        "params"
    ]
    gradient_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert collectives["all-reduce"]["bytes"] < gradient_bytes / 10, (collectives, gradient_bytes)


def test_config_sharding_rules_place_the_state():
    mesh = sharding.make_mesh((1, 8, 1))
    specs = lambda config: jax.tree.map(lambda x: x.sharding.spec,  # noqa: E731
                                        make_ar_step(config, mesh).abstract_state["params"])
    default = specs(_config((1, 8, 1)))
    assert default["output"]["kernel"] == P("fsdp", "tensor")
    replicated = specs(_config((1, 8, 1), embed=()))
    assert replicated["output"]["kernel"] == P(None, "tensor")
    assert all(
        spec == P() or "fsdp" not in jax.tree.leaves(tuple(spec))
        for spec in jax.tree.leaves(replicated, is_leaf=lambda x: isinstance(x, P))
    )


def pinned(text: str, spec: str) -> int:
    """How many sharding constraints of the lowered ``text`` mention ``spec``."""
    return sum("sharding_constraint" in line and spec in line for line in text.splitlines())


def test_config_sharding_rules_reach_the_activations():
    """The step traces with the config's rules: activations pinned to the data axis only on a (2, 4,
    1) mesh show up as sharding constraints over "data" alone in the lowered step."""
    mesh = sharding.make_mesh((2, 4, 1))

    def lowered(**rules):
        program = make_ar_step(_config((2, 4, 1), **rules), mesh)
        state = program.abstract_state
        batch = {
            "codes": jax.ShapeDtypeStruct(
                (16, program.model_cfg.num_tokens, 3),
                jnp.int16,
                sharding=sharding.batch_sharding(mesh, 3),
            ),
            "label": jax.ShapeDtypeStruct(
                (16,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1)
            ),
        }
        return program.step.lower(state, batch).as_text()

    both, data_only = lowered(), lowered(activation_batch=("data",))
    assert pinned(both, '{"data", "fsdp"}') > 0 and pinned(data_only, '{"data", "fsdp"}') == 0
    assert pinned(data_only, '[{"data"}') > 0


def test_sharding_rules_config_round_trips_and_names_bad_axes():
    config = _config((8, 1, 1))
    assert dict(sharding.rules_from_config(config)) == dict(sharding.DEFAULT_RULES)
    config.sharding_rules.embed = ("fsdp", "model")
    with pytest.raises(sharding.MeshError, match="sharding_rules.embed.*'model'.*not mesh axes"):
        sharding.rules_from_config(config)


def _tiny_gpt(**overrides):
    cfg = gpt_model.GPTConfig(
        dim=32,
        n_layer=2,
        n_head=2,
        num_tokens=16,
        group_size=4,
        causal_num=4,
        vocab_size=40,
        num_classes=5,
        multiple_of=16,
        **overrides,
    )
    model = gpt_model.GPT(cfg)
    params = nn.unbox(gpt_model.init_params(model, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    labels = jnp.array([0, 3])

    def loss(p):
        return jnp.mean(
            model.apply({"params": p}, tokens, labels, True, rngs={"dropout": jax.random.key(2)})
            ** 2
        )

    assert cfg.ffn_dim == 96
    return loss, params


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from _equations(getattr(sub, "jaxpr", sub))


@pytest.mark.parametrize("policy", sorted(gpt_model.REMAT_POLICIES))
def test_remat_policy_is_the_configs_and_keeps_the_gradients(policy):
    loss, params = _tiny_gpt(remat=True, remat_policy=policy)
    policies = {
        eqn.params["policy"]
        for eqn in _equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        if eqn.primitive.name in ("checkpoint", "remat2")
    }
    assert policies == {gpt_model.REMAT_POLICIES[policy]}
    plain_loss, _ = _tiny_gpt()
    # The same float32 operations, recomputed or kept; fused differently, a sum may run in another
    # order: over at most tokens x ffn_dim terms (a weight gradient sums tokens, a hidden unit's
    # gradient sums dims).
    remat_grads, plain_grads = (
        jax.jit(jax.grad(loss))(params),
        jax.jit(jax.grad(plain_loss))(params),
    )
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads))
    atol = reorder_tolerance(2 * 16 * 96, scale)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), remat_grads, plain_grads
    )


def test_unknown_remat_policy_names_the_choices():
    with pytest.raises(ConfigError, match="remat_policy.*dots_saveable"):
        gpt_model.GPTConfig(remat_policy="minimal").validate()


def _tokenizer_config(mesh, **rules):
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.batch_size = 16
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    config.sharding_rules.update(rules)
    return config


def test_tokenizer_fsdp_step_moves_weights_not_activations():
    """As for the GPT: the FSDP tokenizer step may add the weights' all-gathers, but neither
    temporaries nor all-reduced bytes beyond the data-parallel step's. Before the ViT blocks, the
    patch embedding, the latent queries, the decoder canvas and the quantizer's inputs were pinned,
    the partitioner sharded the activations over embed like the weights and all-reduced them: 3.4x
    the temporaries and 21x the all-reduced bytes."""
    fsdp, data = (
        preflight.run(_tokenizer_config(mesh), "cpu:8") for mesh in ((1, 8, 1), (8, 1, 1))
    )
    assert fsdp["temp_bytes"] <= 1.5 * data["temp_bytes"], (fsdp["temp_bytes"], data["temp_bytes"])
    summed = lambda r: r["collectives"]["all-reduce"]["bytes"]  # noqa: E731
    assert summed(fsdp) <= 1.1 * summed(data), (summed(fsdp), summed(data))  # + a few scalars
    assert fsdp["bytes_accessed_per_chip"] <= data["bytes_accessed_per_chip"]


def test_tokenizer_step_traces_with_the_config_rules():
    """The tokenizer step traces under the mesh and the config's rules, as the AR step does: the
    pinned activations show up as sharding constraints over the batch axes, over "data" alone when
    the config says so."""
    mesh = sharding.make_mesh((2, 4, 1))

    def lowered(**rules):
        prog = programs.tokenizer_train(_tokenizer_config((2, 4, 1), **rules), mesh)
        return prog.jitted.lower(*prog.args).as_text()

    both, data_only = lowered(), lowered(activation_batch=("data",))
    assert pinned(both, '[{"data", "fsdp"}') > 0 and pinned(data_only, '{"data", "fsdp"}') == 0
    assert pinned(data_only, '[{"data"}') > 0


def test_tokenizer_state_follows_the_config_sharding_rules():
    mesh = sharding.make_mesh((1, 8, 1))

    def axes(**rules):
        config = tokenizer_fashion_mnist.get_config("smoke")
        config.sharding_rules.update(rules)
        state = make_tokenizer_step(config, mesh, abstract_frozen(config)).abstract_state
        return {
            a
            for x in jax.tree.leaves(state["params"])
            for a in jax.tree.leaves(tuple(x.sharding.spec))
        }

    assert "fsdp" in axes() and "fsdp" not in axes(embed=())
