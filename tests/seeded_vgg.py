"""Random LPIPS-VGG16 weights drawn from a seed, for a fixture that cannot hold VGG16's 14.7M
weights.

``lpips_state(seed)`` is an LPIPS state dict (``net.slice{1..5}.{i}.weight|bias``,
``lin{0..4}.model.1.weight``, the official names) of float16-valued float32 arrays. It draws with
numpy's legacy ``RandomState``, whose streams numpy keeps fixed across versions and platforms, so
the fixture generator (tests/fixtures/make_loss_parity.py) and the test build the same network from
the seed alone.
"""

import numpy as np

_CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# official lpips.vgg16: features split into 5 slices
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_HEAD_CHANNELS = (64, 128, 256, 512, 512)


def _fp16(x) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float32)


def lpips_state(seed: int) -> dict[str, np.ndarray]:
    """He-normal 3x3 kernels, N(0, 0.05) biases, U(0, 0.2) heads (non-negative, as the published
    ones)."""
    rng = np.random.RandomState(seed)
    state, index, c_in = {}, 0, 3
    for width in _CONFIG_D:
        if width == "M":
            index += 1
            continue
        s = next(i for i, (lo, hi) in enumerate(_SLICES) if lo <= index < hi)
        name = f"net.slice{s + 1}.{index - _SLICES[s][0]}"
        state[f"{name}.weight"] = _fp16(
            rng.standard_normal((width, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))
        )
        state[f"{name}.bias"] = _fp16(rng.standard_normal(width) * 0.05)
        index, c_in = index + 2, width  # conv, relu
    for k, c in enumerate(_HEAD_CHANNELS):
        state[f"lin{k}.model.1.weight"] = _fp16(rng.uniform(0.0, 0.2, (1, c, 1, 1)))
    return state
