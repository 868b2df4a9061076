r"""Turn a training split into AR training codes with the tokenizer (official
``extract_codes_c2i.py``).

    python -m detailflow_jax.tokenizer.extract --config configs/ar_fashion_mnist.py --tokenizer workdir/tok \
        --out codes/fashion_mnist
    python -m detailflow_jax.tokenizer.extract --config configs/ar_imagenet.py:N=128 --tokenizer /ckpt/df16 \
        --tokenizer_config configs/tokenizer.py:DF-16 --out /data/codes/df16 --config.extract.data.data_dir=/data/tfds

``--config`` is the AR recipe; its ``extract`` section says which images, views and batch size
(``--out`` and ``--tokenizer`` default to its ``codes_dir`` and ``tokenizer``). ``--tokenizer`` is a
tokenizer training work directory (latest checkpoint) or a converted orbax parameter directory (then
``--tokenizer_config`` is needed).

Every image gets one noise span drawn as the official ``get_noise_token_idx(N)`` from (seed, image
index) and shared by its views; the tokenizer's self-correction pass gives [clean, sc_input,
sc_label] codes per view. Views: ``center`` (1), ``center_flip`` (centre crop and its mirror, 2),
``ten_crop`` (the official recipe, 10). Processes split the chunks between them (chunk c goes to
process c mod count); finished chunks are committed files, so rerunning the command after an
interruption only does the missing ones.
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from detailflow_jax import cli as shared_cli
from detailflow_jax import distributed, sharding, storage
from detailflow_jax.config_lib import ConfigError, require
from detailflow_jax.data import codes as codes_lib
from detailflow_jax.data.pipeline import (
    AttachIndex,
    EvalTransform,
    SkipCounter,
    complete_config,
    finish_dataset,
)
from detailflow_jax.data.sources import open_source
from detailflow_jax.inference.weights import checkpoint_step, load_tokenizer
from detailflow_jax.tokenizer.config import validate
from detailflow_jax.tokenizer.degradation import sample_noise_span
from detailflow_jax.tokenizer.model import DetailFlowTokenizer

log = logging.getLogger(__name__)

VIEW_MODES = {"center": 1, "center_flip": 2, "ten_crop": 10}
# data fields that do not change the images
_SPEED_FIELDS = ("num_threads", "prefetch", "num_workers")


def noise_spans(
    seed: int, indices: np.ndarray, num_tokens: int, group_size: int, causal_num: int
) -> np.ndarray:
    """(B, 2) [noise_idx, noise_end] per image, drawn from (seed, image index) like
    ``get_noise_token_idx(N)``."""
    return np.asarray(
        [
            sample_noise_span(
                np.random.default_rng([seed, int(i)]), num_tokens, group_size, causal_num
            )
            for i in indices
        ],
        np.int32,
    )


def as_views(images: np.ndarray, mode: str) -> np.ndarray:
    """Pipeline images -> (B, views, R, R, 3): ten-crop batches already have the view axis."""
    if mode == "ten_crop":
        return images
    if mode == "center_flip":
        return np.stack([images, images[:, :, ::-1]], axis=1)
    return images[:, None]


class CodeExtractor:
    """One jitted pass: images (B, V, R, R, 3), spans (B, 2), indices (B,) -> codes int16 (B, V, N,
    3).

    Each image's noisy top-k codes come from ``fold_in(key(seed), index)``, so the codes of an image
    do not depend on the batch it lands in or on the number of devices."""

    def __init__(self, model_cfg, params, mesh: jax.sharding.Mesh, seed: int):
        self.model = DetailFlowTokenizer(model_cfg)
        self.mesh = mesh
        self.params = params
        self.seed = seed
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self._fn = jax.jit(self._codes, in_shardings=(
            param_shardings, sharding.batch_sharding(mesh, 5), sharding.batch_sharding(mesh, 2),
            sharding.batch_sharding(mesh, 1)), out_shardings=sharding.batch_sharding(mesh, 4))

    def _codes(self, params, images, spans, indices):
        base = jax.random.key(self.seed)

        def one_image(views, span, index):
            out = self.model.apply({"params": params}, views, span[0], span[1],
                                   rng=jax.random.fold_in(base, index), method="self_correct")
            return jnp.stack([out["clean"], out["input"], out["label"]], axis=-1).astype(jnp.int16)

        return jax.vmap(one_image)(images, spans, indices)

    def __call__(self, images: np.ndarray, spans: np.ndarray, indices: np.ndarray) -> jax.Array:
        """Dispatches one batch (asynchronously; read the result with np.asarray)."""
        return self._fn(self.params, images, spans, indices)


def chunk_bounds(chunk: int, chunk_size: int, num_images: int) -> tuple[int, int]:
    return chunk * chunk_size, min((chunk + 1) * chunk_size, num_images)


def _metadata(
    config,
    data_cfg,
    model_cfg,
    tokenizer: str,
    tokenizer_step: int | None,
    num_images: int,
    class_names,
) -> codes_lib.CodesMetadata:
    ex, m = config.extract, validate(model_cfg)
    return codes_lib.CodesMetadata(
        num_tokens=m.num_latent_tokens,
        group_size=m.group_size,
        causal_num=m.causal_num,
        codebook_size=m.codebook_size,
        views=VIEW_MODES[ex.views],
        view_mode=ex.views,
        num_images=num_images,
        num_classes=len(class_names),
        class_names=list(class_names),
        image_size=m.image_size,
        chunk_size=ex.chunk_size,
        num_chunks=-(-num_images // ex.chunk_size),
        seed=ex.seed,
        tokenizer={
            "path": os.fspath(storage.path(tokenizer)),
            "step": tokenizer_step,
            "model": model_cfg.to_dict(),
        },
        data={k: v for k, v in data_cfg.items() if k not in _SPEED_FIELDS},
        split=ex.split,
    )


def _differences(old, new, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two JSON-like trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(old.keys() | new.keys())
            for d in _differences(old.get(k, "(unset)"), new.get(k, "(unset)"), f"{prefix}{k}.")
        ]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _write_or_check_metadata(
    out: epath.Path, meta: codes_lib.CodesMetadata, overwrite: bool
) -> None:
    """Writes ``metadata.json``, or checks it against ``meta`` when ``out`` has codes already: codes
    made with other settings or another tokenizer checkpoint are refused, or with ``overwrite``
    deleted (re-extracted)."""
    path = out / codes_lib.METADATA_FILE
    if path.is_file():
        existing = codes_lib.read_metadata(out)
        if existing == meta:
            return
        diff = _differences(dataclasses.asdict(existing), dataclasses.asdict(meta))
        if not overwrite:
            raise ConfigError(
                f"{out} holds codes extracted with other settings or another tokenizer checkpoint "
                f"({'; '.join(diff[:5])}); pass --overwrite to re-extract them, or a new --out"
            )
        _barrier("extract: metadata checked")
        if distributed.is_main_process():
            log.warning("re-extracting %s (%s)", out, "; ".join(diff[:5]))
            for stale in out.glob("codes-*-of-*.array_record*"):
                stale.unlink()
            path.unlink()
        _barrier("extract: stale codes deleted")
    if distributed.is_main_process():
        storage.prepare_dir(out)
        with storage.written_whole(path) as tmp:
            tmp.write_text(meta.to_json())


def _data_config(config) -> ml_collections.ConfigDict:
    data_cfg = complete_config(config.extract.data)
    # The view mode decides the crop: the official ten-crop, or the ADM centre crop.
    data_cfg.eval_crop = "ten_crop" if config.extract.views == "ten_crop" else "center"
    return data_cfg


def _chunk_batches(source, data_cfg, start: int, stop: int, batch_size: int):
    ds = grain.MapDataset.source(source).map_with_index(AttachIndex(len(source)))[start:stop]
    ds = ds.map(EvalTransform(data_cfg.image_size, data_cfg.eval_crop, data_cfg.ten_crop_scale))
    return iter(finish_dataset(ds, batch_size, data_cfg, SkipCounter(), drop_remainder=False))


def extract_codes(config: ml_collections.ConfigDict, tokenizer: str, out: str,
                  tokenizer_config: str | None = None, overwrite: bool = False) -> dict:
    """Extracts (or finishes extracting) the codes of ``config.extract`` into ``out``
    (``overwrite``: replacing codes made with other settings or another tokenizer checkpoint, which
    are refused otherwise); returns {"images": written by this process, "seconds", "images_per_s",
    "chunks_done", "chunks_skipped"}."""
    ex = config.extract
    require(
        ex.views in VIEW_MODES, "extract.views", ex.views, f"must be one of {sorted(VIEW_MODES)}"
    )
    require(ex.chunk_size > 0, "extract.chunk_size", ex.chunk_size, "must be positive")
    distributed.maybe_initialize()
    # Every process works on its own chunks with its own devices: no cross-process collectives.
    mesh = sharding.make_mesh((-1, 1, 1), jax.local_devices())
    require(ex.batch_size % mesh.devices.size == 0, "extract.batch_size", ex.batch_size,
            f"must be divisible by the {mesh.devices.size} local devices")
    data_cfg = _data_config(config)
    tokenizer_step = checkpoint_step(tokenizer)  # codes of another checkpoint are not reused
    model_cfg, params = load_tokenizer(tokenizer, mesh, tokenizer_config, step=tokenizer_step)
    if ex.dtype:
        model_cfg.dtype = ex.dtype
    m = validate(model_cfg)
    require(
        m.codebook_size <= 2**15,
        "codebook_size",
        m.codebook_size,
        "codes are stored as int16 (at most 32768)",
    )
    require(data_cfg.image_size == m.image_size, "extract.data.image_size", data_cfg.image_size,
            f"must equal the tokenizer's image_size={m.image_size}")
    source, class_names = open_source(data_cfg, ex.split)
    require(
        ex.max_images >= 0,
        "extract.max_images",
        ex.max_images,
        "must be >= 0 (0 = the whole split)",
    )
    num_images = min(len(source), ex.max_images or len(source))
    meta = _metadata(
        config, data_cfg, model_cfg, tokenizer, tokenizer_step, num_images, class_names
    )
    out = storage.path(out)
    _write_or_check_metadata(out, meta, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    mine = range(jax.process_index(), meta.num_chunks, jax.process_count())
    todo = [c for c in mine if not codes_lib.chunk_path(out, c, meta.num_chunks).is_file()]
    for chunk in todo:  # partial files of a killed run
        for stale in out.glob(codes_lib.chunk_path(out, chunk, meta.num_chunks).name + ".tmp-*"):
            stale.unlink()
    extractor = CodeExtractor(model_cfg, params, mesh, ex.seed)
    bounds = {c: chunk_bounds(c, ex.chunk_size, meta.num_images) for c in todo}
    total = sum(stop - start for start, stop in bounds.values())
    bar = tqdm(
        total=total, desc=f"codes (process {jax.process_index()})", unit="img", dynamic_ncols=True
    )
    written, begin = 0, time.perf_counter()
    for chunk in todo:
        writer = codes_lib.ChunkWriter(out, chunk, meta.num_chunks)

        # the previous batch's codes, read only after the next batch is dispatched
        def write(pending):
            codes, batch = pending
            for index, label, c in zip(batch["index"], batch["label"], np.asarray(codes)):
                writer.write(int(index), int(label), c)
            bar.update(len(batch["index"]))

        try:
            pending = None
            for batch in _chunk_batches(source, data_cfg, *bounds[chunk], ex.batch_size):
                images, n = as_views(batch["image"], ex.views), len(batch["index"])
                # the last batch of a chunk: pad to the compiled shape, drop afterwards
                pad = ex.batch_size - n
                indices = np.pad(batch["index"], (0, pad))
                images = np.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
                spans = noise_spans(
                    ex.seed, indices, m.num_latent_tokens, m.group_size, m.causal_num
                )
                codes = extractor(images, spans, indices)[:n]
                if pending is not None:
                    write(pending)
                pending = (codes, batch)
            if pending is not None:
                write(pending)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        written += writer.count
    bar.close()
    seconds = time.perf_counter() - begin
    return dict(images=written, seconds=seconds, images_per_s=written / max(seconds, 1e-9),
                chunks_done=len(todo), chunks_skipped=len(mine) - len(todo), out=os.fspath(out))


def _define_flags():
    from absl import flags
    shared_cli.define_config()
    shared_cli.define_print_config()
    flags.DEFINE_string(
        "tokenizer",
        None,
        "tokenizer training work directory or converted orbax params directory "
        "(default: the config's `tokenizer`)",
    )
    shared_cli.define_tokenizer_config(flags.FLAGS)
    flags.DEFINE_string("out", None, "output codes directory (default: the config's `codes_dir`)")
    flags.DEFINE_bool(
        "overwrite",
        False,
        "re-extract when --out holds codes made with other settings or another "
        "tokenizer checkpoint (refused otherwise)",
    )


def main(argv) -> None:
    from absl import flags
    from absl import logging as absl_logging
    del argv
    # orbax logs every restore through absl at INFO
    absl_logging.set_verbosity(absl_logging.WARNING)
    f = flags.FLAGS
    config = shared_cli.loaded_config()
    if config is None:
        print(__doc__.strip() + "\n", file=sys.stderr)
        raise ConfigError("--config is required")
    shared_cli.maybe_print_config(config)
    shared_cli.require_fields(config, ("extract", "codes_dir", "tokenizer"),
                       "an AR config (e.g. configs/ar_fashion_mnist.py)")
    tokenizer = f.tokenizer or config.tokenizer
    out = f.out or config.codes_dir
    if not tokenizer or not out:
        raise ConfigError("pass --tokenizer and --out (or set tokenizer / codes_dir in the config)")
    result = extract_codes(
        config, tokenizer, out, f.tokenizer_config or config.tokenizer_config or None, f.overwrite
    )
    print(
        f"{result['images']} images in {result['seconds']:.1f} s ({result['images_per_s']:.1f} "
        "images/s); "
        f"{result['chunks_done']} chunks written, {result['chunks_skipped']} already done; codes "
        f"in {result['out']}"
    )


if __name__ == "__main__":
    _define_flags()
    shared_cli.run(main, __doc__, ("config", "print_config"), log_level=logging.INFO)
