"""A directory that, on PYTHONPATH, gives Debian's `openstack` (its /usr/bin/python3) the plugin.

Debian's python3 does not see the project's virtualenv. osc finds plugins through stevedore,
which reads entry points with importlib.metadata from every sys.path entry, so the directory
gets a `vmstream_osc_plugin-<version>.dist-info/` (METADATA and entry_points.txt) and a
`vmstream` link to the package's source. It may be the directory of the Nova driver's shim
(vmstream.openstack.nova.shim, which makes the same link): nothing else in it is touched.
"""

from __future__ import annotations

from pathlib import Path

import vmstream
from vmstream.openstack.osc import ENTRY_POINTS
from vmstream.openstack.source_link import link_source

DIST_NAME = "vmstream_osc_plugin"


def entry_points_txt(entry_points: dict[str, dict[str, str]] = ENTRY_POINTS) -> str:
    """entry_points.txt as setuptools writes it: one [group] per section, name = module:attr."""
    sections = []
    for group, points in entry_points.items():
        lines = [f"[{group}]", *(f"{name} = {target}" for name, target in points.items())]
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def metadata_txt(version: str) -> str:
    return (f"Metadata-Version: 2.1\nName: {DIST_NAME.replace('_', '-')}\nVersion: {version}\n"
            "Summary: vmstream's python-openstackclient plugin (openstack live-image ...), linked from vmstream's source\n")


def install_plugin(target: Path, source: Path | None = None) -> Path:
    """Make target (created if missing) give the plugin to a python3 that has it on PYTHONPATH;
    returns target. Idempotent: files are rewritten only when they differ, and a dist-info of
    another version (an older install) is removed so stevedore sees the commands once."""
    source = (source or Path(vmstream.__file__).parent).absolute()
    target.mkdir(parents=True, exist_ok=True)
    link_source(target / "vmstream", source)
    version = vmstream.__version__
    dist_info = target / f"{DIST_NAME}-{version}.dist-info"
    for old in target.glob(f"{DIST_NAME}-*.dist-info"):
        if old != dist_info:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    dist_info.mkdir(exist_ok=True)
    for name, text in (("METADATA", metadata_txt(version)), ("entry_points.txt", entry_points_txt()),
                       ("top_level.txt", "vmstream\n")):
        path = dist_info / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return target
