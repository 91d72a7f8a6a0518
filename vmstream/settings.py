"""Every setting of vmstream, in one typed object built once per process.

The CLI and the agent build a Settings when they start (from VMSTREAM_*
environment variables) and pass it, or the values in it, down; nothing below
reads the environment. docs/configuration.md is rendered from this class
(`python -m vmstream.settings`), and `vmstream info --json` shows the values
an agent runs with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vmstream.errors import InvalidInput

SECRET = ("peer_token", "metrics_token")  # shown as '***' by `vmstream info`


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "vmstream"


class Settings(BaseSettings):
    """vmstream's settings; each is the environment variable VMSTREAM_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="VMSTREAM_", extra="ignore", frozen=True)

    # ---- where things live
    home: Path = Field(default_factory=_default_home, description="The data dir: state, images, chunk cache, run dirs, agent token.")
    store: str = Field("", description="The chunk store: an absolute directory (local or NFS), "
                       "s3://bucket/prefix?endpoint_url=http://..., or peer:http://HOST:PORT/v1/store (?bulk=off, or "
                       "?bulk=http://HOST:PORT: the peer's sendfile server as this host reaches it). Empty: <home>/store.")
    peer_token: str | None = Field(None, description="The peer agent's token when `store` is peer:... (its agent.token).")
    cache_size: str = Field("8G", description="Bound of the host chunk cache (memfs), e.g. 8G.")
    memfs_read_ahead_chunks: int = Field(16, ge=0, description="Chunks memfs first pushes ahead of a sequential reader "
                                         "(0: off); the window doubles up to 512 as the reader keeps up.")

    # ---- QEMU
    accel: Literal["auto", "kvm", "tcg"] = Field("auto", description="Accelerator: auto probes KVM once and falls back to TCG.")
    clone_tb_mib: int = Field(8, ge=1, description="TCG translation cache (MiB) of a clone started anew; its used part is private memory.")
    group_tb_mib: int = Field(32, ge=1, le=512, description="TCG translation cache (MiB) of a scaling group's members: serving, "
                              "a guest runs more code than fits a clone's cache, and translating it again and again took "
                              "~40% more CPU (bench autoscale).")
    clone_kernel_header_only: bool = Field(True, description="Clones get only the kernel's setup header (saves ~8 MiB per clone; "
                                           "a clone cannot reboot).")
    clone_nothp: bool = Field(True, description="Clones run with the no-transparent-huge-pages shim (keeps image pages shared).")
    host_memory_floor: str = Field("5%", description="MemAvailable the host keeps: a boot or clone start that would take it "
                                   "below is refused, naming the shortfall (a size like 512M, or a share of RAM like 5%; 0: no check).")
    guest_outbound: bool = Field(False, description="Guests on slirp (the single-host default) may open connections out of the VM. "
                                 "Off, they cannot reach the host's loopback (slirp's 10.0.2.2), where the agent's API and the "
                                 "other VMs' ports listen; connections into a guest (its forwarded ports) work either way.")
    balloon: bool = Field(True, description="New VMs get a virtio balloon (free page reporting, deflate on OOM), so the host can take "
                          "memory back; their images' clones have it too.")

    # ---- the clone pool
    clone_pool: int = Field(1, ge=0, description="Pooled QEMUs kept per live image (started ahead, state loaded, paused); 0: no pool.")
    clone_pool_images: int = Field(4, ge=0, description="How many of the most recently started images keep a pool.")
    clone_pool_nice: int = Field(10, ge=0, le=19, description="Nice value of pooled QEMUs while they are prepared and wait "
                                 "(a clone that takes one runs at the agent's own): a refill must not take CPU from starts.")
    clone_pool_run_through: bool = Field(True, description="A pooled QEMU runs once through a clone's start before it is paused.")
    clone_pool_tb_mib: int = Field(10, ge=1, description="TCG translation cache (MiB) of a pooled QEMU (room for its run-through); "
                                   "doubled, up to 64, for an image whose run-through overflowed it.")
    batch_defer_hooks: bool = Field(True, description="Clones started by one request run their clone.d hooks once all of them serve, "
                                    "and clones started one by one in quick succession once the host started none for 1 s.")

    # ---- background work
    gc_interval_s: float = Field(3600.0, ge=0, description="Seconds between store garbage collections by the agent (0: never).")

    # ---- network
    migration_address: str = Field("127.0.0.1", description="The address this host's incoming migrations listen on.")
    bridge: str | None = Field(None, description="Put VMs on this bridge (with taps) instead of slirp; needs vm_addresses.")
    netns: str | None = Field(None, description="The network namespace the bridge is in (default: this one).")
    vm_addresses: str = Field("", description="With a bridge: the addresses this host hands out, FIRST-LAST/PREFIX.")
    vm_gateway: str | None = Field(None, description="With a bridge: the VMs' default gateway.")

    # ---- OpenStack (`vmstream openstack up|down|status`)
    openstack_dir: Path | None = Field(None, description="The state folder of the one-machine OpenStack (configs, databases, "
                                       "logs, PIDs, credentials). Empty: <home>/openstack.")

    # ---- observability
    metrics_token: str | None = Field(None, description="A read-only token for Prometheus: it may scrape /metrics and watch the "
                                      "dashboard, nothing else (the agent token works there too).")

    # ---- guests
    debian_mirror: str = Field("http://deb.debian.org/debian", description="The Debian mirror `vmstream guest rootfs` debootstraps from.")

    @field_validator("home")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().absolute()

    @field_validator("bridge", "netns", "vm_gateway", "peer_token", "metrics_token", "openstack_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return v or None

    @property
    def openstack_state(self) -> Path:
        return (self.openstack_dir or self.home / "openstack").expanduser().absolute()

    @property
    def store_spec(self) -> str:
        return self.store or str(self.home / "store")

    def shown(self) -> dict[str, Any]:
        """The values in force, secrets masked (for `vmstream info`)."""
        out = self.model_dump(mode="json")
        for key in SECRET:
            if out.get(key):
                out[key] = "***"
        return out


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and overrides), or an error naming the bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        what = "; ".join(f"VMSTREAM_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"bad setting: {what}") from None


def render_markdown() -> str:
    """docs/configuration.md's table of settings."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "~/.local/share/vmstream" if name == "home" else field.default
        shown = "(empty)" if default in ("", None) else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        rows.append(f"| `VMSTREAM_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
