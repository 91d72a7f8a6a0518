"""The demo guest: a Debian kernel plus a busybox initramfs with the workloads."""

from vmstream.guest.build import GuestArtifacts, build_guest, find_kernel

__all__ = ["GuestArtifacts", "build_guest", "find_kernel"]
