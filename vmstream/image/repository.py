"""ImageRepository: live images on the local disk, one directory each.

The directory holds the manifest, the device state and a layered image's
delta; memory lives in the chunk store, and memfs presents it as a file.

An image is built in a hidden staging directory and appears by one rename,
the commit point, so a crash or failure never leaves a half-written image
under its name. Deleting renames it away first for the same reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from vmstream.errors import Conflict, NotFound
from vmstream.image.manifest import LiveImage
from vmstream.store import Backend

MANIFEST = "manifest.json"
STREAMED = ".pack"  # an image's files read straight from the store, never copied to a host's image dir
META = "meta/images/"
STAGING, FETCHING = ".staging-", ".fetching-"  # prefixes of the hidden dirs an image is built or fetched in


class ImageRepository:
    """Images in the store (the catalog every host shares), cached in local dirs.

    The store holds each image's small files under meta/images/<name>/ with
    the manifest written last: that put is the commit point. A host that
    lacks an image locally fetches those files on first use; the memory
    itself is streamed by memfs, chunk by chunk.
    """

    def __init__(self, root: Path, memory_dir: Path, backend: Backend | None = None) -> None:
        self.root = root
        self.memory_dir = memory_dir  # where memfs presents each image's memory as a file
        self.backend = backend
        root.mkdir(parents=True, exist_ok=True)

    def remove_leftovers(self) -> list[str]:
        """Staging and fetching dirs an agent killed mid-capture or mid-fetch left behind (one
        agent per data dir: at its start none is in use). Their names, removed."""
        stale = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith((STAGING, FETCHING))]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return [p.name for p in stale]

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _meta(self, name: str, file: str = "") -> str:
        return f"{META}{name}/{file}"

    def _local(self, name: str) -> bool:
        return (self._dir(name) / MANIFEST).is_file()

    def exists(self, name: str) -> bool:
        return self._local(name) or (self.backend is not None and self.backend.exists(self._meta(name, MANIFEST)))

    def get(self, name: str) -> LiveImage:
        if not self._local(name):
            self._fetch(name)
        return LiveImage.model_validate_json((self._dir(name) / MANIFEST).read_text())

    def _fetch(self, name: str) -> None:
        """Copy an image's files from the store into the local cache dir."""
        if self.backend is None or not self.backend.exists(self._meta(name, MANIFEST)):
            raise NotFound(f"no live image named '{name}': see 'vmstream live-image list'")
        stage = self.root / f"{FETCHING}{name}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            for obj in self.backend.list(self._meta(name)):
                if obj.key.endswith(STREAMED):
                    continue  # memfs streams it from the store when it is needed
                (stage / obj.key.rsplit("/", 1)[1]).write_bytes(self.backend.get(obj.key))
            with contextlib.suppress(OSError):  # another request fetched it meanwhile: same content
                os.rename(stage, self._dir(name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def names(self) -> set[str]:
        local = {p.name for p in self.root.iterdir() if not p.name.startswith(".") and self._local(p.name)}
        if self.backend is not None:
            local |= {o.key.split("/")[2] for o in self.backend.list(META) if o.key.endswith("/" + MANIFEST)}
        return local

    def all(self) -> list[LiveImage]:
        return sorted((self.get(n) for n in self.names()), key=lambda i: i.created_at)

    def memory_path(self, image: LiveImage) -> Path:
        """The file a clone maps as its RAM: memfs's file of the image, or of its root."""
        return self.memory_dir / (image.memory_root or image.name)

    def image_dir(self, image: LiveImage) -> Path:
        return self._dir(image.name)

    def children(self, name: str) -> list[LiveImage]:
        """Images that were made from clones of this one, or map its memory."""
        return [i for i in self.all() if name in (i.parent_image, i.memory_root)]

    def devstate_path(self, image: LiveImage) -> Path:
        return self._dir(image.name) / image.devstate_file

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A directory to write a new image into; removed unless committed."""
        if self.exists(name):
            raise Conflict(f"a live image named '{name}' already exists: choose another name or delete it first")
        stage = self.root / f"{STAGING}{name}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def commit(self, stage: Path, image: LiveImage) -> None:
        """Files to the store, the manifest last (the commit point), then the local rename."""
        tmp = stage / (MANIFEST + ".tmp")
        tmp.write_text(image.model_dump_json(indent=2))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, stage / MANIFEST)
        if self.backend is not None:
            files = sorted(p for p in stage.iterdir() if p.name != MANIFEST)
            try:
                for path in [*files, stage / MANIFEST]:
                    self.backend.put(self._meta(image.name, path.name), path.read_bytes())
            except BaseException:
                self._delete_meta(image.name)
                raise
        try:
            os.rename(stage, self._dir(image.name))
        except OSError as exc:
            raise Conflict(f"a live image named '{image.name}' already exists") from exc

    def add_file(self, image: LiveImage, file: str, data: bytes) -> None:
        """A file learnt after the commit (the working-set profile), kept with the image.
        A file named *.pack goes to the store only (see store_key)."""
        if not file.endswith(STREAMED):
            path = self._dir(image.name) / file
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        if self.backend is not None:
            self.backend.put(self._meta(image.name, file), data)

    def store_key(self, image: LiveImage, file: str) -> str:
        """Where the store keeps one of the image's files (memfs streams *.pack files from there)."""
        return self._meta(image.name, file)

    def _delete_meta(self, name: str) -> None:
        assert self.backend is not None
        self.backend.delete(self._meta(name, MANIFEST))  # un-commit first
        for obj in list(self.backend.list(self._meta(name))):
            self.backend.delete(obj.key)

    def delete(self, name: str) -> None:
        self.get(name)
        if self.backend is not None:
            self._delete_meta(name)
        trash = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self._dir(name), trash)
        shutil.rmtree(trash)
