"""cloud-init at first boot: a NoCloud seed (an ISO 9660 volume labelled `cidata`
holding user-data and meta-data), attached to the VM as a read-only disk.

This is how the paper's workflow configures an ordinary image: `vmstream boot
... --user-data FILE`, then live-image create and start. cloud-init runs once,
in the booted VM; clones resume its memory, so they never run it again (they
keep the seed attached only because their machine must match the image's).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pycdlib
import yaml

from vmstream.errors import InvalidInput

# What cloud-init accepts as user-data (cloudinit/handlers): a cloud-config, a
# script, an include list, a boothook, a part handler, or a MIME multipart archive.
_STARTS = ("#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler", "#cloud-config-archive",
           "Content-Type: multipart/")
MAX_USER_DATA = 16 << 20  # cloud-init's own limit for NoCloud is far above what a VM needs


def check_user_data(data: bytes) -> None:
    """Refuse what cloud-init would silently ignore, naming the fix."""
    if len(data) > MAX_USER_DATA:
        raise InvalidInput(f"user-data is {len(data)} bytes: keep it under {MAX_USER_DATA >> 20} MiB")
    text = data.lstrip().decode("utf-8", errors="replace")
    if not text.startswith(_STARTS):
        raise InvalidInput("user-data must start with '#cloud-config' (a YAML cloud-config) or '#!' (a script) "
                           "or be a MIME multipart archive: cloud-init ignores anything else")
    if text.startswith("#cloud-config\n") or text.rstrip() == "#cloud-config":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"user-data is not valid YAML: {exc}") from exc
        if doc is not None and not isinstance(doc, dict):
            raise InvalidInput("user-data's #cloud-config must be a YAML mapping (keys such as write_files, runcmd)")


def meta_data(instance_id: str, hostname: str) -> bytes:
    """NoCloud meta-data (YAML; JSON is YAML): a new instance id makes cloud-init run."""
    return json.dumps({"instance-id": instance_id, "local-hostname": hostname}).encode()


def write_seed(path: Path, user_data: bytes, instance_id: str, hostname: str) -> Path:
    """The seed ISO at path, written whole or not at all."""
    check_user_data(user_data)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, content in (("user-data", user_data), ("meta-data", meta_data(instance_id, hostname))):
        iso.add_fp(io.BytesIO(content), len(content), f"/{name.upper().replace('-', '_')}.;1",
                   rr_name=name, joliet_path=f"/{name}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        iso.write(str(tmp))
        tmp.replace(path)
    finally:
        iso.close()
        tmp.unlink(missing_ok=True)
    return path
