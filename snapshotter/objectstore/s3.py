"""A repository in S3 or any S3-compatible store, through botocore.

Credentials come only from boto3's normal chain (environment, shared files,
instance roles); the repository URL and config file never hold them.
Create-only writes use ``If-None-Match: *``; a store that does not implement
the header is caught by a HEAD first, so chunks are still written once.
Objects over the multipart threshold are uploaded in parts, and the
completion is conditional too.

botocore retries a request whose answer did not arrive; two things it does not
cover are handled here.  A create-only put retried after its first attempt
took effect gets 412 from the store although this call created the object, so
a 412 after retries is checked against the object's bytes.  A GET whose body
breaks off, or fails the store's checksum, after the headers arrived is not
retried by botocore, so ``get`` retries it.

One client per store, built at its first request and reused by every request
after: a command that never touches the store (a refused name, ``--help``)
pays nothing for it.  botocore is used directly rather than through boto3:
boto3's session adds its resource layer and s3transfer, a tenth of a second of
imports at every start that no request here needs (the credential chain is
botocore's either way).
"""
from __future__ import annotations

import random
import re
import threading
import time
from typing import Iterator

from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                 FlexibleChecksumError, HTTPClientError, IncompleteReadError, NoCredentialsError,
                                 ReadTimeoutError)

from ..errors import IntegrityError, StoreError, UsageError
from ..timeouts import DEFAULT_TIMEOUT, timed_out
from .base import ObjectInfo, ObjectMissing, ObjectStore, check_name, valid_name

MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
#: reads of one GET body before giving up (the request itself is retried by botocore within each)
BODY_ATTEMPTS = 6
#: attempts at a command's first contact with the endpoint: a wrong endpoint, a network that is
#: down or an endpoint that takes connections and never answers fails in seconds (3 timeouts), not
#: after a minute of backed-off retries; once it answered, the store's requests get botocore's
#: full retries (8 attempts, each bounded by the timeout)
REACH_ATTEMPTS = 3
#: attempts of each request once the endpoint answered (botocore's standard retry mode)
MAX_ATTEMPTS = 8
#: a request still timing out this many timeouts after its first timeout is given up
TIMED_OUT_FOR = 3

# what botocore accepts (S3 itself is stricter; S3-compatible stores vary)
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{0,254}$")

# errors raised while reading a GET body, after botocore's own retries are over
_BODY_ERRORS = (IncompleteReadError, HTTPClientError, FlexibleChecksumError)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _retried(exc: ClientError) -> bool:
    return int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0) > 0


class _ShortBody(Exception):
    pass


class S3Store(ObjectStore):
    extra_requests = 4

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, max_pool: int = 16, timeout: float | None = None):
        if not _BUCKET.match(bucket):
            raise UsageError(f"invalid S3 bucket name {bucket!r} in the repository URL")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        #: seconds for each connect and each read of a request's answer ([repository] timeout)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self._endpoint_url, self._region, self._max_pool = endpoint_url, region, max_pool
        self._client = None
        self._client_lock = threading.Lock()
        self._conditional_put = True
        self._reached = False

    @property
    def client(self):
        """The store's one botocore S3 client, built at the first request."""
        if self._client is None:
            with self._client_lock:  # chunk uploads call from several threads
                if self._client is None:
                    self._client = self._new_client()
        return self._client

    def _new_client(self):
        import botocore.session
        from botocore.config import Config
        config = Config(
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            max_pool_connections=self._max_pool,
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
        )
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self._endpoint_url, region_name=self._region, config=config)
        # before the endpoint has answered once, a failure to connect is retried only
        # REACH_ATTEMPTS times (the handler runs before botocore's own retry decision)
        client.meta.events.register_first("needs-retry.s3", self._until_reached)
        return client

    def _until_reached(self, response=None, attempts: int = 0, caught_exception=None, request_dict=None, **_):
        """botocore's needs-retry hook: any answer (even an error) means the endpoint is
        there; until one came, the REACH_ATTEMPTS-th failure to connect ends the request.
        Once it answered, a request whose attempts keep timing out ends after timing out for
        TIMED_OUT_FOR timeouts' worth of time (a stalled endpoint: each attempt waits the
        timeout, and eight of them with backoff took minutes at a timeout of seconds)."""
        if response is not None:
            self._reached = True
            return None
        timing_out = isinstance(caught_exception, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError))
        if not timing_out:
            return None
        if not self._reached and attempts >= REACH_ATTEMPTS:
            raise caught_exception
        context = (request_dict or {}).get("context")
        if isinstance(context, dict):
            first = context.setdefault("snapshotter_first_timeout", time.monotonic())
            if time.monotonic() - first >= TIMED_OUT_FOR * self.timeout:
                raise caught_exception
        return None

    def _key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, action: str, name: str, exc: Exception) -> StoreError:
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"S3 {action} {self.url}/{name}: no credentials found (boto3 credential chain)")
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            attempts = MAX_ATTEMPTS if self._reached else REACH_ATTEMPTS
            return StoreError(timed_out(f"S3 {action} {self.url}/{name}", self.timeout,
                                        f"{'connect' if isinstance(exc, ConnectTimeoutError) else 'read'}, "
                                        f"up to {attempts} attempts; [repository] timeout"))
        if isinstance(exc, ClientError):
            return StoreError(f"S3 {action} {self.url}/{name} failed: {_code(exc)} {exc.response.get('Error', {}).get('Message', '')}".rstrip())
        return StoreError(f"S3 {action} {self.url}/{name} failed: {' '.join(str(exc).split())}")

    def put(self, name: str, data: bytes, *, overwrite: bool = False, durable: bool = True) -> bool:
        key = self._key(name)
        if not overwrite and not self._conditional_put and self.stat(name) is not None:
            return False
        try:
            if len(data) > MULTIPART_THRESHOLD:
                return self._put_multipart(key, data, overwrite)
            kwargs = {} if overwrite or not self._conditional_put else {"IfNoneMatch": "*"}
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)
            return True
        except ClientError as exc:
            if not overwrite and (_code(exc) == "PreconditionFailed" or _status(exc) == 412):
                # after a retry the object may be this call's own first attempt
                return _retried(exc) and self._holds(name, data)
            if not overwrite and _code(exc) in ("NotImplemented", "InvalidArgument") and self._conditional_put:
                # the store does not know If-None-Match: fall back to HEAD-then-PUT
                self._conditional_put = False
                return self.put(name, data, overwrite=overwrite)
            raise self._fail("put", name, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("put", name, exc) from exc

    def _put_multipart(self, key: str, data: bytes, overwrite: bool) -> bool:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), PART_SIZE), start=1):
                resp = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=bytes(view[start:start + PART_SIZE]))
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
            kwargs = {} if overwrite or not self._conditional_put else {"IfNoneMatch": "*"}
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts}, **kwargs)
            except ClientError as exc:
                # a retried completion whose first attempt went through: the upload is gone, the object there
                if _retried(exc) and _code(exc) in ("NoSuchUpload", "PreconditionFailed"):
                    name = key[len(self.prefix) + 1:] if self.prefix else key
                    if self._holds(name, data):
                        return True
                if not overwrite and (_code(exc) == "PreconditionFailed" or _status(exc) == 412):
                    return False
                raise
            return True
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:
                pass
            raise

    def _holds(self, name: str, data: bytes) -> bool:
        try:
            return self.get(name) == data
        except ObjectMissing:
            return False

    def get(self, name: str) -> bytes:
        key = self._key(name)
        last: Exception | None = None
        for attempt in range(BODY_ATTEMPTS):
            if attempt:
                time.sleep(min(5.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.0))
            try:
                try:
                    resp = self.client.get_object(Bucket=self.bucket, Key=key)
                except (ConnectTimeoutError, ReadTimeoutError) as exc:
                    # botocore retried the request already: a store that does not answer is not asked again
                    raise self._fail("get", name, exc) from exc
                body = resp["Body"].read()
                expected = resp.get("ContentLength")
                if expected is not None and len(body) != expected:
                    raise _ShortBody(f"truncated body ({len(body)} of {expected} bytes)")
                return body
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                    raise ObjectMissing(f"object {name} is missing from {self.url}") from None
                raise self._fail("get", name, exc) from exc
            except (_ShortBody, *_BODY_ERRORS) as exc:
                last = exc
            except BotoCoreError as exc:
                raise self._fail("get", name, exc) from exc
        if isinstance(last, FlexibleChecksumError):
            # the same object failed the store's own checksum on every read: it is corrupt at rest
            raise IntegrityError(f"object {name} is corrupt: its bytes do not match the store's checksum "
                                 f"({BODY_ATTEMPTS} reads)")
        raise self._fail("get", name, last) from last

    def stat(self, name: str) -> ObjectInfo | None:
        key = self._key(name)
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound") or _status(exc) == 404:
                return None
            raise self._fail("stat", name, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("stat", name, exc) from exc
        return ObjectInfo(name, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    if valid_name(obj["Key"][strip:]):
                        yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp())
        except ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                raise ObjectMissing(f"bucket {self.bucket} does not exist") from None
            raise self._fail("list", prefix, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("list", prefix, exc) from exc

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("delete", name, exc) from exc

    def ensure_bucket(self) -> None:
        """Used by ``init``: the bucket must exist and be reachable."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) == 404:
                raise ObjectMissing(f"bucket {self.bucket} does not exist") from None
            raise self._fail("head-bucket", "", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head-bucket", "", exc) from exc
