"""Which store a host uses, from one string (VMSTREAM_STORE or the default).

    /path/to/dir, local:/path         a directory (local disk or an NFS mount)
    s3://bucket[/prefix]?endpoint_url=http://127.0.0.1:9000
                                      S3-compatible storage; credentials from
                                      the usual AWS_* environment variables
    peer:http://127.0.0.1:PORT/v1/store[?bulk=auto|off|http://HOST:PORT]
                                      another host agent's chunks (read-only);
                                      with the peer's agent token. bulk: where
                                      ranges are read by sendfile (auto: where
                                      the peer says; a URL: its bulk server as
                                      this host reaches it, through a proxy)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from vmstream.store.backend import Backend
from vmstream.store.errors import StoreError
from vmstream.store.local import LocalBackend
from vmstream.store.peer import PeerBackend
from vmstream.store.s3 import S3Backend


def open_backend(spec: str, peer_token: str | None = None) -> Backend:
    if spec.startswith("s3://"):
        url = urlparse(spec)
        options: dict[str, Any] = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return S3Backend(url.netloc, url.path.strip("/"), endpoint_url=options.pop("endpoint_url", None), **options)
    if spec.startswith("peer:"):
        peer_url, _, query = spec[len("peer:") :].partition("?")
        opts = {k: v[-1] for k, v in parse_qs(query).items()}
        unknown = set(opts) - {"bulk"}
        if unknown:
            raise StoreError(f"store '{spec}': unknown option(s) {', '.join(sorted(unknown))}: a peer store takes only bulk=")
        return PeerBackend(peer_url, peer_token, bulk=opts.get("bulk", "auto"))
    path = spec[len("local:") :] if spec.startswith("local:") else spec
    if not path.startswith("/"):
        raise StoreError(
            f"store '{spec}' is not understood: give an absolute directory, s3://bucket?endpoint_url=..., or peer:http://host:port"
        )
    Path(path).mkdir(parents=True, exist_ok=True)
    return LocalBackend(Path(path))
