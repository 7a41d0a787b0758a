"""Where files live: a local path, or a URI of any file system TensorFlow knows (``s3://``, ``gs://``, ``hdfs://``).

Local paths use the operating system directly, and a write is atomic: it goes to a temporary name in the same
folder and is renamed into place. Object stores have no rename (a "rename" is a copy and a delete per object),
so a remote write is one upload to the final name (an object appears whole or not at all), and a *group* of files
(a checkpoint) is complete only when its marker file, written last, exists (see :mod:`hvdtrain.rundir`).

``s3://`` goes through hvdtrain's own S3 client (:mod:`hvdtrain.s3`: the standard library only, so it works the
same on every TensorFlow version); other remote URIs through ``tf.io.gfile`` (``gs://`` built in; ``hdfs://`` and
``az://`` need tensorflow-io's file systems, the ``hdfs`` extra on the tf2.15 stack, imported here on first use).

Code that only TensorFlow reads or writes (TFRecord shards, TensorBoard logs) gets local files for ``s3://``:
:func:`local_copy` downloads an object once into a cache, and a run's TensorBoard folder is staged and uploaded
(:mod:`hvdtrain.rundir`).
"""
from __future__ import annotations

import fnmatch
import glob as globbing
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hvdtrain import s3
from hvdtrain.errors import HvdtrainError, UsageError

# Schemes that tensorflow-io registers (TensorFlow itself has only local files, gs:// and ram://); s3:// is
# hvdtrain's own.
IO_SCHEMES = ("hdfs", "viewfs", "har", "az", "http", "https")


def scheme(uri: str | Path) -> str:
    """The URI scheme (``s3``), or ``""`` for a local path."""
    text = str(uri)
    if "://" not in text:
        return ""
    return text.split("://", 1)[0].lower()


def is_local(uri: str | Path) -> bool:
    """True for a path on this machine's file system (``file://`` included)."""
    return scheme(uri) in ("", "file")


BUILTIN = "builtin:"  # builtin:NAME[/FILE]: a Hugging Face checkpoint shipped with hvdtrain (hvdtrain/pretrained)


def local_path(uri: str | Path) -> Path:
    """The local path of a local URI (``builtin:NAME`` is the checkpoint ``NAME`` shipped with hvdtrain)."""
    text = str(uri)
    if text.startswith(BUILTIN):
        return builtin_path(text)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def builtin_path(uri: str) -> Path:
    """``builtin:NAME[/FILE]``: the checkpoint (or its file) shipped in hvdtrain's ``pretrained`` folder."""
    from importlib import resources

    name, _, rest = str(uri)[len(BUILTIN):].strip("/").partition("/")
    folder = Path(str(resources.files("hvdtrain") / "pretrained"))
    shipped = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if name not in shipped:
        raise UsageError(f"'{uri}' is not a checkpoint shipped with hvdtrain; shipped: "
                         f"{', '.join(BUILTIN + s for s in shipped) or 'none'}")
    return folder / name / rest if rest else folder / name


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


def is_s3(uri: str | Path) -> bool:
    """True for an ``s3://`` URI (served by :mod:`hvdtrain.s3`)."""
    return scheme(uri) == "s3"


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
    if s in ("", "file", "gs", "ram", "s3"):
        return
    if s not in IO_SCHEMES:
        raise UsageError(f"'{uri}': unknown storage scheme '{s}://'; use a local path, s3://, gs:// or hdfs://")
    try:
        import tensorflow_io  # noqa: F401
    except ImportError:
        raise UsageError(f"'{uri}' needs tensorflow-io for {s}:// URIs, which exists for TensorFlow 2.15 only: "
                         "the tf2.15 stack (HVDTRAIN_STACK=tf2.15 HVDTRAIN_EXTRAS=hdfs make setup; README: Two "
                         "stacks)") from None


def glob(pattern: str) -> list[str]:
    """Files and folders matching ``pattern`` (``*``, ``?``; locally also ``**``), sorted."""
    if is_local(pattern):
        return sorted(globbing.glob(str(local_path(pattern)), recursive=True))
    if is_s3(pattern):
        return _s3_glob(str(pattern))
    return sorted(gfile().glob(str(pattern)))


def _s3_glob(pattern: str) -> list[str]:
    """``glob`` on S3: list under the pattern's literal prefix, match each component (``*`` stays within one)."""
    bucket, key = s3.split(pattern)
    literal = re.split(r"[*?\[]", key, maxsplit=1)[0]
    keys, _ = s3.list_objects(bucket, literal)
    parts = key.split("/")
    found = set()
    for k in keys:
        names = k.split("/")
        if len(names) >= len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(names, parts)):
            found.add("/".join(names[:len(parts)]))  # a folder when the key goes deeper
    return sorted(f"s3://{bucket}/{k}" for k in found)


def size(uri: str) -> int:
    """Bytes in the file at ``uri``."""
    if is_local(uri):
        return local_path(uri).stat().st_size
    if is_s3(uri):
        found = s3.head(str(uri))
        if found is None:
            raise FileNotFoundError(f"no object at {uri}")
        return found
    return int(gfile().stat(str(uri)).length)


def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri``."""
    if is_local(uri):
        return local_path(uri).exists()
    if is_s3(uri):
        return s3.head(str(uri)) is not None or is_dir(uri)
    return gfile().exists(str(uri))


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a folder (on object stores: a prefix with objects under it)."""
    if is_local(uri):
        return local_path(uri).is_dir()
    if is_s3(uri):
        bucket, key = s3.split(str(uri))
        if not key.strip("/"):
            return s3.bucket_exists(bucket)
        return bool(_s3_children(str(uri)))
    return gfile().isdir(str(uri))


def _s3_children(uri: str) -> list[str]:
    """Names directly under the S3 prefix ``uri``."""
    bucket, key = s3.split(uri)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    try:
        keys, prefixes = s3.list_objects(bucket, prefix, delimiter="/")
    except FileNotFoundError:  # no such bucket
        return []
    return sorted({name[len(prefix):].rstrip("/") for name in keys + prefixes} - {""})


def makedirs(uri: str) -> None:
    """Create a folder and its parents (object stores need none; a marker object is not written)."""
    if is_local(uri):
        local_path(uri).mkdir(parents=True, exist_ok=True)
    elif not is_s3(uri):
        gfile().makedirs(str(uri))


def listdir(uri: str) -> list[str]:
    """Names directly under ``uri`` (folders without a trailing slash); empty when it does not exist."""
    if is_local(uri):
        p = local_path(uri)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    if is_s3(uri):
        return _s3_children(str(uri))
    g = gfile()
    folder = str(uri) if str(uri)[len(scheme(uri)) + 3:].strip("/").count("/") else str(uri).rstrip("/") + "/"
    if not g.exists(folder):
        return []
    return sorted({name.rstrip("/") for name in g.listdir(folder)})


def read_bytes(uri: str) -> bytes:
    """The bytes of a file."""
    if is_local(uri):
        return local_path(uri).read_bytes()
    if is_s3(uri):
        return s3.get(str(uri))
    with gfile().GFile(str(uri), "rb") as f:
        return f.read()


def read_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of a file (only those bytes are read, locally or from object storage)."""
    if is_s3(uri):
        return s3.get_range(str(uri), start, stop)
    if is_local(uri):
        with open(local_path(uri), "rb") as f:
            return os.pread(f.fileno(), stop - start, start)
    with gfile().GFile(uri, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


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
    elif is_s3(uri):
        s3.put(str(uri), data)
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
    elif is_s3(uri):
        s3.upload(local, str(uri))
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
    elif is_s3(uri):
        s3.download(str(uri), local)
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
    if is_s3(uri):
        bucket, key = s3.split(str(uri))
        if s3.head(str(uri)) is not None:
            s3.delete(str(uri))
        keys, _ = s3.list_objects(bucket, key.strip("/") + "/")
        for k in keys:
            s3.delete(f"s3://{bucket}/{k}")
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
    bucket = s3.split(str(uri))[0]
    endpoint = s3.s3_endpoint()
    try:
        status = s3.s3_request("HEAD", bucket)
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


# ---------------------------------------------------------------------------------------------------------------
# Local copies of remote files, for readers that only open local files (TFRecord shards read by tf.data)


def cache_dir() -> Path:
    """Where :func:`local_copy` keeps downloads: ``HVDTRAIN_CACHE`` (default ``~/.cache/hvdtrain``)/``objects``."""
    return Path(os.environ.get("HVDTRAIN_CACHE") or Path.home() / ".cache" / "hvdtrain") / "objects"


def local_copy(uri: str) -> str:
    """A local path with the content of ``uri``: the path itself when local or when TensorFlow reads the scheme;
    for ``s3://`` a download kept in :func:`cache_dir`, named after the URI and the object's ETag, so that ranks
    on one machine and later runs share it (written under a temporary name, renamed when whole)."""
    if not is_s3(uri):
        return str(local_path(uri)) if is_local(uri) else str(uri)
    found = s3.stat(uri)
    if found is None:
        raise FileNotFoundError(f"no object at {uri}")
    length, etag = found
    name = hashlib.sha256(f"{uri}\n{etag}\n{length}".encode()).hexdigest()[:24] + "-" + basename(uri)
    target = cache_dir() / name
    if not (target.exists() and target.stat().st_size == length):
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_local(target) as tmp:
            s3.download(uri, tmp)
    return str(target)
