"""LocalBackend: objects as files under a directory (local disk or an NFS mount).

put writes a hidden temp file in the target's directory, fsyncs it, renames it
over the key and fsyncs the directory, so a crash leaves the old object, the
new one or a stray temp file, never a torn object. Stray temp files start
with '.', which list() and keys never show.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from vmstream.store.backend import Backend, ObjectInfo, check_key, check_range
from vmstream.store.errors import BackendUnavailable, ObjectNotFound, StoreError

# Errors a retry may cure: NFS timeouts and stale handles, a disk that hiccups.
_TRANSIENT = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ENOTCONN, errno.EHOSTDOWN}


class LocalBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = f"local:{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _error(self, what: str, key: str, exc: OSError) -> Exception:
        msg = f"{self.name}: {what} '{key}' failed: {exc.strerror or exc}"
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return ObjectNotFound(f"{self.name}: no object '{key}'")
        return BackendUnavailable(msg) if exc.errno in _TRANSIENT else StoreError(msg)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            for attempt in (1, 2):  # a delete may remove the directory as it empties: make it again once
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
                raise StoreError(f"{self.name}: put '{key}' failed: {exc}") from exc
            raise self._error("put", key, exc) from exc

    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes:
        check_range(offset, size)
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read() if size is None else f.read(size)
        except OSError as exc:
            raise self._error("get", key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise self._error("exists", key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the directory the prefix pins down, then filter by the full prefix.
        top = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        found: list[ObjectInfo] = []

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):  # a directory removed while we walked is fine
                raise exc

        try:
            for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    if fn.startswith("."):
                        continue
                    full = os.path.join(dirpath, fn)
                    key = os.path.relpath(full, self.root)
                    if key.startswith(prefix):
                        try:
                            st = os.stat(full)
                        except FileNotFoundError:
                            continue  # deleted while we walked
                        found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        except OSError as exc:
            raise self._error("list", prefix, exc) from exc
        return iter(sorted(found, key=lambda o: o.key))

    def delete(self, key: str) -> None:
        """Delete the object, then the directories it leaves empty (an image's meta/images/NAME/),
        as a key-value store has no directories to leave behind."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._error("delete", key, exc) from exc
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone): the rest of the path is in use
                break
            parent = parent.parent
