"""hvdtrain's S3 client: the requests ``s3://`` URIs need (get, put, head, list, delete, multipart upload), signed
with AWS Signature V4 from the standard environment variables, over the standard library only (no SDK, no
tensorflow-io, so the same code serves every TensorFlow version).

Configuration, as the AWS tools and tensorflow-io read it:

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN`` for temporary credentials),
- ``AWS_REGION`` (default ``us-east-1``),
- ``S3_ENDPOINT``: ``host:port`` or a URL, for Ceph, MinIO and other gateways (``S3_USE_HTTPS=0`` for plain
  HTTP when no scheme is given); unset means AWS (``https://s3.REGION.amazonaws.com``).

Requests use path-style addressing (``ENDPOINT/bucket/key``), which every S3 gateway serves. Connections are kept
alive per thread; a request that fails on the network or with a 5xx answer is retried (3 attempts, backoff).
Files above 64 MiB are uploaded in parts (S3's multipart upload), so a file of any size streams from disk.

    python -m hvdtrain.s3 create-bucket NAME
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import os
import re
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from hvdtrain.errors import HvdtrainError

PART_BYTES = 64 * 1024 * 1024  # multipart upload above this size, in parts of this size
CHUNK = 1024 * 1024
LIST_PAGE = 1000  # keys per listing request (S3 answers at most 1000)
ATTEMPTS = 3
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_local = threading.local()


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


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class S3Error(OSError):
    """An S3 request that failed: ``status`` is the HTTP status (0 when the endpoint could not be reached)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def _signing_key(secret: str, day: str, region: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _headers(method: str, host: str, path: str, query: dict[str, str], payload_sha256: str,
             extra: dict[str, str]) -> dict[str, str]:
    """The request's headers with its AWS Signature V4 ``Authorization``."""
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    region = os.environ.get("AWS_REGION", "us-east-1")
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    headers = {"host": host, "x-amz-content-sha256": payload_sha256, "x-amz-date": stamp,
               **{k.lower(): v for k, v in extra.items()}}
    if os.environ.get("AWS_SESSION_TOKEN"):
        headers["x-amz-security-token"] = os.environ["AWS_SESSION_TOKEN"]
    names = sorted(headers)
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
    canonical = "\n".join([method, path, canonical_query, "".join(f"{k}:{headers[k].strip()}\n" for k in names),
                           ";".join(names), payload_sha256])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(_signing_key(secret, day, region), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={';'.join(names)}, "
                                f"Signature={signature}")
    del headers["host"]  # http.client sends it
    return headers


def _connection(endpoint: str, timeout: float) -> http.client.HTTPConnection:
    """This thread's kept-alive connection to ``endpoint``."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    conn = pool.get(endpoint)
    if conn is None:
        scheme, host = endpoint.split("://", 1)
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = pool[endpoint] = cls(host, timeout=timeout)
    conn.timeout = timeout
    return conn


def _drop_connection(endpoint: str) -> None:
    conn = getattr(_local, "pool", {}).pop(endpoint, None)
    if conn is not None:
        conn.close()


def request(method: str, bucket: str, key: str = "", query: dict[str, str] | None = None,
            body: bytes | Path | tuple[Path, int, int] = b"", headers: dict[str, str] | None = None,
            sink: Path | None = None, timeout: float = 60.0) -> Response:
    """One signed request; ``body`` is bytes, a file, or ``(file, offset, length)``; with ``sink`` a successful
    answer's body streams to that file instead of memory. Network failures and 5xx answers are retried; the answer
    is returned whatever its status. Raises :class:`S3Error` (status 0) when the endpoint cannot be reached."""
    endpoint = s3_endpoint()
    host = endpoint.split("://", 1)[1]
    query = query or {}
    path = "/" + quote(bucket, safe="") + ("/" + quote(key, safe="/-_.~") if key else "")
    if isinstance(body, Path):
        body = (body, 0, body.stat().st_size)
    if isinstance(body, tuple):
        digest = hashlib.sha256()
        for chunk in _file_chunks(*body):
            digest.update(chunk)
        payload, length = digest.hexdigest(), body[2]
    else:
        payload, length = (hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256), len(body)
    target = path + ("?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" if v != "" else
                                    quote(k, safe="-_.~") for k, v in sorted(query.items())) if query else "")
    last: Exception | None = None
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(0.2 * 4 ** (attempt - 1))
        signed = _headers(method, host, path, query, payload, {**(headers or {}), "content-length": str(length)})
        conn = _connection(endpoint, timeout)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for k, v in signed.items():
                conn.putheader(k, v)
            conn.endheaders()
            if isinstance(body, tuple):
                for chunk in _file_chunks(*body):
                    conn.send(chunk)
            elif body:
                conn.send(body)
            answer = conn.getresponse()
            if sink is not None and 200 <= answer.status < 300:
                tmp = sink.with_name(f".{sink.name}.part")
                with open(tmp, "wb") as f:
                    while chunk := answer.read(CHUNK):
                        f.write(chunk)
                os.replace(tmp, sink)
                data = b""
            else:
                data = answer.read()
            result = Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
            if answer.getheader("connection", "").lower() == "close":
                _drop_connection(endpoint)
        except (OSError, http.client.HTTPException) as exc:
            _drop_connection(endpoint)
            last = exc
            continue
        if result.status >= 500 and attempt + 1 < ATTEMPTS:
            continue
        return result
    reason = getattr(last, "strerror", None) or str(last) or type(last).__name__
    if isinstance(last, ConnectionRefusedError):
        reason = f"[Errno {last.errno}] {last.strerror}"
    raise S3Error(reason, 0)


def _file_chunks(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk


def _error_code(body: bytes) -> str:
    match = re.search(rb"<Code>([^<]+)</Code>", body)
    return match.group(1).decode() if match else ""


def check_status(response: Response, what: str) -> Response:
    """``response`` when it succeeded; else the matching ``OSError`` (not found, permission, other)."""
    if 200 <= response.status < 300:
        return response
    detail = f"{what}: HTTP {response.status}" + (f" {_error_code(response.body)}" if response.body else "")
    if response.status == 404:
        raise FileNotFoundError(detail)
    if response.status in (401, 403):
        raise PermissionError(detail)
    raise S3Error(detail, response.status)


# ---------------------------------------------------------------------------------------------------------------
# Operations on s3:// URIs (used by hvdtrain.storage)


def stat(uri: str) -> tuple[int, str] | None:
    """The size and ETag of the object at ``uri``, or ``None`` when there is none."""
    bucket, key = split(uri)
    if not key:
        return None
    answer = request("HEAD", bucket, key)
    if answer.status == 404:
        return None
    check_status(answer, f"HEAD {uri}")
    return int(answer.headers.get("content-length", "0")), answer.headers.get("etag", "").strip('"')


def head(uri: str) -> int | None:
    """The size of the object at ``uri``, or ``None`` when there is none."""
    found = stat(uri)
    return None if found is None else found[0]


def bucket_exists(bucket: str) -> bool:
    answer = request("HEAD", bucket)
    if answer.status == 404:
        return False
    check_status(answer, f"HEAD s3://{bucket}")
    return True


def list_objects(bucket: str, prefix: str, delimiter: str = "") -> tuple[list[str], list[str]]:
    """Keys and (with ``delimiter``) common prefixes under ``prefix``, all pages (ListObjectsV2)."""
    keys, prefixes, token = [], [], None
    while True:
        query = {"list-type": "2", "prefix": prefix, "max-keys": str(LIST_PAGE)}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        answer = check_status(request("GET", bucket, query=query), f"list s3://{bucket}/{prefix}")
        root = ET.fromstring(answer.body)
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        keys += [e.findtext(f"{ns}Key") for e in root.findall(f"{ns}Contents")]
        prefixes += [e.findtext(f"{ns}Prefix") for e in root.findall(f"{ns}CommonPrefixes")]
        if root.findtext(f"{ns}IsTruncated") != "true":
            return keys, prefixes
        token = root.findtext(f"{ns}NextContinuationToken")


def get(uri: str) -> bytes:
    """The bytes of the object at ``uri``."""
    bucket, key = split(uri)
    return check_status(request("GET", bucket, key), f"read {uri}").body


def get_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of the object at ``uri`` (an HTTP range request: only those bytes travel)."""
    bucket, key = split(uri)
    data = check_status(request("GET", bucket, key, headers={"range": f"bytes={start}-{stop - 1}"}),
                        f"read {uri}").body
    if len(data) != stop - start:
        raise S3Error(f"read {uri}: asked for bytes {start}-{stop - 1}, got {len(data)} bytes", 416)
    return data


def download(uri: str, path: Path) -> None:
    """The object at ``uri`` into the local file ``path`` (streamed; the file appears whole or not at all)."""
    bucket, key = split(uri)
    check_status(request("GET", bucket, key, sink=Path(path), timeout=300.0), f"read {uri}")


def put(uri: str, data: bytes) -> None:
    """Write ``data`` as the object at ``uri`` (one request: the object appears whole or not at all)."""
    bucket, key = split(uri)
    check_status(request("PUT", bucket, key, body=data), f"write {uri}")


def upload(path: Path, uri: str) -> None:
    """The local file ``path`` as the object at ``uri``: one request up to :data:`PART_BYTES`, else a multipart
    upload (the object appears only when every part is in; a failed upload is aborted)."""
    bucket, key = split(uri)
    path = Path(path)
    total = path.stat().st_size
    if total <= PART_BYTES:
        check_status(request("PUT", bucket, key, body=path, timeout=300.0), f"write {uri}")
        return
    started = check_status(request("POST", bucket, key, query={"uploads": ""}), f"start upload of {uri}")
    upload_id = re.search(rb"<UploadId>([^<]+)</UploadId>", started.body).group(1).decode()
    try:
        parts = []
        for number, offset in enumerate(range(0, total, PART_BYTES), start=1):
            length = min(PART_BYTES, total - offset)
            answer = check_status(request("PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                                          body=(path, offset, length), timeout=300.0), f"write part {number} of {uri}")
            parts.append(f"<Part><PartNumber>{number}</PartNumber><ETag>{answer.headers['etag']}</ETag></Part>")
        xml = f"<CompleteMultipartUpload>{''.join(parts)}</CompleteMultipartUpload>".encode()
        done = check_status(request("POST", bucket, key, query={"uploadId": upload_id}, body=xml,
                                    timeout=300.0), f"finish upload of {uri}")
        if b"<Error>" in done.body:  # S3 may answer 200 with an error in the body
            raise S3Error(f"finish upload of {uri}: {_error_code(done.body)}", 200)
    except BaseException:
        request("DELETE", bucket, key, query={"uploadId": upload_id})
        raise


def delete(uri: str) -> None:
    """Delete the object at ``uri`` (nothing when there is none)."""
    bucket, key = split(uri)
    answer = request("DELETE", bucket, key)
    if answer.status != 404:
        check_status(answer, f"delete {uri}")


# ---------------------------------------------------------------------------------------------------------------
# Buckets (for local servers, tests and storage.check)


def s3_request(method: str, bucket: str, key: str = "", timeout: float = 10.0) -> int:
    """One S3 request on ``bucket``/``key``; returns the HTTP status. Raises ``OSError`` when the endpoint cannot
    be reached."""
    return request(method, bucket, key, timeout=timeout).status


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
