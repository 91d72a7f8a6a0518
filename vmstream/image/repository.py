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

MANIFEST = "manifest.json"


class ImageRepository:
    def __init__(self, root: Path, memory_dir: Path) -> None:
        self.root = root
        self.memory_dir = memory_dir  # where memfs presents each image's memory as a file
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self._dir(name) / MANIFEST).is_file()

    def get(self, name: str) -> LiveImage:
        try:
            return LiveImage.model_validate_json((self._dir(name) / MANIFEST).read_text())
        except FileNotFoundError:
            raise NotFound(f"no live image named '{name}': see 'vmstream live-image list'") from None

    def all(self) -> list[LiveImage]:
        return sorted(
            (self.get(p.name) for p in self.root.iterdir() if not p.name.startswith(".") and self.exists(p.name)),
            key=lambda i: i.created_at,
        )

    def memory_path(self, image: LiveImage) -> Path:
        """The file a clone maps as its RAM (the seam where memfs will plug in).

        For a layered image that is its root's file; its delta goes on top.
        """
        return self.memory_dir / (image.memory_root or image.name)

    def image_dir(self, image: LiveImage) -> Path:
        return self._dir(image.name)

    def children(self, name: str) -> list[LiveImage]:
        """Images that were made from clones of this one, or map its memory."""
        return [i for i in self.all() if name in (i.parent_image, i.memory_root)]

    def devstate_path(self, image: LiveImage) -> Path:
        return self._dir(image.name) / image.devstate_file

    def stored_bytes(self, name: str) -> int:
        return sum(p.stat().st_blocks * 512 for p in self._dir(name).iterdir())

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A directory to write a new image into; removed unless committed."""
        if self.exists(name):
            raise Conflict(f"a live image named '{name}' already exists: choose another name or delete it first")
        stage = self.root / f".staging-{name}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def commit(self, stage: Path, image: LiveImage) -> None:
        """Write the manifest last, then make the image visible by one rename."""
        tmp = stage / (MANIFEST + ".tmp")
        tmp.write_text(image.model_dump_json(indent=2))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, stage / MANIFEST)
        try:
            os.rename(stage, self._dir(image.name))
        except OSError as exc:
            raise Conflict(f"a live image named '{image.name}' already exists") from exc

    def delete(self, name: str) -> None:
        self.get(name)
        trash = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self._dir(name), trash)
        shutil.rmtree(trash)
