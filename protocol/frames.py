"""Binary frame messages (server → client): the codecs and the 16-byte frame header."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, get_args

from protocol.constants import PROTOCOL_VERSION

CodecName = Literal["raw", "jpeg", "png"]
"""Codec names as clients give them (``start.codec``); the order follows :class:`Codec`."""

CODEC_NAMES: tuple[str, ...] = get_args(CodecName)
"""Every codec name, for command-line choices and ``/v1/info``."""


class Codec(IntEnum):
    """Frame payload encodings (byte 3 of the frame header), in :data:`CodecName`'s order."""

    RAW = 0
    """RGB24, row-major, ``width * height * 3`` bytes."""
    JPEG = 1
    PNG = 2

    @classmethod
    def from_name(cls, name: str) -> Codec:
        """``"jpeg"`` → :attr:`JPEG`; raises ``ValueError`` naming the known codecs."""
        if name not in CODEC_NAMES:
            raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_NAMES)}")
        return cls(CODEC_NAMES.index(name))

    @property
    def wire_name(self) -> CodecName:
        name: CodecName = CODEC_NAMES[self.value]  # type: ignore[assignment]
        return name


@dataclass(frozen=True)
class FrameHeader:
    """16-byte little-endian header of every binary frame message.

    ``b"DS"`` | version u8 | codec u8 | step u32 | frame index u16 | frames in step u16 |
    width u16 | height u16.
    """

    codec: Codec
    step: int
    index: int
    count: int
    width: int
    height: int
    version: int = PROTOCOL_VERSION

    STRUCT = struct.Struct("<2sBBIHHHH")
    SIZE = 16
    MAGIC = b"DS"

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.MAGIC,
            self.version,
            int(self.codec),
            self.step,
            self.index,
            self.count,
            self.width,
            self.height,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse the first 16 bytes of a binary message; raises ``ValueError`` on a bad header."""
        if len(data) < cls.SIZE:
            raise ValueError(f"binary message of {len(data)} bytes is shorter than the 16-byte header")
        magic, version, codec, step, index, count, width, height = cls.STRUCT.unpack_from(data)
        if magic != cls.MAGIC:
            raise ValueError(f"bad frame magic {magic!r}, expected {cls.MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise ValueError(f"frame protocol version {version}, expected {PROTOCOL_VERSION}")
        try:
            codec_enum = Codec(codec)
        except ValueError:
            known = ", ".join(f"{c.value} ({c.wire_name})" for c in Codec)
            raise ValueError(f"unknown frame codec {codec}, expected one of {known}") from None
        return cls(codec_enum, step, index, count, width, height, version)
