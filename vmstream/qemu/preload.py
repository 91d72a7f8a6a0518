"""The shim preloaded into clone QEMUs (see cloneshim.c for why), built on first use."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

log = logging.getLogger("vmstream.qemu")


@cache
def clone_shim_library(lib_dir: Path) -> Path | None:
    """Path of the compiled shim in lib_dir, or None (with a warning) if it cannot be built.

    Without it clones still run correctly; they only fetch and keep more memory, and
    give none back through their balloon.
    """
    source = resources.files("vmstream.qemu").joinpath("cloneshim.c").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    lib = lib_dir / f"vmstream-cloneshim-{digest}.so"
    if lib.exists():
        return lib
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        log.warning("no C compiler: clone QEMUs run without their shim (more memory fetched "
                    "and kept per clone); apt-get install gcc libc6-dev")
        return None
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "cloneshim.c", Path(tmp) / "cloneshim.so"
        src.write_bytes(source)
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            log.warning("building the clone QEMU shim failed, clones run without it: %s", res.stderr.strip())
            return None
        os.replace(out, lib)  # atomic: concurrent builders agree on one file
    return lib
