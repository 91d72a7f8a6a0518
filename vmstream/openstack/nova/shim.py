"""The namespace shim through which Nova finds the driver, written into a directory of its own.

Nova loads `importutils.import_object('nova.virt.' + CONF.compute_driver)`: there is no entry
point, so an out-of-tree driver ships `nova/__init__.py` and `nova/virt/__init__.py` declaring
pkg_resources namespaces (Nova's own `nova/virt/__init__.py` is one for this reason, and its
`nova/__init__.py` holds only a docstring) plus `nova/virt/vmstream/`, which re-exports the
class. Put the directory first on nova-compute's PYTHONPATH: a .pth file would add it after
dist-packages, where Nova's regular `nova` package would hide it.

The directory also gets a `vmstream` link to this package's source, so Debian's python3 imports
vmstream (the driver needs vmstream.agentapi and vmstream.errors, and Debian's python3-httpx)
without the project's virtualenv.
"""

from __future__ import annotations

from pathlib import Path

import vmstream
from vmstream.openstack.source_link import link_source

_NAMESPACE = "__import__('pkg_resources').declare_namespace(__name__)  # vmstream's Nova driver shim\n"
_REEXPORT = '"""vmstream\'s Nova driver (compute_driver = vmstream.VmstreamDriver); the code is in vmstream.openstack.nova."""\n' \
            "from vmstream.openstack.nova.driver import VmstreamDriver\n\n__all__ = ['VmstreamDriver']\n"

FILES = {
    Path("nova/__init__.py"): _NAMESPACE,
    Path("nova/virt/__init__.py"): _NAMESPACE,
    Path("nova/virt/vmstream/__init__.py"): _REEXPORT,
    Path("nova/virt/vmstream/driver.py"): _REEXPORT,
}


def install_shim(target: Path, source: Path | None = None) -> Path:
    """Write the shim into target (made if missing) and link target/vmstream to the package
    source (default: the one running); returns target, the directory for PYTHONPATH."""
    source = (source or Path(vmstream.__file__).parent).absolute()
    for rel, text in FILES.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    link_source(target / "vmstream", source)
    return target
