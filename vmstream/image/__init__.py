"""Live images: the manifest, and the repository that stores them."""

from vmstream.image.manifest import GuestConfig, LiveImage
from vmstream.image.repository import ImageRepository

__all__ = ["GuestConfig", "ImageRepository", "LiveImage"]
