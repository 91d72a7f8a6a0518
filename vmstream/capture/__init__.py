"""Guest memory and device state: capture from a running VM, deltas applied to a clone."""

from vmstream.capture.delta import apply_delta
from vmstream.capture.snapshot import CaptureResult, capture_vm

__all__ = ["CaptureResult", "apply_delta", "capture_vm"]
