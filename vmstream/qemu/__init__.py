"""One object owns one QEMU process: command line, QMP, logs, shutdown."""

from vmstream.qemu.accel import AccelChoice, choose_accelerator
from vmstream.qemu.machine import MachineSpec, QemuProcess, TapNic, qemu_version

__all__ = ["AccelChoice", "MachineSpec", "QemuProcess", "TapNic", "choose_accelerator", "qemu_version"]
