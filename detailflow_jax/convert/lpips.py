"""Converts LPIPS-VGG16 weights (torchvision VGG16 + LPIPS linear heads) to an orbax parameter
directory.

    python -m detailflow_jax.convert.lpips --vgg vgg16-397923af.pth --lpips vgg.pth --out /ckpt/lpips_vgg

Accepted namings (the same file may be given to both flags when it holds everything):
  * VGG convs: torchvision ``features.{i}.weight|bias``, or LPIPS's ``net.slice{s}.{j}.weight|bias``
    with j counted inside the slice (DetailFlow) or over the whole stack
    (richzhang/PerceptualSimilarity); ``classifier.*`` is ignored.
  * heads: ``lin{k}.model.1.weight`` (taming-transformers ``vgg.pth``, LPIPS with dropout) or
    ``lin{k}.model.0.weight``.
"""  # noqa: E501

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from detailflow_jax import cli, cli_errors
from detailflow_jax.params_io import save_params
from detailflow_jax.convert.state_dict import StateDictReader, assign_to_tree, load_state_dict
from detailflow_jax.losses.lpips import LPIPS
from detailflow_jax.losses.vgg import TAPS, TORCHVISION_INDEX

# First torchvision index of each LPIPS slice: features[0:4] [4:9] [9:16] [16:23] [23:30].
SLICE_STARTS = (0, 4, 9, 16, 23, 30)
_IGNORED = ("classifier.", "scaling_layer.")


def _conv_key(reader: StateDictReader, index: int, kind: str) -> str:
    """The key holding features.{index}.{kind} under whichever naming the file uses."""
    s = next(k for k in range(5) if SLICE_STARTS[k] <= index < SLICE_STARTS[k + 1])
    candidates = (f"features.{index}.{kind}", f"net.slice{s + 1}.{index - SLICE_STARTS[s]}.{kind}",
                  f"net.slice{s + 1}.{index}.{kind}")
    return next((c for c in candidates if reader.has(c)), candidates[0])


def convert_lpips(vgg_state: dict[str, np.ndarray], lpips_state: dict[str, np.ndarray]) -> dict:
    """State dicts -> the ``params`` tree of ``LPIPS`` (float32)."""
    vgg = StateDictReader(
        vgg_state, skip_prefixes=_IGNORED + ("lin",), name="VGG16 weights (--vgg)"
    )
    heads = StateDictReader(lpips_state, skip_prefixes=_IGNORED + ("features.", "net."),
                            name="LPIPS head weights (--lpips)")
    flat = {}
    for name, index in TORCHVISION_INDEX.items():
        w = vgg.take(_conv_key(vgg, index, "weight"))
        # OIHW -> HWIO
        flat[("vgg", name, "kernel")] = None if w is None else np.transpose(w, (2, 3, 1, 0))
        flat[("vgg", name, "bias")] = vgg.take(_conv_key(vgg, index, "bias"))
    for k in range(len(TAPS)):
        key = next(
            (c for c in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight") if heads.has(c)),
            f"lin{k}.model.1.weight",
        )
        w = heads.take(key)
        flat[(f"lin{k}",)] = None if w is None else w.reshape(-1)
    vgg.finish()
    heads.finish()
    x = jnp.zeros((1, 16, 16, 3))
    abstract = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
    return assign_to_tree(flat, abstract, name="LPIPS weights")


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("vgg", None, "torchvision VGG16 state dict (.pth/.npz/.safetensors)",
                        flag_values=fv, required=True)
    flags.DEFINE_string("lpips", None, "LPIPS linear heads, e.g. taming-transformers vgg.pth",
                        flag_values=fv, required=True)
    cli.define_out(fv, "output orbax directory (pass it as --config.losses.lpips_weights)")
    cli.define_force(fv)


def main(argv=None) -> None:
    args = cli.parse(argv, __doc__, _define_flags)
    params = convert_lpips(load_state_dict(args.vgg), load_state_dict(args.lpips))
    print(f"wrote LPIPS-VGG16 parameters to {save_params(args.out, params, force=args.force)}")


if __name__ == "__main__":
    cli_errors.run(main)
