"""An image-folder tree (the ImageNet layout) -> a TFDS ArrayRecord dataset, built offline and
without TensorFlow.

Input layout: ``<root>/train/<class>/*.{jpg,jpeg,png,...}`` and optionally ``<root>/val/<class>/*``;
one folder per class. Labels are the positions of the class folders of ``train`` in sorted order
(torchvision ``ImageFolder``'s rule, so ImageNet synsets get the usual 0..999 labels). ``val`` may
hold a subset of the train classes, never others.

Output: ``<data_dir>/imagefolder/1.0.0/imagefolder-{train,val}.array_record-*`` with features
``image`` (the file's original encoded bytes, decoded later with PIL in the grain map), ``label``
(ClassLabel) and ``file_name`` ("<class>/<file>").

Corrupt images. Every file gets a cheap ``PIL.Image.verify()`` at build time (header and, for PNG,
chunk CRCs; no full decode); those that fail are skipped, counted, logged by name, and listed in the
build summary. ``verify`` does not decode JPEG scans, so a truncated JPEG can still pass; the grain
map decodes fully and skips and counts what fails there (``pipeline.SkipCounter``). Nothing is ever
silently dropped or silently turned into a wrong batch.

CLI: ``python -m detailflow_jax.data.imagefolder --root DIR --data_dir OUT`` (TFDS shows a progress
bar per split).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from absl import flags
from PIL import Image

from detailflow_jax import cli, cli_errors, storage
from detailflow_jax.data.transforms import DECODE_ERRORS

log = logging.getLogger(__name__)

NAME = "imagefolder"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "val")
# torchvision's IMG_EXTENSIONS.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_FILE = "source_tree.json"  # the fingerprint of the tree a dataset was built from
_READ_CHUNK = 512  # files read and verified concurrently; bounds the bytes held in memory


class ImageFolderError(ValueError):
    """A folder tree that does not have the expected layout, or a built dataset that cannot be
    found."""


@dataclasses.dataclass
class BuildReport:
    """What a build kept and skipped, per split."""
    num_examples: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def list_classes(split_dir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def list_images(split_dir: pathlib.Path, class_names: list[str]) -> list[tuple[pathlib.Path, str]]:
    """(path, class) for every image file of the split, sorted for a reproducible build."""
    found = []
    for name in class_names:
        class_dir = split_dir / name
        if class_dir.is_dir():
            found += [(p, name) for p in sorted(class_dir.iterdir())
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return found


def read_verified(path: pathlib.Path) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a file PIL can identify and verify, else (None, reason)."""
    try:
        data = path.read_bytes()
        with Image.open(path) as img:
            img.verify()
        return data, None
    except DECODE_ERRORS as e:  # UnidentifiedImageError is an OSError
        return None, f"{type(e).__name__}: {e}"


def check_layout(root: pathlib.Path) -> tuple[list[str], list[str]]:
    """(class names, splits present); raises ImageFolderError naming what is wrong with the tree."""
    if not root.is_dir():
        raise ImageFolderError(
            f"image-folder root {str(root)!r} does not exist or is not a directory"
        )
    train = root / "train"
    if not train.is_dir():
        raise ImageFolderError(
            f"{str(root)!r} has no 'train' folder; expected <root>/train/<class>/*.jpg (and "
            "optionally <root>/val/...)"
        )
    class_names = list_classes(train)
    if not class_names:
        raise ImageFolderError(
            f"{str(train)!r} has no class sub-folders; expected one folder per class"
        )
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if "val" in splits:
        unknown = sorted(set(list_classes(root / "val")) - set(class_names))
        if unknown:
            raise ImageFolderError(
                f"{str(root / 'val')!r} has classes missing from train: {unknown[:10]}"
            )
    return class_names, splits


class ImageFolder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over a local image-folder tree; stores the original encoded bytes (no
    re-encoding)."""

    name = NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {
        DATASET_VERSION: "Image-folder tree with original encoded bytes, label and file name."
    }
    # Only used to locate download checksums (we download nothing). TFDS 4.9.10's lookup for
    # builders inside a package touches the `importlib_resources` backport, which Python >= 3.9
    # installs do not have.
    code_path = None

    def __init__(self, *, root: str | os.PathLike, **kwargs):
        self._root = pathlib.Path(root)
        self._class_names, self._splits = check_layout(self._root)
        self.fingerprint = source_fingerprint(self._root, self._class_names, self._splits)
        self.report = BuildReport()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # A builder outside a TFDS dataset package must build DatasetInfo itself
        # (dataset_info_from_configs needs the package's metadata folder and raises
        # NotADirectoryError).
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Image folder {self._root}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "label": tfds.features.ClassLabel(names=self._class_names),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        files = list_images(self._root / split, self._class_names)
        log.info("%s: %d image files in %d classes", split, len(files), len(self._class_names))
        skipped = self.report.skipped.setdefault(split, [])
        kept = 0
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) * 4)
        ) as pool:
            for start in range(0, len(files), _READ_CHUNK):
                chunk = files[start:start + _READ_CHUNK]
                for (path, class_name), (data, error) in zip(
                    chunk, pool.map(read_verified, [p for p, _ in chunk])
                ):
                    file_name = f"{class_name}/{path.name}"
                    if data is None:
                        log.warning("skipping unreadable image %s (%s)", path, error)
                        skipped.append(file_name)
                        continue
                    kept += 1
                    yield file_name, {"image": data, "label": class_name, "file_name": file_name}
        self.report.num_examples[split] = kept
        if not kept:
            raise ImageFolderError(f"split {split!r} of {str(self._root)!r} has no readable images")


def source_fingerprint(root: pathlib.Path, class_names: list[str], splits: list[str]) -> dict:
    """What a build depends on: the class list and, per split, the image files' names and sizes (a
    count, a byte total and a SHA-256 of the sorted "class/file size" lines)."""
    out = {"classes": class_names, "splits": {}}
    for split in splits:
        digest, total, files = hashlib.sha256(), 0, list_images(root / split, class_names)
        for path, class_name in files:
            size = epath.Path(path).stat().length
            total += size
            digest.update(f"{class_name}/{path.name}\t{size}\n".encode())
        out["splits"][split] = {"files": len(files), "bytes": total, "sha256": digest.hexdigest()}
    return out


def _describe(fingerprint: dict) -> str:
    splits = ", ".join(
        f"{s}: {v['files']} files, {v['bytes']} bytes" for s, v in fingerprint["splits"].items()
    )
    return f"{len(fingerprint['classes'])} classes ({', '.join(fingerprint['classes'][:5])}" + \
        f"{', ...' if len(fingerprint['classes']) > 5 else ''}); {splits}"


def _check_source(built: epath.Path, fingerprint: dict, root: str | os.PathLike) -> None:
    """Refuses to reuse a dataset built from another tree than ``fingerprint`` describes."""
    record = built / SOURCE_FILE
    if not record.exists():
        log.warning(
            "%s holds no record of the tree it was built from (built before it was recorded); "
            "reusing "
            "it unchecked (pass --rebuild to build it again from %s)",
            built,
            root,
        )
        return
    old = json.loads(record.read_text())
    if {k: old[k] for k in ("classes", "splits")} != fingerprint:
        raise ImageFolderError(
            f"{built} was built from another tree ({old.get('root')}: {_describe(old)}) than {root}"
            " is now "
            f"({_describe(fingerprint)}); pass --rebuild to build it again, or a new --data_dir"
        )


def build_imagefolder(
    root: str | os.PathLike, data_dir: str | os.PathLike, rebuild: bool = False
) -> ImageFolder:
    """Builds ``<data_dir>/imagefolder/1.0.0`` from the tree at ``root``, or reuses it when it was
    built from the same tree (same classes, file names and sizes); a dataset built from another tree
    is refused, or with ``rebuild`` built again."""
    builder = ImageFolder(root=root, data_dir=os.fspath(data_dir), file_format="array_record")
    built = epath.Path(builder.data_dir)
    if (built / "dataset_info.json").exists() and not rebuild:
        _check_source(built, builder.fingerprint, root)
    mode = tfds.download.GenerateMode
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=mode.FORCE_REDOWNLOAD if rebuild else mode.REUSE_DATASET_IF_EXISTS))
    if builder.report.num_examples:  # built now, not reused
        (built / SOURCE_FILE).write_text(
            json.dumps({"root": os.path.abspath(root), **builder.fingerprint}, indent=1)
        )
    for split, names in builder.report.skipped.items():
        if names:
            log.warning("%s: skipped %d unreadable images, e.g. %s", split, len(names), names[:5])
    return builder


def dataset_dir(data_dir: str | os.PathLike) -> epath.Path:
    """The folder holding ``dataset_info.json``: ``data_dir`` itself or
    ``<data_dir>/imagefolder/<version>``."""
    data_dir = storage.path(data_dir)  # a bucket too: TFDS and the ArrayRecord reader read gs://
    for candidate in (data_dir, data_dir / NAME / DATASET_VERSION):
        if (candidate / "dataset_info.json").is_file():
            return candidate
    raise ImageFolderError(
        f"no built image-folder dataset under {str(data_dir)!r} (looked for dataset_info.json "
        "there and in "
        f"{NAME}/{DATASET_VERSION}/); build it with `python -m detailflow_jax.data.imagefolder "
        "--root <tree> "
        f"--data_dir {data_dir}`"
    )


def open_imagefolder(data_dir: str | os.PathLike, split: str):
    """(grain-compatible random-access source, class names) of a built dataset; records are
    ``{"image": bytes, "label": int, "file_name": bytes}``."""
    builder = tfds.builder_from_directory(os.fspath(dataset_dir(data_dir)))
    if split not in builder.info.splits:
        raise ImageFolderError(f"split {split!r} not in the dataset at {str(data_dir)!r}; "
                               f"available: {sorted(builder.info.splits)}")
    return builder.as_data_source(split), list(builder.info.features["label"].names)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("root", None, "folder holding train/<class>/* and optionally "
                        "val/<class>/*", flag_values=fv, required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir to write the ArrayRecord dataset into",
                        flag_values=fv, required=True)
    flags.DEFINE_bool("rebuild", False, "build again when --data_dir holds a dataset built from "
                      "another tree (refused otherwise)", flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, _define_flags)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        builder = build_imagefolder(args.root, args.data_dir, args.rebuild)
    # run as __main__, this module's errors are not the ones cli_errors knows
    except ImageFolderError as e:
        cli_errors.fail(e)
    for split, info in builder.info.splits.items():
        skipped = builder.report.skipped.get(split)
        note = (
            "already built, reused"
            if skipped is None
            else f"{len(skipped)} unreadable files skipped"
        )
        print(f"{split}: {info.num_examples} examples ({note})")
    print(f"classes: {builder.info.features['label'].num_classes}; written to {builder.data_dir}")


if __name__ == "__main__":
    cli_errors.run(main)
