"""memfs: a FUSE filesystem that presents each live image's memory as a file.

Clones map these files MAP_PRIVATE, so every clone of an image on a host
shares one page-cache copy. Chunks missing on the host are fetched from the
store on demand, verified, and kept in the host chunk cache. The daemon runs
in its own process and session: clones depend on the mount, so it outlives
the agent, which adopts it again after a restart.
"""


def memory_ref(image: str) -> str:
    """The store ref holding an image's memory: what memfs serves as file <image>."""
    return f"images/{image}/memory"
