"""One path type for every file the project reads or writes: ``etils.epath``.

Local paths and bucket URIs (``gs://bucket/run``; any filesystem epath knows) behave the same, so a
work directory, a code directory or a weight directory may live on a bucket. ``gs://`` needs gcsfs
(``pip install -e '.[gcs]'``; orbax, tensorstore and the ArrayRecord reader reach buckets by
themselves). A bucket object appears whole when its write closes. Readers that need a local file
(the converters' checkpoint readers) get a local copy (``local_copy``); the ArrayRecord writer
writes a local file that is then uploaded (data/codes.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from typing import Any, Iterable, Iterator

import numpy as np
from etils import epath

from detailflow_jax.config_lib import ConfigError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def is_uri(path: PathLike) -> bool:
    """True for ``scheme://...`` (a bucket), False for a local path."""
    return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
    """``p`` as an epath.Path: a local path made absolute, a URI kept as it is."""
    p = epath.Path(p)
    return p if is_uri(p) else p.absolute()


def read_json(p: PathLike) -> Any:
    return json.loads(path(p).read_text())


def write_json(p: PathLike, value: Any, indent: int | None = 1) -> None:
    path(p).write_text(json.dumps(value, indent=indent))


def save_image(image, p: PathLike, **options) -> epath.Path:
    """Saves a PIL image (the format from the suffix, e.g. ``.png``; ``options`` go to
    ``Image.save``), making the parent folder."""
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as f:
        image.save(f, format=p.suffix.lstrip(".").upper() or "PNG", **options)
    return p


def save_npz(p: PathLike, **arrays: np.ndarray) -> None:
    # zipfile streams into a bucket object (it does not need to seek back)
    with path(p).open("wb") as f:
        np.savez(f, **arrays)


def load_npz(p: PathLike) -> dict[str, np.ndarray]:
    with path(p).open("rb") as f, np.load(f) as data:
        return {k: data[k] for k in data.files}


@contextlib.contextmanager
def written_whole(p: PathLike) -> Iterator[epath.Path]:
    """Yields where to write file ``p`` so that readers never see part of it: locally a sibling
    ``.tmp`` file, renamed to ``p`` once the block succeeds; on a bucket ``p`` itself, as an object
    appears only when its upload completes (a rename there would be a copy)."""
    p = path(p)
    if is_uri(p):
        yield p
        return
    tmp = p.with_name(p.name + ".tmp")
    yield tmp
    tmp.replace(p)


def _bucket(p: epath.Path) -> epath.Path:
    scheme, rest = os.fspath(p).split("://", 1)
    return epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")


def prepare_dir(p: PathLike) -> epath.Path:
    """Creates directory ``p`` (and its parents). On a bucket, first checks that the bucket exists
    and that this account may write to it, so a wrong name or a missing role stops a run before it
    has computed anything (object stores would only say so at the first write)."""
    p = path(p)
    if is_uri(p):
        check_bucket(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


def check_bucket(p: PathLike) -> None:
    """For a bucket URI: FileNotFoundError when the bucket does not exist, PermissionError when this
    account may not write to ``p``, ConfigError when the client is not installed (each says what to
    do)."""
    p = path(p)
    bucket = _bucket(p)
    probe = p / f".write-check-{uuid.uuid4().hex}"  # one per process: several may start at once
    try:
        if not bucket.exists():
            raise FileNotFoundError(
                f"bucket {bucket} does not exist: create it (gcloud storage buckets create "
                f"{bucket}) or fix the name in {p}"
            )
        probe.write_text("")
        probe.unlink()
    except ImportError as e:
        raise ConfigError(
            f"{p}: {e}; install the cloud storage client with pip install -e '.[gcs]'"
        ) from None
    except FileNotFoundError:
        raise
    except OSError as e:  # gcsfs: "Forbidden: ..." (HTTP 403)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PermissionError(
            f"cannot write to {p} ({reason}): grant this account write access to {bucket} "
            "(e.g. roles/storage.objectUser) or pass another directory"
        ) from None


def cache_dir(p: PathLike) -> epath.Path:
    """The local folder that mirrors bucket directory ``p``
    (``$TMPDIR/detailflow_jax/<scheme>/<path>``)."""
    scheme, rest = os.fspath(p).split("://", 1)
    return epath.Path(tempfile.gettempdir()) / "detailflow_jax" / scheme / rest.strip("/")


def local_copy(files: Iterable[PathLike]) -> list[str]:
    """Local paths of ``files``: local files as they are; bucket files copied into ``cache_dir``,
    for readers that can only open local files (a copy is reused while the object keeps its size and
    modification time)."""
    out = []
    for f in files:
        if not is_uri(f):
            out.append(os.fspath(f))
            continue
        f = epath.Path(f)
        local, remote = cache_dir(f), f.stat()
        if not (
            local.exists()
            and (local.stat().length, local.stat().mtime) == (remote.length, remote.mtime)
        ):
            local.parent.mkdir(parents=True, exist_ok=True)
            log.info("copying %s to %s", f, local)
            partial = local.with_name(local.name + f".part-{os.getpid()}")
            f.copy(partial, overwrite=True)
            os.utime(partial, (remote.mtime, remote.mtime))  # what the next call compares
            partial.replace(local)
        out.append(os.fspath(local))
    return out
