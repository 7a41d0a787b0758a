"""Where files live: a local path, or a URI of any file system TensorFlow knows (``s3://``, ``gs://``, ``hdfs://``).

Local paths use the operating system directly, and a write is atomic: it goes to a temporary name in the same
folder and is renamed into place. Object stores have no rename (a "rename" is a copy and a delete per object),
so a remote write is one upload to the final name (an object appears whole or not at all), and a *group* of files
(a checkpoint) is complete only when its marker file, written last, exists (see :mod:`hvdtrain.rundir`).

Remote URIs go through ``tf.io.gfile``; schemes other than ``gs://`` need tensorflow-io's file systems
(``pip install 'hvdtrain[s3]'``), imported here on first use.
"""
from __future__ import annotations

import glob as globbing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hvdtrain.errors import HvdtrainError, UsageError

# Schemes that tensorflow-io registers (TensorFlow 2.15 itself has only local files, gs:// and ram://).
IO_SCHEMES = ("s3", "hdfs", "viewfs", "har", "az", "http", "https")


def scheme(uri: str | Path) -> str:
    """The URI scheme (``s3``), or ``""`` for a local path."""
    text = str(uri)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def is_local(uri: str | Path) -> bool:
    """True for a path on this machine's file system (``file://`` included)."""
    return scheme(uri) in ("", "file")


def local_path(uri: str | Path) -> Path:
    """The local path of a local URI."""
    text = str(uri)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(uri: str | Path, *parts: str) -> str:
    """``uri/part/...``, for local paths and URIs alike."""
    if is_local(uri):
        return str(local_path(uri).joinpath(*parts))
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def parent(uri: str) -> str:
    """The folder that holds ``uri``."""
    if is_local(uri):
        return str(local_path(uri).parent)
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def basename(uri: str) -> str:
    """The last component of ``uri``."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def gfile():
    """``tf.io.gfile``, with tensorflow-io's file systems registered when installed."""
    import tensorflow as tf

    try:
        import tensorflow_io  # noqa: F401  (registers s3://, hdfs://, az://, http(s)://)
    except ImportError:
        pass
    return tf.io.gfile


def require_scheme(uri: str | Path) -> None:
    """Fail with one line when nothing on this machine can read ``uri``'s scheme."""
    s = scheme(uri)
    if s in ("", "file", "gs", "ram"):
        return
    if s not in IO_SCHEMES:
        raise UsageError(f"'{uri}': unknown storage scheme '{s}://'; use a local path, s3://, gs:// or hdfs://")
    try:
        import tensorflow_io  # noqa: F401
    except ImportError:
        raise UsageError(f"'{uri}' needs tensorflow-io for {s}:// URIs; install the extra: "
                         "pip install 'hvdtrain[s3]'") from None


def glob(pattern: str) -> list[str]:
    """Files and folders matching ``pattern`` (``*``, ``?``; locally also ``**``), sorted."""
    if is_local(pattern):
        return sorted(globbing.glob(str(local_path(pattern)), recursive=True))
    return sorted(gfile().glob(str(pattern)))


def size(uri: str) -> int:
    """Bytes in the file at ``uri``."""
    if is_local(uri):
        return local_path(uri).stat().st_size
    return int(gfile().stat(str(uri)).length)


def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri``."""
    if is_local(uri):
        return local_path(uri).exists()
    return gfile().exists(str(uri))


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a folder (on object stores: a prefix with objects under it)."""
    if is_local(uri):
        return local_path(uri).is_dir()
    return gfile().isdir(str(uri))


def makedirs(uri: str) -> None:
    """Create a folder and its parents (object stores need none; a marker object is not written)."""
    if is_local(uri):
        local_path(uri).mkdir(parents=True, exist_ok=True)
    else:
        gfile().makedirs(str(uri))


def listdir(uri: str) -> list[str]:
    """Names directly under ``uri`` (folders without a trailing slash); empty when it does not exist."""
    if is_local(uri):
        p = local_path(uri)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    g = gfile()
    folder = str(uri) if str(uri)[len(scheme(uri)) + 3:].strip("/").count("/") else str(uri).rstrip("/") + "/"
    if not g.exists(folder):
        return []
    return sorted({name.rstrip("/") for name in g.listdir(folder)})


def read_bytes(uri: str) -> bytes:
    """The bytes of a file."""
    if is_local(uri):
        return local_path(uri).read_bytes()
    with gfile().GFile(str(uri), "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    """The text of a file (UTF-8)."""
    return read_bytes(uri).decode("utf-8")


@contextmanager
def atomic_local(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to local ``path``; on success rename it onto ``path`` (a file or a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if path.is_dir() and tmp_path.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def staged(uri: str, suffix: str = "") -> Iterator[Path]:
    """Yield a local path to write ``uri``'s content to; on success it becomes ``uri`` in one step.

    Local: a temporary name in the same folder, renamed into place. Remote: a local temporary file, uploaded to
    ``uri`` in one upload. A failure inside the block leaves ``uri`` as it was.
    """
    if is_local(uri):
        with atomic_local(local_path(uri), suffix) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="hvdtrain-stage-") as folder:
        tmp = Path(folder) / (basename(uri) + suffix)
        yield tmp
        upload(tmp, uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` whole (atomically where the storage allows)."""
    if is_local(uri):
        with atomic_local(local_path(uri)) as tmp:
            tmp.write_bytes(data)
    else:
        with gfile().GFile(str(uri), "wb") as f:
            f.write(data)


def write_text(uri: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``uri`` whole."""
    write_bytes(uri, text.encode("utf-8"))


def upload(local: str | Path, uri: str) -> None:
    """Copy a local file, or a folder's files (recursively), to ``uri``."""
    local = Path(local)
    if local.is_dir():
        for child in sorted(local.iterdir()):
            upload(child, join(uri, child.name))
        return
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_local(target) as tmp:
            shutil.copyfile(local, tmp)
    else:
        gfile().copy(str(local), str(uri), overwrite=True)


def download(uri: str, local: str | Path) -> None:
    """Copy the file or folder at ``uri`` to the local path ``local``."""
    local = Path(local)
    if is_dir(uri):
        local.mkdir(parents=True, exist_ok=True)
        for name in listdir(uri):
            download(join(uri, name), local / name)
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    if is_local(uri):
        shutil.copyfile(local_path(uri), local)
    else:
        gfile().copy(str(uri), str(local), overwrite=True)


def remove(uri: str) -> None:
    """Delete a file, or a folder with everything under it; nothing when it does not exist."""
    if is_local(uri):
        p = local_path(uri)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
        return
    g = gfile()
    if g.isdir(str(uri)):
        g.rmtree(str(uri))
    elif g.exists(str(uri)):
        g.remove(str(uri))


# ---------------------------------------------------------------------------------------------------------------
# S3: checks before anything starts, with one-line reasons (the requests: hvdtrain.s3)


def check(uri: str | Path) -> None:
    """Fail with one line, before anything starts, when ``uri`` cannot be used: its scheme needs a missing
    package, or (S3) the endpoint cannot be reached, the bucket does not exist, or the credentials are refused."""
    require_scheme(uri)
    if scheme(uri) != "s3":
        return
    from hvdtrain.s3 import s3_endpoint, s3_request

    bucket = str(uri)[len("s3://"):].split("/", 1)[0]
    endpoint = s3_endpoint()
    try:
        status = s3_request("HEAD", bucket)
    except OSError as exc:
        raise HvdtrainError(f"cannot reach the S3 endpoint {endpoint} for '{uri}' ({exc}); check S3_ENDPOINT "
                            "and that the server is running") from None
    if status == 404:
        raise HvdtrainError(f"bucket '{bucket}' does not exist at {endpoint} (for '{uri}'); create it first")
    if status in (401, 403):
        raise HvdtrainError(f"{endpoint} refused access to bucket '{bucket}' (for '{uri}', HTTP {status}); check "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if not 200 <= status < 300:
        raise HvdtrainError(f"{endpoint} answered HTTP {status} for bucket '{bucket}' (for '{uri}')")


def used_object_storage() -> bool:
    """Whether this process loaded tensorflow-io's file systems (see :func:`exit_process`)."""
    return "tensorflow_io" in sys.modules
