"""GPT building blocks against the spec tables, init, logical axes, scan/remat, cache decode, config
and converter."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from detailflow_jax.ar.layers import swiglu_hidden_dim
from detailflow_jax.ar.masks import group_causal_mask
from detailflow_jax.ar.model import (
    GPT,
    GPTConfig,
    decoding_params,
    init_cache,
    init_params,
    stack_layers,
    unstack_layers,
)
from detailflow_jax.ar.rope import apply_rope, rope_table_2d
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.convert.gpt import convert_gpt_state_dict
from detailflow_jax.convert.state_dict import ConversionError
from detailflow_jax.sharding import DEFAULT_RULES

TINY = dict(
    dim=32,
    n_layer=2,
    n_head=2,
    num_tokens=16,
    group_size=4,
    causal_num=4,
    vocab_size=32,
    num_classes=5,
    multiple_of=16,
)



def test_group_causal_mask_matches_spec_table():
    m = group_causal_mask(32, 8, 8)
    assert m[0].sum() == 1 and m[7, :8].all() and not m[6, 7]          # 0..7 token-causal
    assert m[8, :16].all() and not m[8, 16:].any()                      # t7, s0..s6 see 0..15
    assert m[16, :24].all() and not m[16, 24:].any()                    # group k sees 0..8k+7
    assert m[15, 8] and m[8, 15]  # bidirectional inside a block
    # causal_num = 2g: positions 0..15 are token-causal, later blocks of g.
    m = group_causal_mask(32, 8, 16)
    assert not m[9, 10] and m[16, 23] and not m[16, 24]


def test_rope_table_rows_columns_and_class_row():
    g, head_dim = 4, 16
    table = rope_table_2d(3, g, head_dim)
    assert table.shape == (1 + 3 * g, head_dim // 2, 2)
    assert not table[0].any()  # class token: zero rotation
    freqs = 10000.0 ** (-np.arange(head_dim // 4) / (head_dim // 4))
    for p in range(1, 1 + 3 * g):
        row, col = (p - 1) // g, (p - 1) % g                             # grid shifted by one
        angles = np.concatenate([row * freqs, col * freqs])
        np.testing.assert_allclose(table[p, :, 0], np.cos(angles), atol=1e-6)
        np.testing.assert_allclose(table[p, :, 1], np.sin(angles), atol=1e-6)
    # Adjacent pairs rotate like complex numbers.
    x = jax.random.normal(jax.random.key(0), (1, table.shape[0], 1, head_dim))
    out = np.asarray(apply_rope(x, jnp.asarray(table)))
    xc = np.asarray(x)[..., 0::2] + 1j * np.asarray(x)[..., 1::2]
    expected = xc * (table[None, :, None, :, 0] + 1j * table[None, :, None, :, 1])
    np.testing.assert_allclose(out[..., 0::2], expected.real, atol=1e-5)
    np.testing.assert_allclose(out[..., 1::2], expected.imag, atol=1e-5)


def test_sizes_and_parameter_counts():
    assert swiglu_hidden_dim(1024, 256) == 2816 and swiglu_hidden_dim(768, 256) == 2048
    assert swiglu_hidden_dim(64, 32) == 192
    l_cfg = GPTConfig.from_variant("L")
    abstract = jax.eval_shape(lambda: init_params(GPT(l_cfg), jax.random.key(0)))
    count = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(abstract)))
    # docs/model.md#parameter-counts
    assert count == l_cfg.param_count() and round(count / 1e6, 1) == 326.1
    assert round(GPTConfig.from_variant("B").param_count() / 1e6, 1) == 98.3


def test_init_and_logical_axes():
    cfg = GPTConfig(**TINY)
    boxed = jax.jit(lambda k: init_params(GPT(cfg), k))(jax.random.key(0))
    known = {name for name, _ in DEFAULT_RULES}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    ):
        assert isinstance(leaf, nn.Partitioned), (
            f"{jax.tree_util.keystr(path)} has no logical axis names"
        )
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) - {None} <= known
    params = nn.unbox(boxed)
    assert not params["output"]["kernel"].any()
    assert 0.7 < float(params["spe_tok_embeddings"].std()) < 1.3  # torch default N(0, 1)
    assert 0.015 < float(params["layers_0"]["attention"]["wqkv"]["kernel"].std()) < 0.025
    assert (params["norm"]["scale"] == 1).all()


@jax.jit(static_argnums=(0,))
def perturbed(cfg, seed=0):
    params = nn.unbox(init_params(GPT(cfg), jax.random.key(seed)))
    return jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape), params
    )


def test_scan_remat_and_unrolled_agree_and_train_mode_is_stochastic():
    cfg = GPTConfig(**TINY)
    params = perturbed(cfg)
    scanned = stack_layers(params, cfg.n_layer)
    assert jax.tree.all(jax.tree.map(np.array_equal, unstack_layers(scanned, cfg.n_layer), params))
    tokens = jax.random.randint(
        jax.random.key(2), (2, cfg.num_tokens - cfg.group_size), 0, cfg.vocab_size
    )
    labels = jnp.array([1, 4])
    plain = jax.jit(GPT(cfg).apply)({"params": params}, tokens, labels)
    scan_cfg = GPTConfig(**{**TINY, "scan_layers": True, "remat": True})
    np.testing.assert_allclose(
        jax.jit(GPT(scan_cfg).apply)({"params": scanned}, tokens, labels), plain, atol=1e-5
    )
    # Gradients flow through the rematerialised scan.
    loss = lambda p: GPT(scan_cfg).apply({"params": p}, tokens, labels).mean()  # noqa: E731
    assert (
        float(
            jnp.abs(jax.jit(jax.grad(loss))(scanned)["layers"]["attention"]["wqkv"]["kernel"]).sum()
        )
        > 0
    )
    train = jax.jit(lambda seed: GPT(cfg).apply({"params": params}, tokens, labels, train=True,  # noqa: E731
                                                rngs={"dropout": jax.random.key(seed)}))
    assert not np.allclose(train(0), plain) and not np.allclose(train(0), train(1))


@pytest.mark.parametrize("num_chunks", [1, 2])
def test_cache_decode_matches_teacher_forcing(num_chunks):
    """Writing the training sequence block by block into the KV cache gives the teacher-forced
    logits, with the cache in one chunk or in two (each block then attends to the chunks up to its
    own)."""
    cfg = GPTConfig(**{**TINY, "causal_num": 8})
    params = perturbed(cfg, seed=3)
    model = GPT(cfg)
    tokens = jax.random.randint(
        jax.random.key(4), (2, cfg.num_tokens - cfg.group_size), 0, cfg.vocab_size
    )
    labels = jnp.array([0, 2])
    full = jax.jit(model.apply)({"params": params}, tokens, labels)
    h = jax.jit(lambda *a: model.apply(*a, method=GPT.training_sequence))(
        {"params": params}, tokens, labels
    )
    decode = jax.jit(
        lambda *a, chunk: model.apply({"params": params}, *a, chunk, method=GPT.decode),
        static_argnames="chunk",
    )
    cache, pieces = init_cache(cfg, 2, num_chunks), []
    chunk_len = cfg.num_tokens // num_chunks
    blocks = [(p, 1) for p in range(cfg.causal_num)] + [
        (p, cfg.group_size) for p in range(cfg.causal_num, cfg.num_tokens, cfg.group_size)]
    for start, size in blocks:
        logits, cache = decode(h[:, start:start + size], start + jnp.arange(size), cache, start,
                               chunk=start // chunk_len)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="chunk=2"):
        decode(h[:, :1], jnp.arange(1), init_cache(cfg, 2, 2), 0, chunk=2)
    with pytest.raises(ValueError, match="unrolled layers"):
        GPT(GPTConfig(**{**TINY, "scan_layers": True})).apply(
            {"params": stack_layers(params, cfg.n_layer)},
            h[:, :1],
            jnp.arange(1),
            cache,
            0,
            method=GPT.decode,
        )


def test_decoding_params_give_identical_logits():
    """Casting the weights of a bfloat16-compute model up front (what the sampler does once per
    call) changes no number: every module casts them to the compute (kernels) or residual dtype (the
    rest) anyway."""
    cfg = GPTConfig(**{**TINY, "dtype": "bfloat16"})
    params = perturbed(cfg, seed=6)
    prepared = decoding_params(stack_layers(params, cfg.n_layer), cfg)
    kernels = [
        x for path, x in jax.tree_util.tree_leaves_with_path(prepared) if path[-1].key == "kernel"
    ]
    assert {x.dtype for x in kernels} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(prepared)} == {
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(cfg.residual_dtype),
    }
    tokens = jax.random.randint(
        jax.random.key(1), (2, cfg.num_tokens - cfg.group_size), 0, cfg.vocab_size
    )
    labels = jnp.array([3, 0])
    run = jax.jit(GPT(cfg).apply)
    np.testing.assert_array_equal(
        run({"params": prepared}, tokens, labels), run({"params": params}, tokens, labels)
    )


def test_config_strings_and_validation():
    sys.path.insert(0, ".")
    from configs.gpt import get_config, model_config
    cfg = model_config(get_config("L/128"))
    assert (cfg.n_layer, cfg.dim, cfg.num_tokens, cfg.num_steps) == (24, 1024, 128, 23)
    cfg = model_config(get_config("B/256,g=16"))
    assert (cfg.dim, cfg.group_size, cfg.causal_num, cfg.num_steps) == (768, 16, 16, 31)
    assert model_config(get_config("tiny")).num_tokens == 32
    for arg, key in [
        ("L/100", "group_size"),
        ("L/128,C=12", "causal_num"),
        ("L/128,C=136", "causal_num"),
        ("L/128,heads=5", "n_head"),
        ("Q/128", "variant"),
        ("L/128,bogus=1", "bogus"),
    ]:
        with pytest.raises(ConfigError, match=key):
            get_config(arg)


def official_state_dict(params) -> dict[str, np.ndarray]:
    """An unscanned GPT params tree written with the official checkpoint's keys and layouts."""
    state = {"cls_embedding.embedding_table.weight": params["cls_embedding"]["embedding"],
             "tok_embeddings.weight": params["tok_embeddings"]["embedding"],
             "spe_tok_embeddings.special_embeddings.weight": params["spe_tok_embeddings"],
             "norm.weight": params["norm"]["scale"], "output.weight": params["output"]["kernel"].T}
    for i in range(sum(k.startswith("layers_") for k in params)):
        p = params[f"layers_{i}"]
        state.update({f"layers.{i}.attention.wqkv.weight": p["attention"]["wqkv"]["kernel"].T,
                      f"layers.{i}.attention.wo.weight": p["attention"]["wo"]["kernel"].T,
                      f"layers.{i}.feed_forward.w1.weight": p["feed_forward"]["w1"]["kernel"].T,
                      f"layers.{i}.feed_forward.w2.weight": p["feed_forward"]["w2"]["kernel"].T,
                      f"layers.{i}.feed_forward.w3.weight": p["feed_forward"]["w3"]["kernel"].T,
                      f"layers.{i}.attention_norm.weight": p["attention_norm"]["scale"],
                      f"layers.{i}.ffn_norm.weight": p["ffn_norm"]["scale"]})
    return {k: np.asarray(v) for k, v in state.items()}


def test_converter_names_bad_keys_and_shapes():
    cfg = GPTConfig(**TINY)
    params = nn.unbox(init_params(GPT(cfg), jax.random.key(0)))
    state = official_state_dict(params)
    back = convert_gpt_state_dict(state, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    scanned = convert_gpt_state_dict(state, GPTConfig(**{**TINY, "scan_layers": True}))
    assert scanned["layers"]["attention"]["wqkv"]["kernel"].shape == (2, 32, 96)
    with pytest.raises(ConversionError, match="missing keys.*layers.1.ffn_norm.weight"):
        convert_gpt_state_dict(
            {k: v for k, v in state.items() if k != "layers.1.ffn_norm.weight"}, cfg
        )
    with pytest.raises(ConversionError, match="unexpected keys.*freqs_cis"):
        convert_gpt_state_dict({**state, "freqs_cis": np.zeros(3)}, cfg)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "tok_embeddings.weight",
            np.zeros((33, 32), np.float32),
            r"tok_embeddings\.weight: checkpoint \(33, 32\), the model expects \(32, 32\)",
        ),
        (
            "layers.1.attention.wqkv.weight",
            np.zeros((96, 33), np.float32),  # a Linear weight: [out, in] as stored
            r"layers\.1\.attention\.wqkv\.weight: checkpoint \(96, 33\), the model expects \(96, "
            r"32\)",
        ),
        (
            "norm.weight",
            np.array([np.nan] + [1.0] * 31, np.float32),
            r"norm\.weight: 1 NaN/inf values",
        ),
        (
            "cls_embedding.embedding_table.weight",
            np.zeros((6, 32), np.int64),
            r"cls_embedding\.embedding_table\.weight: int64 values where the model expects "
            r"floating-point",
        ),
    ],
    ids=["embedding_shape", "linear_shape", "nan", "int64"],
)
def test_converter_names_unusable_tensors_by_their_checkpoint_key(scan_layers, key, value, message):
    cfg = GPTConfig(**{**TINY, "scan_layers": scan_layers})
    state = official_state_dict(nn.unbox(init_params(GPT(GPTConfig(**TINY)), jax.random.key(0))))
    with pytest.raises(ConversionError, match=message):
        convert_gpt_state_dict({**state, key: value}, cfg)


@pytest.mark.parametrize("residual_dtype", ["float32", "bfloat16"])
def test_bf16_gpt_keeps_the_residual_stream_in_residual_dtype(residual_dtype):
    """Official bf16 training is autocast: Linear layers run in bf16, while the embeddings, every
    block's residual sum and the norms stay float32. ``residual_dtype="bfloat16"`` keeps the whole
    stream in the compute dtype."""
    cfg = GPTConfig(
        dim=32,
        n_layer=2,
        n_head=2,
        num_tokens=16,
        group_size=4,
        causal_num=4,
        vocab_size=40,
        num_classes=5,
        multiple_of=16,
        dtype="bfloat16",
        residual_dtype=residual_dtype,
    )
    model = GPT(cfg)
    params = nn.unbox(init_params(model, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    for train in (False, True):
        logits, state = model.apply({"params": params}, tokens, jnp.array([0, 3]), train,
                                    rngs={"dropout": jax.random.key(2)}, capture_intermediates=True)
        seen = state["intermediates"]
        stream = [seen[f"layers_{i}"]["__call__"][0][0] for i in range(cfg.n_layer)]
        assert {h.dtype for h in stream} == {jnp.dtype(residual_dtype)}, train
        assert seen["norm"]["__call__"][0].dtype == jnp.dtype(residual_dtype)
        # The Linear layers still compute in bf16.
        assert seen["layers_0"]["attention"]["wqkv"]["__call__"][0].dtype == jnp.bfloat16
        assert logits.dtype == jnp.float32
