"""The `vmstream` link to the package's source that the Nova shim's and the client plugin's
directories both carry (Debian's python3 imports vmstream through it, without the venv)."""

from __future__ import annotations

import os
from pathlib import Path


def link_source(link: Path, source: Path) -> None:
    """link -> source, made or corrected; either installer may come first into one directory."""
    if link.is_symlink() and Path(os.readlink(link)) != source:
        link.unlink()
    if not link.is_symlink():
        if link.exists():
            raise FileExistsError(f"{link} exists and is not the link to vmstream's source: remove it")
        link.symlink_to(source, target_is_directory=True)
