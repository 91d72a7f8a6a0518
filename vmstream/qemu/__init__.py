"""One object owns one QEMU process: command line, QMP, logs, shutdown."""

from vmstream.qemu.accel import AccelChoice, choose_accelerator
from vmstream.qemu.machine import MachineSpec, QemuProcess, TapNic, guest_ram_bytes, qemu_version, tb_flushes

__all__ = ["AccelChoice", "MachineSpec", "QemuProcess", "TapNic", "choose_accelerator", "guest_ram_bytes", "qemu_version", "tb_flushes"]
