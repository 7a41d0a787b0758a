"""``s3://`` through boto3, the AWS SDK for Python: the operations hvdtrain's storage needs (head, get, ranged get,
put, list, delete, multipart upload, buckets), one client per process, configured from the usual variables.

Configuration, as the AWS tools and tensorflow-io read it:

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN`` for temporary credentials; boto3's
  other sources, profiles and instance roles, too),
- ``AWS_REGION`` (default ``us-east-1``),
- ``S3_ENDPOINT``: ``host:port`` or a URL, for Ceph, MinIO and other gateways (``S3_USE_HTTPS=0`` for plain
  HTTP when no scheme is given; ``S3_VERIFY_SSL=0`` to accept a self-signed certificate); unset means AWS.

Requests use path-style addressing (``ENDPOINT/bucket/key``), which every S3 gateway serves; botocore retries a
request that fails on the network or with a 5xx answer (3 attempts, its standard mode, with backoff). Files above
:data:`PART_BYTES` are uploaded in parts of that size by boto3's transfer manager (S3's multipart upload, aborted on
failure), so a file of any size streams from disk. Failures become ``FileNotFoundError`` (404), ``PermissionError``
(401, 403) or :class:`S3Error` (anything else; status 0 when the endpoint cannot be reached), which
:mod:`hvdtrain.storage` turns into one-line messages.

    python -m hvdtrain.s3 create-bucket NAME
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from hvdtrain.errors import HvdtrainError

PART_BYTES = 64 * 1024 * 1024  # multipart upload above this size, in parts of this size
LIST_PAGE = 1000  # keys per listing request (S3 answers at most 1000)
ATTEMPTS = 3
_clients: dict = {}
_lock = threading.Lock()


class S3Error(OSError):
    """An S3 request that failed: ``status`` is the HTTP status (0 when the endpoint could not be reached)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def s3_endpoint() -> str:
    """The S3 endpoint as a URL, from ``S3_ENDPOINT`` (and ``S3_USE_HTTPS``), as tensorflow-io reads them."""
    endpoint = os.environ.get("S3_ENDPOINT", "")
    if not endpoint:
        region = os.environ.get("AWS_REGION", "us-east-1")
        return f"https://s3.{region}.amazonaws.com"
    if "://" in endpoint:
        return endpoint.rstrip("/")
    https = os.environ.get("S3_USE_HTTPS", "1") not in ("0", "false", "False")
    return f"{'https' if https else 'http'}://{endpoint}".rstrip("/")


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://"):] if str(uri).startswith("s3://") else str(uri)
    bucket, _, key = rest.partition("/")
    return bucket, key


def client(timeout: float = 60.0):
    """The process's boto3 S3 client for the current configuration (made once per endpoint and timeout; botocore's
    clients are thread-safe)."""
    key = (s3_endpoint(), os.environ.get("AWS_REGION", "us-east-1"), os.environ.get("S3_VERIFY_SSL", "1"), timeout)
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            # checksums only where S3 requires them: botocore 1.36+ adds CRC32 trailers to every upload by default,
            # which S3 gateways other than AWS (Ceph's radosgw 16 among them) refuse or mis-store
            config = Config(s3={"addressing_style": "path"}, signature_version="s3v4", connect_timeout=min(10, timeout),
                            read_timeout=timeout, retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                            max_pool_connections=32, request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=key[0] if os.environ.get("S3_ENDPOINT") else None, region_name=key[1],
                config=config, verify=key[2] not in ("0", "false", "False"))
        return _clients[key]


def _call(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with botocore's failures as the ``OSError`` of their kind (see the module doc)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        code = exc.response.get("Error", {}).get("Code", "")
        detail = f"{what}: HTTP {status}" + (f" {code}" if code and code != str(status) else "")
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(detail) from None
        if status in (401, 403):
            raise PermissionError(detail) from None
        raise S3Error(detail, status) from None
    except BotoCoreError as exc:  # could not connect, or the connection broke after the retries
        raise S3Error(f"{what}: {exc}", 0) from None


# ---------------------------------------------------------------------------------------------------------------
# Operations on s3:// URIs (used by hvdtrain.storage)


def stat(uri: str) -> tuple[int, str] | None:
    """The size and ETag of the object at ``uri``, or ``None`` when there is none."""
    bucket, key = split(uri)
    if not key:
        return None
    try:
        answer = _call(f"HEAD {uri}", client().head_object, Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return int(answer["ContentLength"]), answer.get("ETag", "").strip('"')


def head(uri: str) -> int | None:
    """The size of the object at ``uri``, or ``None`` when there is none."""
    found = stat(uri)
    return None if found is None else found[0]


def bucket_exists(bucket: str) -> bool:
    try:
        _call(f"HEAD s3://{bucket}", client().head_bucket, Bucket=bucket)
    except FileNotFoundError:
        return False
    return True


def list_objects(bucket: str, prefix: str, delimiter: str = "") -> tuple[list[str], list[str]]:
    """Keys and (with ``delimiter``) common prefixes under ``prefix``, all pages (ListObjectsV2)."""
    pages = client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, **({"Delimiter": delimiter} if delimiter else {}),
        PaginationConfig={"PageSize": LIST_PAGE})
    keys, prefixes = [], []

    def walk():
        for page in pages:
            keys.extend(item["Key"] for item in page.get("Contents", []))
            prefixes.extend(item["Prefix"] for item in page.get("CommonPrefixes", []))

    _call(f"list s3://{bucket}/{prefix}", walk)
    return keys, prefixes


def get(uri: str) -> bytes:
    """The bytes of the object at ``uri``."""
    bucket, key = split(uri)
    return _call(f"read {uri}", lambda: client().get_object(Bucket=bucket, Key=key)["Body"].read())


def get_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of the object at ``uri`` (an HTTP range request: only those bytes travel)."""
    bucket, key = split(uri)
    data = _call(f"read {uri}", lambda: client().get_object(Bucket=bucket, Key=key,
                                                            Range=f"bytes={start}-{stop - 1}")["Body"].read())
    if len(data) != stop - start:
        raise S3Error(f"read {uri}: asked for bytes {start}-{stop - 1}, got {len(data)} bytes", 416)
    return data


def _transfer():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, use_threads=True)


def download(uri: str, path: Path) -> None:
    """The object at ``uri`` into the local file ``path`` (streamed; the file appears whole or not at all: boto3
    writes a temporary file and renames it)."""
    bucket, key = split(uri)
    _call(f"read {uri}", client(300.0).download_file, bucket, key, str(path), Config=_transfer())


def put(uri: str, data: bytes) -> None:
    """Write ``data`` as the object at ``uri`` (one request: the object appears whole or not at all)."""
    bucket, key = split(uri)
    _call(f"write {uri}", client().put_object, Bucket=bucket, Key=key, Body=data)


def upload(path: Path, uri: str) -> None:
    """The local file ``path`` as the object at ``uri``: one request up to :data:`PART_BYTES`, else a multipart
    upload (the object appears only when every part is in; a failed upload is aborted)."""
    bucket, key = split(uri)
    _call(f"write {uri}", client(300.0).upload_file, str(path), bucket, key, Config=_transfer())


def delete(uri: str) -> None:
    """Delete the object at ``uri`` (nothing when there is none)."""
    bucket, key = split(uri)
    try:
        _call(f"delete {uri}", client().delete_object, Bucket=bucket, Key=key)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Buckets (for local servers, tests and storage.check)


def s3_request(method: str, bucket: str, key: str = "", timeout: float = 10.0) -> int:
    """``HEAD`` or ``PUT`` on a bucket; returns the HTTP status. Raises :class:`S3Error` (an ``OSError``) when the
    endpoint cannot be reached."""
    call = {"HEAD": "head_bucket", "PUT": "create_bucket"}[method]
    try:
        _call(f"{method} s3://{bucket}", getattr(client(timeout), call), Bucket=bucket)
    except FileNotFoundError:
        return 404
    except PermissionError as exc:
        return 403 if "403" in str(exc) else 401
    except S3Error as exc:
        if exc.status == 0:
            raise
        return exc.status
    return 200


def create_bucket(name: str) -> None:
    """Create an S3 bucket (for local servers and tests; an existing bucket is fine)."""
    status = s3_request("PUT", name)
    if status not in (200, 409):
        hint = " (bucket names are 3-63 lowercase letters, digits, dots and hyphens)" if status == 400 else ""
        raise HvdtrainError(f"cannot create bucket '{name}' at {s3_endpoint()}: HTTP {status}{hint}")


if __name__ == "__main__":  # python -m hvdtrain.s3 create-bucket NAME
    if len(sys.argv) == 3 and sys.argv[1] == "create-bucket":
        try:
            create_bucket(sys.argv[2])
        except (HvdtrainError, OSError) as exc:
            sys.exit(f"error: {exc}")
        print(f"s3://{sys.argv[2]}")
    else:
        sys.exit("usage: python -m hvdtrain.s3 create-bucket NAME")
