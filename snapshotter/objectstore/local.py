"""A repository in a local folder (the default).

Writes go to a temporary file in the target folder, are fsynced, then linked
into place, so a crash leaves either no object or the whole object.  ``link``
(not ``rename``) makes create-only writes atomic: it fails if the name exists,
where rename would silently replace it.
"""
from __future__ import annotations

import errno
import os
import tempfile
from typing import Iterator

from ..errors import StoreError, UsageError
from .base import ObjectInfo, ObjectMissing, ObjectStore, check_name


def _load_libc(name: str, argtypes: list | None = None):
    try:
        import ctypes
        fn = getattr(ctypes.CDLL("libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes is not None:
        fn.argtypes = [getattr(ctypes, t) for t in argtypes]
    return fn


_syncfs = _load_libc("syncfs")
_sync_file_range = _load_libc("sync_file_range", ["c_int", "c_int64", "c_int64", "c_uint"])
_SYNC_FILE_RANGE_WRITE = 2  # start writing the file's dirty pages back, without waiting


class LocalStore(ObjectStore):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        self._made_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        check_name(name)
        path = os.path.join(self.root, *name.split("/"))
        # check_name already forbids '..' and absolute parts; this is the belt to its braces
        if os.path.commonpath([self.root, path]) != self.root:
            raise UsageError(f"object name {name!r} escapes the repository")
        return path

    def _ensure_dir(self, folder: str) -> None:
        if folder in self._made_dirs:
            return
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create folder {folder}: {exc.strerror}") from exc
        self._made_dirs.add(folder)

    def put(self, name: str, data: bytes, *, overwrite: bool = False, durable: bool = True) -> bool:
        path = self._path(name)
        folder = os.path.dirname(path)
        self._ensure_dir(folder)
        if not overwrite and os.path.exists(path):
            return False
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        except FileNotFoundError:
            self._made_dirs.discard(folder)
            self._ensure_dir(folder)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        except OSError as exc:
            raise StoreError(f"cannot write {name}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
                elif _sync_file_range is not None:
                    # the disk starts on it now, so the one syncfs before the commit has less to wait for
                    _sync_file_range(fh.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)
            if overwrite:
                os.replace(tmp, path)
                created = True
            else:
                try:
                    os.link(tmp, path)
                    created = True
                except FileExistsError:
                    created = False
                os.unlink(tmp)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno == errno.ENOSPC:
                raise StoreError(f"no space left while writing {name}") from exc
            raise StoreError(f"cannot write {name}: {exc.strerror}") from exc
        if created:
            if durable:
                self._fsync_dir(folder)
            else:
                self._pending_sync = True
        return created

    def flush(self) -> None:
        # one syncfs for the whole batch costs what a few fsyncs do, where a
        # snapshot writes thousands of chunks
        if not getattr(self, "_pending_sync", False):
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot open {self.root} to sync it: {exc.strerror}") from exc
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)
        self._pending_sync = False

    @staticmethod
    def _fsync_dir(folder: str) -> None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise ObjectMissing(f"object {name} is missing from {self.url}") from None
        except IsADirectoryError:
            raise ObjectMissing(f"object {name} is a folder in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {name}: {exc.strerror}") from exc

    def stat(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {name}: {exc.strerror}") from exc
        if not os.path.isfile(path):
            return None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # walk only the folder the prefix names, then filter by the rest
        folder_part, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *folder_part.split("/")) if folder_part else self.root
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            for fn in sorted(filenames):
                if fn.startswith(".tmp-"):
                    continue
                name = rel_dir + fn
                if not name.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                yield ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete {name}: {exc.strerror}") from exc
