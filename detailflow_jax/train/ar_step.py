"""The AR train step (docs/model.md#ar-training): teacher-forced cross-entropy with the 30% self-correction mix,
AdamW, EMA.

State (a plain pytree, checkpointed as is):
  step    int32, number of updates done
  rng     PRNG key data; the key of step s is ``fold_in(rng, s)`` (self-correction mix, class and token dropout)
  params  GPT parameters (param_dtype, float32 by default)
  opt     AdamW state (decay on parameters of rank >= 2 only), sharded like the parameters
  ema     exponential moving average of params (decay ``ema_decay`` every step, starts as a copy); sampling uses it

A batch is ``{"codes": int (B, N, 3) = [clean, sc_input, sc_label] of one view, "label": int (B,)}``. Per sample,
with probability ``correction_prob`` the input is ``sc_input[:, :N-g]`` and the target ``sc_label``, else the clean
sequence for both. With ``grad_accum = n`` the batch is split into n micro-batches the MaxText way —
(B, ...) -> (B/n, n, ...) -> swap the first two axes — so every micro-batch keeps an even share of every device's
rows; a ``lax.scan`` sums their gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from detailflow_jax import optim, sharding
from detailflow_jax.ar.model import GPT, GPTConfig, init_params


def self_correction_mix(codes: jax.Array, use_corrected: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """codes (B, N, 3), use_corrected (B,) bool -> inputs (B, N - g), targets (B, N) (official
    ``generate_z_input_target``)."""
    clean, sc_input, sc_label = codes[..., 0], codes[..., 1], codes[..., 2]
    pick = use_corrected[:, None]
    inputs = jnp.where(pick, sc_input, clean)[:, :codes.shape[1] - group_size]
    targets = jnp.where(pick, sc_label, clean)
    return inputs, targets


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params (official ``update_ema``), in the parameters' dtype."""
    return optax.incremental_update(params, ema, step_size=1.0 - decay)


def split_micro_batches(tree: Any, num: int) -> Any:
    """(B, ...) leaves -> (num, B / num, ...): micro-batch j holds rows j, j + num, ... of the batch."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


@dataclasses.dataclass
class ARStep:
    """Builds the AR train state, its shardings and the compiled step from a training config."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    # The run's learning rates and step counts (optim.resolve_ar_schedule); None: resolved from the config's
    # explicit step counts alone (no dataset size).
    lr_schedule: optim.ResolvedSchedule | None = None

    def __post_init__(self):
        cfg = self.config
        if self.lr_schedule is None:
            self.lr_schedule = optim.resolve_ar_schedule(cfg, dataset_size=None)
        self.model_cfg = GPTConfig(**cfg.model.to_dict()).validate()
        self.model = GPT(self.model_cfg)
        self.rules = sharding.rules_from_config(cfg)
        self.lr = optim.ar_schedule(self.lr_schedule)
        self.tx = optim.adamw(self.lr, cfg.optim.weight_decay, cfg.optim.b1, cfg.optim.b2, cfg.optim.clip_norm)
        self._compiled = None

    # ------------------------------------------------------------------ state

    def _init_state(self, rng: jax.Array) -> dict:
        k_model, k_state = jax.random.split(rng)
        params = init_params(self.model, k_model)
        return dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state), params=params,
                    opt=self.tx.init(params), ema=jax.tree.map(jnp.copy, params))

    def init(self, seed: int) -> tuple[dict, Any]:
        """The initial state, born sharded on the mesh, and its shardings."""
        return sharding.init_sharded(self._init_state, self.mesh, jax.random.key(seed), rules=self.rules)

    def abstract_state(self, seed: int) -> Any:
        """ShapeDtypeStructs with the state's shardings (restore target), nothing allocated."""
        return sharding.abstract_sharded(self._init_state, self.mesh, jax.random.key(seed), rules=self.rules)

    # ------------------------------------------------------------------ the step

    def loss(self, params: Any, codes: jax.Array, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, dict]:
        """Mean cross-entropy over all B x N targets (float32 logits), and the token accuracy."""
        k_mix, k_dropout = jax.random.split(key)
        use_corrected = jax.random.uniform(k_mix, labels.shape) < self.config.correction_prob
        return self.loss_given(params, codes, labels, use_corrected, k_dropout)

    def loss_given(self, params: Any, codes: jax.Array, labels: jax.Array, use_corrected: jax.Array,
                   dropout_key: jax.Array) -> tuple[jax.Array, dict]:
        """``loss`` with the self-correction decisions (B,) bool given; ``dropout_key`` drives class and token
        dropout (with the dropout rates at 0, pass the null class as the label to drop one)."""
        inputs, targets = self_correction_mix(codes.astype(jnp.int32), use_corrected, self.model_cfg.group_size)
        logits = self.model.apply({"params": params}, inputs, labels, True, rngs={"dropout": dropout_key})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
        return jnp.mean(ce), dict(accuracy=accuracy)

    def _gradients(self, params, codes, labels, key):
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        n = self.config.grad_accum
        if n == 1:
            (loss, aux), grads = grad_fn(params, codes, labels, key)
            return loss, aux, grads
        micro = split_micro_batches((codes, labels), n)
        rows = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES))  # micro-batch rows stay on their devices
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows), micro)

        def body(acc, xs):
            (codes_j, labels_j), j = xs
            (loss, aux), grads = grad_fn(params, codes_j, labels_j, jax.random.fold_in(key, j))
            return jax.tree.map(jnp.add, acc, (loss, aux, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), {"accuracy": jnp.zeros(())}, params))
        total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
        return jax.tree.map(lambda x: x / n, total)

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        # The rules in context while tracing turn the model's activation constraints on (`sharding.constrain`).
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
            return self._step(state, batch)

    def _step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        loss, aux, grads = self._gradients(state["params"], batch["codes"], batch["label"], key)
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, step=state["step"] + 1, params=params, opt=opt,
                   ema=ema_update(state["ema"], params, self.config.ema_decay))
        metrics = dict(loss=loss, accuracy=aux["accuracy"], lr=self.lr(state["step"]),
                       grad_norm=optax.global_norm(grads))
        return new, metrics

    def compiled(self, state_shardings: Any):
        """The jitted step with explicit shardings; the state is donated."""
        if self._compiled is None:
            batch = {"codes": sharding.batch_sharding(self.mesh, 3), "label": sharding.batch_sharding(self.mesh, 1)}
            self._compiled = jax.jit(self.step, in_shardings=(state_shardings, batch),
                                     out_shardings=(state_shardings, sharding.replicated(self.mesh)),
                                     donate_argnums=0)
        return self._compiled
