"""A repository in a local folder (the default).

Writes go to a temporary file in the target folder, are fsynced, then linked
into place, so a crash leaves either no object or the whole object.  ``link``
(not ``rename``) makes create-only writes atomic: it fails if the name exists,
where rename would silently replace it.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Iterator

from ..errors import IntegrityError, StoreError, UsageError
from .base import ObjectInfo, ObjectMissing, ObjectStore, check_name, valid_name


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
        #: folders under the root seen to be real folders, not links
        self._real_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        check_name(name)
        path = os.path.join(self.root, *name.split("/"))
        # check_name already forbids '..' and absolute parts; this is the belt to its braces
        if os.path.commonpath([self.root, path]) != self.root:
            raise UsageError(f"object name {name!r} escapes the repository")
        self._no_links(name.split("/")[:-1])
        return path

    # -- symbolic links ----------------------------------------------------------
    #
    # Nothing inside the root is followed: a link in place of a folder (quarantine/,
    # audit/, locks/, snapshots/, chunks/...) or of an object would send writes (and
    # deletes) outside the repository and take reads from there.  The root itself may
    # be a link; it is the operator's choice, made in the config file.

    def _refuse_link(self, rel: str) -> None:
        raise IntegrityError(f"{rel} in {self.url} is a symbolic link: snapshotter does not follow links "
                             f"inside a repository (they could send its writes elsewhere); replace it with "
                             f"the folder or file itself")

    def _no_links(self, folders: list[str]) -> None:
        """Every existing folder on the way from the root to an object is a real folder."""
        path, rel = self.root, ""
        for part in folders:
            path = os.path.join(path, part)
            rel = f"{rel}{part}/"
            if path in self._real_dirs:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return  # made below by _ensure_dir, which checks again
            except OSError as exc:
                raise StoreError(f"cannot read {rel}: {exc.strerror}") from exc
            if stat.S_ISLNK(st.st_mode):
                self._refuse_link(rel)
            if stat.S_ISDIR(st.st_mode):
                self._real_dirs.add(path)

    def _not_a_link(self, path: str, name: str) -> bool:
        """Whether the object exists (as a real file); a link in its place is refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot stat {name}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            self._refuse_link(name)
        return True

    def _ensure_dir(self, folder: str) -> None:
        if folder in self._made_dirs:
            return
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create folder {folder}: {exc.strerror}") from exc
        # a link put in place of a folder between the check and the makedirs
        rel = os.path.relpath(folder, self.root)
        if rel != ".":
            self._no_links(rel.split(os.sep))
        self._made_dirs.add(folder)

    def put(self, name: str, data: bytes, *, overwrite: bool = False, durable: bool = True) -> bool:
        path = self._path(name)
        folder = os.path.dirname(path)
        self._ensure_dir(folder)
        if self._not_a_link(path, name) and not overwrite:
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
            # non-blocking: a FIFO planted in the repository would block the open (and the read)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ObjectMissing(f"object {name} is not a file in {self.url}")
            with os.fdopen(fd, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise ObjectMissing(f"object {name} is missing from {self.url}") from None
        except IsADirectoryError:
            raise ObjectMissing(f"object {name} is a folder in {self.url}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._refuse_link(name)
            raise StoreError(f"cannot read {name}: {exc.strerror}") from exc

    def stat(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {name}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            self._refuse_link(name)
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # walk only the folder the prefix names, then filter by the rest
        folder_part, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *folder_part.split("/")) if folder_part else self.root
        if folder_part:
            self._no_links(folder_part.split("/"))
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            for d in dirnames:
                # os.walk lists a link to a folder among the folders (and does not enter it)
                if (rel_dir + d).startswith(prefix[:len(rel_dir + d)]) and \
                        os.path.islink(os.path.join(dirpath, d)):
                    self._refuse_link(rel_dir + d + "/")
            for fn in sorted(filenames):
                if fn.startswith(".tmp-"):
                    continue
                name = rel_dir + fn
                if not name.startswith(prefix) or not valid_name(name):
                    continue
                try:
                    st = os.lstat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    self._refuse_link(name)
                yield ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            self._not_a_link(path, name)
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot delete {name}: {exc.strerror}") from exc
