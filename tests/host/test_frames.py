"""The wire format of frames handed between agents after a move, and the claim's RARP."""

from __future__ import annotations

import pytest

from vmstream.errors import InvalidInput
from vmstream.host.network import MAX_QUEUED_FRAMES, pack_frames, rarp_frame, unpack_frames


def test_frames_survive_packing() -> None:
    frames = [b"\x00" * 10 + bytes(range(60)), b"x" * 1500, b""]
    assert unpack_frames(pack_frames(frames)) == frames
    assert unpack_frames(b"") == []


@pytest.mark.parametrize("body", [b"\x00\x00", b"\x00\x00\x00\x05abc", (70000).to_bytes(4, "big") + b"x" * 70000])
def test_a_bad_frame_list_is_refused_with_the_format(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="4-byte big-endian length"):
        unpack_frames(body)


def test_too_many_frames_are_refused() -> None:
    with pytest.raises(InvalidInput, match=f"at most {MAX_QUEUED_FRAMES}"):
        unpack_frames(pack_frames([b"f"] * (MAX_QUEUED_FRAMES + 1)))


def test_the_claim_sends_a_rarp_from_the_vms_mac() -> None:
    f = rarp_frame("52:54:00:12:34:56")
    mac = bytes.fromhex("525400123456")
    assert len(f) == 60 and f[:6] == b"\xff" * 6 and f[6:12] == mac
    assert f[12:14] == b"\x80\x35" and f[20:22] == b"\x00\x03"  # RARP, reverse request
    assert f[22:28] == mac and f[32:38] == mac
