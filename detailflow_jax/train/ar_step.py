"""The AR train step (docs/model.md#ar-training): teacher-forced cross-entropy with the 30%
self-correction mix, AdamW, EMA.

State (a plain pytree, checkpointed as is):
  step    int32, number of updates done
  rng     PRNG key data; the key of step s is ``fold_in(rng, s)`` (self-correction mix, class and
          token dropout)
  params  GPT parameters (param_dtype, float32 by default)
  opt     AdamW state (decay on parameters of rank >= 2 only), sharded like the parameters
  ema     exponential moving average of params (decay ``ema_decay`` every step, starts as a copy);
          sampling uses it

A batch is ``{"codes": int (B, N, 3) = [clean, sc_input, sc_label] of one view, "label": int
(B,)}``. Per sample, with probability ``correction_prob`` the input is ``sc_input[:, :N-g]`` and the
target ``sc_label``, else the clean sequence for both. With ``grad_accum = n`` the batch is split
into n micro-batches the MaxText way — (B, ...) -> (B/n, n, ...) -> swap the first two axes — so
every micro-batch keeps an even share of every device's rows; a ``lax.scan`` sums their gradients.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from detailflow_jax import optim, sharding
from detailflow_jax.ar.model import GPT, GPTConfig, init_params


def self_correction_mix(
    codes: jax.Array, use_corrected: jax.Array, group_size: int
) -> tuple[jax.Array, jax.Array]:
    """codes (B, N, 3), use_corrected (B,) bool -> inputs (B, N - g), targets (B, N) (official
    ``generate_z_input_target``)."""
    clean, sc_input, sc_label = codes[..., 0], codes[..., 1], codes[..., 2]
    pick = use_corrected[:, None]
    inputs = jnp.where(pick, sc_input, clean)[:, :codes.shape[1] - group_size]
    targets = jnp.where(pick, sc_label, clean)
    return inputs, targets


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params (official ``update_ema``), in the parameters'
    dtype."""
    return optax.incremental_update(params, ema, step_size=1.0 - decay)


def split_micro_batches(tree: Any, num: int) -> Any:
    """(B, ...) leaves -> (num, B / num, ...): micro-batch j holds rows j, j + num, ... of the
    batch."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


class ARProgram(NamedTuple):
    """Everything a GPT run needs, built once by ``make_ar_step``; every member is a pure function
    or a value."""

    model_cfg: GPTConfig
    init: Callable[[int], dict]  # seed -> the initial state, born sharded on the mesh
    abstract_state: Any  # the state's ShapeDtypeStructs with their shardings (restore target)
    state_shardings: Any
    step: Callable  # jitted (state, batch) -> (state, metrics); the state is donated
    # (params, codes, labels, use_corrected, dropout_key) -> (loss, {"accuracy"})
    loss_given: Callable
    lr: optax.Schedule


def make_ar_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 lr_schedule: optim.ResolvedSchedule | None = None) -> ARProgram:
    """The state's init and the jitted step of an AR training config. ``lr_schedule``: the run's
    step counts (``optim.resolve_ar_schedule``; None: from the config's explicit step counts
    alone)."""
    lr_schedule = lr_schedule or optim.resolve_ar_schedule(config, dataset_size=None)
    model_cfg = GPTConfig(**config.model.to_dict()).validate()
    model = GPT(model_cfg)
    rules = sharding.rules_from_config(config)
    lr = optim.ar_schedule(lr_schedule)
    tx = optim.adamw(
        lr, config.optim.weight_decay, config.optim.b1, config.optim.b2, config.optim.clip_norm
    )

    def init_state(rng: jax.Array) -> dict:
        k_model, k_state = jax.random.split(rng)
        params = init_params(model, k_model)
        return dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state), params=params,
                    opt=tx.init(params), ema=jax.tree.map(jnp.copy, params))

    def loss_given(params: Any, codes: jax.Array, labels: jax.Array, use_corrected: jax.Array,
                   dropout_key: jax.Array) -> tuple[jax.Array, dict]:
        """Mean cross-entropy over all B x N targets (float32 logits) and the token accuracy, with
        the self-correction decisions (B,) bool given; ``dropout_key`` drives class and token
        dropout (with the dropout rates at 0, pass the null class as the label to drop one)."""
        inputs, targets = self_correction_mix(
            codes.astype(jnp.int32), use_corrected, model_cfg.group_size
        )
        logits = model.apply(
            {"params": params}, inputs, labels, True, rngs={"dropout": dropout_key}
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
        return jnp.mean(ce), dict(accuracy=accuracy)

    def loss(params, codes, labels, key):
        k_mix, k_dropout = jax.random.split(key)
        use_corrected = jax.random.uniform(k_mix, labels.shape) < config.correction_prob
        return loss_given(params, codes, labels, use_corrected, k_dropout)

    def gradients(params, codes, labels, key):
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        n = config.grad_accum
        if n == 1:
            (value, aux), grads = grad_fn(params, codes, labels, key)
            return value, aux, grads
        micro = split_micro_batches((codes, labels), n)
        # micro-batch rows stay on their devices
        rows = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows), micro)

        def body(acc, xs):
            (codes_j, labels_j), j = xs
            (value, aux), grads = grad_fn(params, codes_j, labels_j, jax.random.fold_in(key, j))
            return jax.tree.map(jnp.add, acc, (value, aux, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), {"accuracy": jnp.zeros(())}, params))
        total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
        return jax.tree.map(lambda x: x / n, total)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        # The rules in context while tracing turn the model's activation constraints on
        # (`sharding.constrain`).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            value, aux, grads = gradients(state["params"], batch["codes"], batch["label"], key)
            updates, opt = tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            new = dict(state, step=state["step"] + 1, params=params, opt=opt,
                       ema=ema_update(state["ema"], params, config.ema_decay))
            metrics = dict(loss=value, accuracy=aux["accuracy"], lr=lr(state["step"]),
                           grad_norm=optax.global_norm(grads))
            return new, metrics

    # The seed changes no shape.
    abstract = sharding.abstract_sharded(init_state, mesh, jax.random.key(0), rules=rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_shardings = {
        "codes": sharding.batch_sharding(mesh, 3),
        "label": sharding.batch_sharding(mesh, 1),
    }
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    return ARProgram(
        model_cfg=model_cfg,
        init=lambda seed: sharding.init_sharded(
            init_state, mesh, jax.random.key(seed), rules=rules
        )[0],
        abstract_state=abstract,
        state_shardings=state_shardings,
        step=jitted,
        loss_given=loss_given,
        lr=lr,
    )
