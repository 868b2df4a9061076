"""Born-sharded tokenizer on a (data=2, fsdp=2, tensor=2) mesh gives the single-device outputs."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from configs.tokenizer import get_config
from detailflow_jax import sharding
from detailflow_jax.tokenizer.model import DetailFlowTokenizer, init_variables


def test_sharded_init_and_apply_match_single_device():
    cfg = get_config("tiny,enc_depth=1,dec_depth=1").model
    model = DetailFlowTokenizer(cfg)
    images = jax.random.uniform(
        jax.random.key(1), (4, cfg.image_size, cfg.image_size, 3), minval=-1, maxval=1
    )

    def run(params, x):
        enc = model.apply({"params": params}, x, method=DetailFlowTokenizer.encode)
        pixels = model.apply(
            {"params": params}, enc["quant"], 12, 32, method=DetailFlowTokenizer.decode
        )
        return enc["pre_quant"], enc["indices"], pixels

    mesh = sharding.make_mesh((2, 2, 2))
    variables, shardings = sharding.init_sharded(
        lambda k: init_variables(cfg, k), mesh, jax.random.key(0)
    )
    params = variables["params"]
    fc1 = params["encoder"]["layers"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P("fsdp", "tensor")
    assert len(fc1.addressable_shards) == 8 and fc1.addressable_shards[0].data.shape == (32, 128)
    assert shardings["params"]["encoder"]["latent_tokens"].spec == P(None, None, "fsdp")

    with jax.set_mesh(mesh):
        x = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        got = jax.jit(run)(params, x)
    # Same parameters on one device.
    single = jax.devices()[0]
    reference = jax.jit(run)(
        jax.device_put(jax.device_get(params), single), jax.device_put(images, single)
    )
    np.testing.assert_allclose(got[0], reference[0], atol=1e-5)
    np.testing.assert_array_equal(got[1], reference[1])
    np.testing.assert_allclose(got[2], reference[2], atol=1e-5)
