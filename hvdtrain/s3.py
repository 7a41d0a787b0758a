"""Plain S3 requests signed with AWS Signature V4 from the standard environment variables (no SDK): the checks of
:func:`hvdtrain.storage.check` and bucket creation for local servers and tests.

    python -m hvdtrain.s3 create-bucket NAME
"""
from __future__ import annotations

import os
import sys

from hvdtrain.errors import HvdtrainError


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


def s3_request(method: str, bucket: str, key: str = "", timeout: float = 10.0) -> int:
    """One S3 request on ``bucket``/``key``, signed with AWS Signature V4 from the standard environment variables;
    returns the HTTP status. Raises ``OSError`` when the endpoint cannot be reached."""
    import datetime
    import hashlib
    import hmac
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    endpoint = s3_endpoint()
    host = endpoint.split("://", 1)[1]
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    region = os.environ.get("AWS_REGION", "us-east-1")
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    path = "/" + quote(bucket) + ("/" + quote(key) if key else "")
    headers = f"host:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{stamp}\n"
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = f"{method}\n{path}\n\n{headers}\n{signed}\n{payload}"
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key_bytes = ("AWS4" + secret).encode()
    for part in (day, region, "s3", "aws4_request"):
        key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(endpoint + path, method=method, headers={
        "x-amz-date": stamp, "x-amz-content-sha256": payload,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, "
                         f"Signature={signature}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


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
