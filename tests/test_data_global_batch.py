"""Per-process batches -> global arrays sharded over ("data", "fsdp") on the 8 simulated CPU
devices."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from detailflow_jax.data.global_batch import to_global
from detailflow_jax.sharding import make_mesh


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1), (1, 4, 2)])
def test_to_global_shape_and_sharding(mesh_shape):
    mesh = make_mesh(mesh_shape)
    batch = {"image": np.arange(8 * 4 * 4 * 3, dtype=np.float32).reshape(8, 4, 4, 3),
             "label": np.arange(8, dtype=np.int32)}
    out = to_global(batch, mesh)
    assert out["image"].shape == (8, 4, 4, 3) and out["label"].shape == (8,)
    assert out["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert out["label"].sharding.spec == P(("data", "fsdp"))
    rows = 8 // (mesh_shape[0] * mesh_shape[1])
    # every device holds its rows, replicated over "tensor"
    for shard in out["image"].addressable_shards:
        start = shard.index[0].start or 0
        assert shard.data.shape[0] == rows
        np.testing.assert_array_equal(np.asarray(shard.data), batch["image"][start:start + rows])


def test_to_global_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match=r"\['label'\] has shape \(6,\).*4 batch shards"):
        to_global({"label": np.zeros(6, np.int32)}, make_mesh((2, 2, 2)))
