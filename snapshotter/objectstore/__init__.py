"""Object stores: where a repository's bytes live (local folder or S3)."""
from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from ..errors import UsageError
from .base import ObjectInfo, ObjectMissing, ObjectStore, check_name

__all__ = ["ObjectInfo", "ObjectMissing", "ObjectStore", "check_name", "open_store"]


def open_store(url: str, *, endpoint_url: str | None = None, region: str | None = None,
               base_dir: str | None = None, timeout: float | None = None) -> ObjectStore:
    """The store a repository URL names: a plain path, ``file://PATH`` or ``s3://bucket/prefix``.

    A relative path is taken relative to ``base_dir`` (the config file's folder)
    or the working directory.  ``timeout`` (S3): seconds for each connect and each read.
    """
    if not url:
        raise UsageError("no repository given (use --repo or [repository] url)")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise UsageError(f"repository URL {url!r} names no bucket")
        from .s3 import S3Store
        return S3Store(parsed.netloc, parsed.path.lstrip("/"), endpoint_url=endpoint_url, region=region,
                       timeout=timeout)
    if parsed.scheme == "file":
        path = unquote(parsed.netloc + parsed.path)
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = url
    else:
        raise UsageError(f"unsupported repository URL scheme {parsed.scheme!r} in {url!r} (use a path, file:// or s3://)")
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    path = os.path.normpath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"repository path {path} is a file, not a folder")
    from .local import LocalStore
    return LocalStore(path)
