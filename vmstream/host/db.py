"""The agent's state in SQLite: one row per VM this host owns.

QEMU processes outlive the agent, so this table is how a restarted agent
finds them again (pid + unique vm_id in the QEMU command line).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Boolean, DateTime, Dialect, Float, Integer, String, Text, TypeDecorator, create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class UtcDateTime(TypeDecorator[datetime]):
    """A UTC time: SQLite keeps no time zone, so one read back is made aware again
    (the API's times are RFC 3339 date-times, which need the offset)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class VmRecord(Base):
    __tablename__ = "vms"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    vm_id: Mapped[str] = mapped_column(String, unique=True)
    state: Mapped[str] = mapped_column(String)  # starting | running | exited
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rundir: Mapped[str] = mapped_column(String)
    http_port: Mapped[int] = mapped_column(Integer, unique=True)
    memory_bytes: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[int] = mapped_column(Integer)
    kernel: Mapped[str] = mapped_column(String)
    initrd: Mapped[str] = mapped_column(String)
    accel: Mapped[str] = mapped_column(String)
    hostname: Mapped[str] = mapped_column(String)
    mac: Mapped[str] = mapped_column(String)
    vmgenid: Mapped[str] = mapped_column(String)
    parent_image: Mapped[str | None] = mapped_column(String, nullable=True, index=True)
    ready_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    identity_applied_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    hooks: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON from the guest
    phases: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: start-up phase -> seconds
    clock: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: a clone's clock setting (vmstream.guest.clock)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=lambda: datetime.now(UTC))
    # A VM that arrived by migration: its QEMU machine as JSON (the source's, with
    # this host's vm_id, port and guest files), since it differs from a booted VM's.
    spec: Mapped[str | None] = mapped_column(Text, nullable=True)
    migrated_from: Mapped[str | None] = mapped_column(String, nullable=True)
    # The peer a migration under way is moving it to: a restarted agent asks it where the VM runs.
    migrating_to: Mapped[str | None] = mapped_column(String, nullable=True)
    # A disk guest: the qcow2 overlay it runs on now, and the file its first overlay
    # was made on (a base disk image, or its live image's disk layer).
    disk: Mapped[str | None] = mapped_column(String, nullable=True)
    disk_base: Mapped[str | None] = mapped_column(String, nullable=True)
    # On a bridged host (vmstream.host.network): the VM's static address, kept when it migrates.
    ip: Mapped[str | None] = mapped_column(String, nullable=True)
    # When the VM is ready (vmstream.guest.readiness); NULL: rows from before it, the demo status page.
    ready: Mapped[str | None] = mapped_column(String, nullable=True)
    # Published guest ports besides 80 (slirp): JSON {"GUEST": HOST}.
    ports: Mapped[str | None] = mapped_column(Text, nullable=True)
    # a given kernel's command line (None: vmstream's own); kernel "" is a firmware boot
    append: Mapped[str | None] = mapped_column(Text, nullable=True)
    seed: Mapped[str | None] = mapped_column(String, nullable=True)  # the cloud-init NoCloud seed it has attached
    balloon: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # its machine has a virtio balloon (NULL: a row from before)
    memory_policy: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON vmstream.policy.MemoryPolicy; NULL: none


class PeerRecord(Base):
    """Another host's agent this one can migrate VMs to."""

    __tablename__ = "peers"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    url: Mapped[str] = mapped_column(String)
    token: Mapped[str] = mapped_column(String)
    added_at: Mapped[datetime] = mapped_column(UtcDateTime, default=lambda: datetime.now(UTC))


class LentAddressRecord(Base):
    """An address of this host's range whose VM migrated to a peer: it stays the VM's, so it is
    not handed out again until the VM comes back or the host it ends on reports it destroyed."""

    __tablename__ = "lent_addresses"

    ip: Mapped[str] = mapped_column(String, primary_key=True)
    vm: Mapped[str] = mapped_column(String)
    to_host: Mapped[str] = mapped_column(String)  # the peer it moved to (it may have moved on since)
    lent_at: Mapped[datetime] = mapped_column(UtcDateTime, default=lambda: datetime.now(UTC))


class GroupRecord(Base):
    """A scaling group (vmstream.host.groups): its members are VMs of one live image behind
    its own HAProxy; kept here so the group, and its balancer, outlive an agent restart."""

    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    image: Mapped[str] = mapped_column(String)
    min_size: Mapped[int] = mapped_column(Integer)
    max_size: Mapped[int] = mapped_column(Integer)
    target_inflight: Mapped[float] = mapped_column(Float)  # requests in service or queued, per member
    port: Mapped[int] = mapped_column(Integer, unique=True)  # HAProxy listens on 127.0.0.1:port
    member_port: Mapped[int] = mapped_column(Integer)  # the guest port members serve on
    health_path: Mapped[str] = mapped_column(String)
    member_maxconn: Mapped[int | None] = mapped_column(Integer, nullable=True)  # requests at a member at once; more wait in HAProxy
    scale_in_delay_s: Mapped[float] = mapped_column(Float)
    start: Mapped[str] = mapped_column(String)  # clone | boot (members cold-booted: a baseline)
    hosts: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: where members run, "local" and peers; NULL: local
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=lambda: datetime.now(UTC))


class GroupMemberRecord(Base):
    """A VM of a group: starting (not yet in the balancer), serving, or leaving (draining)."""

    __tablename__ = "group_members"

    vm: Mapped[str] = mapped_column(String, primary_key=True)
    group: Mapped[str] = mapped_column(String, index=True)
    state: Mapped[str] = mapped_column(String)
    host: Mapped[str | None] = mapped_column(String, nullable=True)  # the peer it runs on; NULL: this host
    since: Mapped[datetime] = mapped_column(UtcDateTime, default=lambda: datetime.now(UTC))


def open_db(path: Path) -> sessionmaker:
    engine: Engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _wal(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _add_missing_columns(engine: Engine) -> None:
    """Bring a state.db from an older vmstream up to date: add the columns it lacks.

    Columns only ever get added, so ALTER TABLE ... ADD COLUMN is the whole
    migration; rows that predate a column get its SQL default ('' or NULL).
    """
    have = {c["name"] for c in inspect(engine).get_columns(VmRecord.__tablename__)}
    with engine.begin() as conn:
        for column in VmRecord.__table__.columns:
            if column.name in have:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            if column.nullable:
                default = ""
            elif kind.startswith(("VARCHAR", "TEXT")):
                default = " NOT NULL DEFAULT ''"
            elif kind.startswith("DATETIME"):
                default = " NOT NULL DEFAULT '1970-01-01 00:00:00.000000'"
            else:
                default = " NOT NULL DEFAULT 0"
            conn.execute(text(f'ALTER TABLE {VmRecord.__tablename__} ADD COLUMN "{column.name}" {kind}{default}'))
