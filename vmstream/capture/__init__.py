"""live-image-create's capture: device state and guest memory of a running VM."""

from vmstream.capture.snapshot import CaptureResult, capture_vm

__all__ = ["CaptureResult", "capture_vm"]
