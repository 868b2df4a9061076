"""The class-conditional group-parallel GPT of DetailFlow (LlamaGen architecture, official
`Transformer`).

The sequence is [cls, t_0 .. t_{C-1}, s_0 .. s_{g-2}, t_C ..] with g - 1 learned special tokens, the
group-causal mask (`masks.py`) and 2D RoPE over (group, slot) (`rope.py`);
docs/model.md#gpt-sequence-layout has the table. Training feeds N - g tokens, so the length is N and
output position i predicts t_i.

Two entry points share every parameter:
  * ``GPT.__call__(tokens, labels, train)``: the teacher-forced forward (training, reference
    sampler);
  * ``GPT.decode(h, positions, cache, write_index)``: embedded inputs at given positions against an
    explicit per-layer KV cache of length N, writing their keys/values at ``write_index`` (the
    cached sampler).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax import config_lib
from detailflow_jax.sharding import HEADS, STREAM, constrain
from detailflow_jax.ar.layers import DEFAULT_INIT, RMSNorm, SwiGLU, swiglu_hidden_dim
from detailflow_jax.ar.masks import group_causal_mask
from detailflow_jax.ar.rope import apply_rope, rope_table_2d
from detailflow_jax.nn.attention import cached_attention, dot_product_attention

# LlamaGen class-conditional sizes (official gpt.py): name -> (n_layer, n_head, dim).
VARIANTS: dict[str, tuple[int, int, int]] = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XLPlus": (42, 22, 1408),
    "XXL": (48, 24, 1536),
    "XXLPlus": (48, 30, 1920),
    "XXXL": (48, 40, 2560),
}

# What a rematerialised block saves for the backward pass (jax.checkpoint_policies, MaxText's
# names): "full" keeps only the block's input and recomputes everything; the dots_* policies keep
# matmul outputs (all of them, or those of the weight matmuls, not attention's batched q k^T and p
# v), trading memory for less recomputation.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axes of one KV-cache chunk (`init_cache`); keys are stored transposed (see
# `cached_attention`).
CACHE_AXES = {
    "k": ("cache_batch", "cache_heads", "kv", "length"),
    "v": ("cache_batch", "cache_heads", "length", "kv"),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Every size of the GPT. Defaults are the released DetailFlow-16 GPT-L settings."""
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    num_tokens: int = 128          # N
    group_size: int = 8            # g
    causal_num: int = 8            # C: length of the token-causal prefix, a multiple of g
    vocab_size: int = 8192         # tokenizer codebook size
    num_classes: int = 1000        # the class table has num_classes + 1 rows; the last is the CFG
                                   # null class
    multiple_of: int = 256         # SwiGLU hidden-size rounding
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1
    dtype: str = "float32"         # compute dtype ("bfloat16" for speed); params stay param_dtype
    # Embeddings, residual stream and RMSNorm outputs. float32 is what the official bf16 autocast
    # training does (only Linear layers run in bf16); set it to the compute dtype to keep the whole
    # stream in bf16.
    residual_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False      # nn.scan over layers (params get a leading "layers" axis)
    remat: bool = False            # rematerialise each block in the backward pass
    remat_policy: str = "full"     # what a rematerialised block keeps (`REMAT_POLICIES`)

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "GPTConfig":
        if variant not in VARIANTS:
            raise config_lib.ConfigError(
                f"variant={variant!r}: unknown GPT variant; choose one of {sorted(VARIANTS)}"
            )
        n_layer, n_head, dim = VARIANTS[variant]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, **overrides})

    def validate(self) -> "GPTConfig":
        req = config_lib.require
        for key in (
            "dim",
            "n_layer",
            "n_head",
            "num_tokens",
            "group_size",
            "causal_num",
            "vocab_size",
            "num_classes",
            "multiple_of",
        ):
            req(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        req(self.dim % self.n_head == 0, "n_head", self.n_head, f"must divide dim={self.dim}")
        req(self.head_dim % 4 == 0, "n_head", self.n_head,
            f"head_dim = dim / n_head = {self.head_dim} must be a multiple of 4 for the 2D RoPE")
        req(self.num_tokens % self.group_size == 0, "group_size", self.group_size,
            f"must divide num_tokens={self.num_tokens}")
        req(self.causal_num % self.group_size == 0, "causal_num", self.causal_num,
            f"must be a multiple of group_size={self.group_size}")
        req(self.causal_num <= self.num_tokens, "causal_num", self.causal_num,
            f"must be at most num_tokens={self.num_tokens}")
        for key in ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
            req(0.0 <= getattr(self, key) < 1.0, key, getattr(self, key), "must be in [0, 1)")
        req(self.remat_policy in REMAT_POLICIES, "remat_policy", self.remat_policy,
            f"choose one of {sorted(REMAT_POLICIES)}")
        for key in ("dtype", "param_dtype", "residual_dtype"):
            req(getattr(self, key) in ("float32", "bfloat16", "float16"), key, getattr(self, key),
                "must be float32, bfloat16 or float16")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        return swiglu_hidden_dim(self.dim, self.multiple_of)

    @property
    def num_groups(self) -> int:
        return self.num_tokens // self.group_size

    @property
    def num_steps(self) -> int:
        """Forward passes of the sampler: C single-token steps, then one per remaining group."""
        return self.causal_num + (self.num_tokens - self.causal_num) // self.group_size

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def stream_dtype(self) -> Any:
        """The residual stream's dtype (``residual_dtype``)."""
        return jnp.dtype(self.residual_dtype)

    def param_count(self) -> int:
        d, f = self.dim, self.ffn_dim
        per_layer = 3 * d * d + d * d + 3 * d * f + 2 * d
        return (self.n_layer * per_layer + (self.num_classes + 1) * d + 2 * self.vocab_size * d
                + (self.group_size - 1) * d + d)


def _lookup(table: nn.Embed, ids: jax.Array, train: bool) -> jax.Array:
    """Embedding rows; in training as a one-hot matmul (MaxText's iota embedding), whose gradient
    XLA partitions as a matmul (a reduce-scatter into the sharded table). A gather's gradient is a
    scatter that the SPMD partitioner could only reach by replicating the whole (batch, length, dim)
    cotangent on every device. Same values: each output sums exactly one row."""
    if not train:
        return table(ids)
    # Pinned batch-sharded like the ids: unpinned, the partitioner gathered the whole one-hot batch
    # (to shard the product over embed, like the table) instead of gathering the table.
    one_hot = jax.nn.one_hot(ids, table.num_embeddings, dtype=table.dtype)
    one_hot = constrain(
        one_hot, ("activation_batch",) + (None,) * (ids.ndim - 1) + ("activation_vocab",)
    )
    # HIGHEST: a float32 row must come out exact on TPUs too, whose default float32 matmul rounds
    # inputs to bf16.
    return jnp.einsum("...v,vd->...d", one_hot, table.embedding.astype(table.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def _dense(cfg: GPTConfig, features: int, names: tuple, name: str, init=DEFAULT_INIT) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, names),
        name=name,
    )


# One layer's KV cache ({"k": chunks, "v": chunks}, `init_cache`) and where a decode step writes
# into it: (chunk index (static), slot within the chunk).
LayerCache = dict[str, list[jax.Array]]
WriteAt = tuple[int, jax.Array]


class Attention(nn.Module, kw_only=True):
    """Fused-qkv self-attention with 2D RoPE; optionally against one layer's KV cache.

    ``train`` (residual dropout on) is a field: a rematerialised block needs no static arguments."""
    cfg: GPTConfig
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, rope: jax.Array, mask: jax.Array,
                 cache: LayerCache | None = None,
                 write_at: WriteAt | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x (B, S, D), rope (S, Dh / 2, 2), mask to (B, H, S, T) -> (B, S, D) and the cache."""
        cfg = self.cfg
        b, s, _ = x.shape
        # Official wqkv rows are [q; k; v], so the fused kernel's output columns split the same way.
        # (B, S, D) -> 3 x (B, S, H * Dh)
        q, k, v = jnp.split(_dense(cfg, 3 * cfg.dim, ("embed", "qkv"), "wqkv")(x), 3, axis=-1)
        # (B, S, H * Dh) -> (B, S, H, Dh)
        q, k, v = (constrain(t.reshape(b, s, cfg.n_head, cfg.head_dim), HEADS) for t in (q, k, v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            # (B, S, H, Dh) x (B, S, H, Dh) -> (B, S, H, Dh)
            out = dot_product_attention(q, k, v, mask)
        else:
            # Written in place (the cache is a loop carry) into chunk `chunk` (static) at slot
            # `index`, then the chunks up to it are attended as they lie; unwritten slots are in
            # every query's future (masked).
            chunk, index = write_at
            ks, vs = list(cache["k"]), list(cache["v"])
            # k (B, S, H, Dh) -> (B, H, Dh, S), written into (B, H, Dh, n)
            ks[chunk] = jax.lax.dynamic_update_slice(
                ks[chunk], jnp.transpose(k, (0, 2, 3, 1)).astype(ks[chunk].dtype), (0, 0, 0, index))
            # v (B, S, H, Dh) -> (B, H, S, Dh), written into (B, H, n, Dh)
            vs[chunk] = jax.lax.dynamic_update_slice(
                vs[chunk], jnp.swapaxes(v, 1, 2).astype(vs[chunk].dtype), (0, 0, index, 0))
            cache = {"k": ks, "v": vs}
            # (B, S, H, Dh) x chunks (B, H, Dh, n), (B, H, n, Dh) -> (B, S, H, Dh)
            out = cached_attention(q, ks[:chunk + 1], vs[:chunk + 1], mask)
        out = constrain(out, HEADS).reshape(b, s, cfg.dim)  # (B, S, H, Dh) -> (B, S, D)
        # (B, S, D) -> (B, S, D)
        out = constrain(_dense(cfg, cfg.dim, ("heads", "embed"), "wo")(out), STREAM)
        return nn.Dropout(rate=cfg.resid_dropout, deterministic=not self.train)(out), cache


class Block(nn.Module, kw_only=True):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)). Also returns the layer's
    updated cache.

    The stream h keeps its dtype (``residual_dtype``): the norms return it and each sum promotes the
    layers' compute-dtype outputs to it, as torch's autocast does. ``train`` (dropout on) is a
    field, so `nn.remat` needs no static arguments; the call arguments stay positional because
    `nn.scan` maps them by position."""
    cfg: GPTConfig
    train: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, cache: LayerCache | None, rope: jax.Array, mask: jax.Array,
                 write_at: WriteAt | None) -> tuple[jax.Array, LayerCache | None]:
        """h (B, S, D) -> ((B, S, D), cache); rope, mask and write_at as `Attention`'s."""
        cfg, pdt = self.cfg, jnp.dtype(self.cfg.param_dtype)
        h = constrain(h, STREAM)
        x = RMSNorm(eps=cfg.norm_eps, param_dtype=pdt, name="attention_norm")(h)
        attn, cache = Attention(cfg=cfg, train=self.train, name="attention")(
            x, rope=rope, mask=mask, cache=cache, write_at=write_at)
        h = h + attn  # (B, S, D)
        x = RMSNorm(eps=cfg.norm_eps, param_dtype=pdt, name="ffn_norm")(h)
        ffn = SwiGLU(hidden_dim=cfg.ffn_dim, dropout=cfg.ffn_dropout, dtype=cfg.compute_dtype,
                     param_dtype=pdt, train=self.train, name="feed_forward")
        h = h + ffn(x)  # (B, S, D) -> (B, S, F) -> (B, S, D)
        return constrain(h, STREAM), cache


class GPT(nn.Module):
    cfg: GPTConfig

    def setup(self):
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.tok_embeddings = nn.Embed(
            cfg.vocab_size,
            cfg.dim,
            dtype=cfg.stream_dtype,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, ("vocab", "embed")),
        )
        self.cls_embedding = nn.Embed(
            cfg.num_classes + 1,
            cfg.dim,
            dtype=cfg.stream_dtype,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, (None, "embed")),
        )
        # Created after the official initialize_weights(), so it keeps torch's default N(0, 1) init.
        self.spe_tok_embeddings = self.param(
            "spe_tok_embeddings",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
            (cfg.group_size - 1, cfg.dim),
            pdt,
        )
        # The layers are built by `_stack` (the one compact method), where `train` is known.
        self.token_dropout = nn.Dropout(rate=cfg.token_dropout)
        self.norm = RMSNorm(eps=cfg.norm_eps, param_dtype=pdt)
        self.output = _dense(
            cfg, cfg.vocab_size, ("embed", "vocab"), "output", init=nn.initializers.zeros
        )
        self.rope_table = jnp.asarray(
            rope_table_2d(cfg.num_groups, cfg.group_size, cfg.head_dim, cfg.rope_base)
        )
        self.mask_table = jnp.asarray(
            group_causal_mask(cfg.num_tokens, cfg.group_size, cfg.causal_num)
        )

    # ---- embeddings ------------------------------------------------------------------------------

    def embed_class(self, labels: jax.Array, train: bool = False) -> jax.Array:
        """(B,) labels -> (B, 1, D). In training each label becomes the null class with prob
        class_dropout."""
        if train and self.cfg.class_dropout > 0:
            drop = (
                jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.cfg.class_dropout
            )
            labels = jnp.where(drop, self.cfg.num_classes, labels)
        return _lookup(self.cls_embedding, labels, train)[:, None, :]

    def embed_tokens(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        return _lookup(self.tok_embeddings, tokens, train)

    def special_tokens(self) -> jax.Array:
        """(g - 1, D): the learned queries of the first parallel group."""
        return self.spe_tok_embeddings.astype(self.cfg.stream_dtype)

    def training_sequence(
        self, tokens: jax.Array, labels: jax.Array, train: bool = False
    ) -> jax.Array:
        """The embedded official sequence for a prefix of T tokens (see module docstring)."""
        cfg = self.cfg
        parts = [self.embed_class(labels, train)]
        emb = self.embed_tokens(tokens, train)
        if tokens.shape[1] >= cfg.causal_num:
            spe = jnp.broadcast_to(
                self.special_tokens()[None], (tokens.shape[0], cfg.group_size - 1, cfg.dim)
            )
            parts += [emb[:, :cfg.causal_num], spe, emb[:, cfg.causal_num:]]
        else:
            parts.append(emb)
        return jnp.concatenate(parts, axis=1)

    # ---- transformer -----------------------------------------------------------------------------

    @nn.compact
    def _stack(self, h: jax.Array, cache: list[LayerCache] | None, positions: jax.Array,
               key_positions: jax.Array, write_at: WriteAt | None,
               train: bool) -> tuple[jax.Array, list[LayerCache] | None]:
        """h (B, S, D) at `positions` (S,), keys at `key_positions` (T,) -> logits (B, S, V), cache.

        Compact, so that the layers are built with this call's ``train`` (a field of `Block`); their
        names (``layers_i``, or ``layers`` when scanned) are what `setup` would give them."""
        cfg = self.cfg
        rope = self.rope_table[positions]  # (S, Dh / 2, 2)
        mask = self.mask_table[positions][:, key_positions][None, None]  # (1, 1, S, T)
        block = Block
        if cfg.remat:
            block = nn.remat(block, prevent_cse=not cfg.scan_layers,
                             policy=REMAT_POLICIES[cfg.remat_policy])
        if cfg.scan_layers:
            layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg=cfg, train=train, name="layers")
            h, _ = layers(h, None, rope, mask, write_at)
        else:
            new_cache = []
            for i in range(cfg.n_layer):
                layer = block(cfg=cfg, train=train, name=f"layers_{i}")
                h, layer_cache = layer(h, None if cache is None else cache[i], rope, mask, write_at)
                new_cache.append(layer_cache)
            cache = None if cache is None else new_cache
        logits = constrain(
            self.output(self.norm(h)), ("activation_batch", "activation_length", "activation_vocab")
        )
        logits = logits.astype(jnp.float32)
        return logits, cache

    def __call__(self, tokens: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced forward over a token prefix (B, T); returns float32 logits (B, L,
        vocab)."""
        h = self.training_sequence(tokens, labels, train)
        h = constrain(self.token_dropout(h, deterministic=not train), STREAM)
        positions = jnp.arange(h.shape[1])
        logits, _ = self._stack(h, None, positions, positions, None, train)
        return logits

    def decode(
        self,
        h: jax.Array,
        positions: jax.Array,
        cache: list,
        write_index: jax.Array,
        chunk: int = 0,
    ):
        """Runs embedded inputs h (B, S, D) at consecutive sequence `positions` (S,) starting at
        `write_index`.

        ``cache`` is `init_cache`'s: per layer, the keys/values of key positions 0..N-1 in equal
        chunks. The inputs' keys/values are written at ``write_index``, which must lie in chunk
        ``chunk`` (a Python int, so that the chunk to write and the chunks to read are static);
        queries attend to chunks 0..chunk through the group-causal mask — later chunks hold only
        future positions. Returns (float32 logits (B, S, vocab), updated cache). Needs unrolled
        layers: run a ``scan_layers`` checkpoint through `unrolled` / `unstack_layers`.
        """
        if self.cfg.scan_layers:
            raise ValueError("GPT.decode needs unrolled layers: build GPT(unrolled(cfg)) and pass "
                             "unstack_layers(params, cfg.n_layer)")
        chunk_len = cache[0]["v"][0].shape[2]
        if not 0 <= chunk < len(cache[0]["v"]):
            raise ValueError(f"chunk={chunk} is outside the cache's {len(cache[0]['v'])} chunks")
        key_positions = jnp.arange((chunk + 1) * chunk_len)
        return self._stack(
            h, cache, positions, key_positions, (chunk, write_index - chunk * chunk_len), False
        )


def init_cache(cfg: GPTConfig, batch: int, num_chunks: int = 1, dtype: Any = None) -> list:
    """Zero KV cache: per layer {"k": [(batch, heads, head_dim, n)] * num_chunks, "v": [(batch,
    heads, n, head_dim)] * num_chunks} in the compute dtype, chunk i holding key positions i n .. (i
    + 1) n - 1.

    One buffer per layer and chunk (not a stacked array), so that a write is an in-place update of a
    loop carry and attention reads exactly the chunks that hold visible keys, with no slice copies.
    Keys are stored transposed (see `cached_attention`).
    """
    n = cfg.num_tokens // max(num_chunks, 1)
    config_lib.require(
        num_chunks >= 1 and n * num_chunks == cfg.num_tokens and n % cfg.group_size == 0,
        "num_chunks",
        num_chunks,
        f"must split num_tokens={cfg.num_tokens} into chunks of a multiple of group_size="
        f"{cfg.group_size} positions",
    )
    dtype = cfg.compute_dtype if dtype is None else dtype
    zeros = lambda *shape: [jnp.zeros(shape, dtype) for _ in range(num_chunks)]  # noqa: E731
    return [
        {
            "k": zeros(batch, cfg.n_head, cfg.head_dim, n),
            "v": zeros(batch, cfg.n_head, n, cfg.head_dim),
        }
        for _ in range(cfg.n_layer)
    ]


def unrolled(cfg: GPTConfig) -> GPTConfig:
    """The same model with one module per layer and no remat (what the cached decoder runs)."""
    return dataclasses.replace(cfg, scan_layers=False, remat=False)


def unstack_layers(params: Any, n_layer: int) -> Any:
    """Params of a ``scan_layers`` model ({"layers": stacked}) -> per-layer {"layers_i"}; others
    unchanged."""
    if "layers" not in params:
        return params
    params = dict(params)
    stacked = params.pop("layers")
    params.update({f"layers_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(n_layer)})
    return params


def decoding_params(params: Any, cfg: GPTConfig) -> Any:
    """Params as the cached decoder runs them: per layer (`unstack_layers`), Linear kernels in the
    compute dtype and embeddings and norm scales in the residual stream's dtype.

    Every module casts its weights to those dtypes before use, so casting them once up front gives
    the same numbers; inside a sampling loop it saves re-reading float32 weights and converting them
    at every step.
    """
    def cast(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        return x.astype(cfg.compute_dtype if is_kernel else cfg.stream_dtype)

    return jax.tree_util.tree_map_with_path(cast, unstack_layers(params, cfg.n_layer))


def stack_layers(params: Any, n_layer: int) -> Any:
    """The inverse of `unstack_layers`: per-layer {"layers_i"} -> {"layers": stacked} for a
    ``scan_layers`` model."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(n_layer)]
    params["layers"] = jax.tree.map(lambda *x: jnp.stack(x), *layers)
    return params


def init_params(model: GPT, key: jax.Array, batch: int = 1) -> Any:
    """Boxed (logically partitioned) params from a dummy teacher-forced forward of length N."""
    cfg = model.cfg
    tokens = jnp.zeros((batch, max(cfg.num_tokens - cfg.group_size, 0)), jnp.int32)
    return model.init({"params": key}, tokens, jnp.zeros((batch,), jnp.int32))["params"]

