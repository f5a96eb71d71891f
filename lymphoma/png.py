"""PNG files written without compression, for the pictures written per slide (heatmaps, attention maps): a
256-px picture in 0.2 ms, against 3 to 7 ms through PIL's encoder, even at its compress_level=0 (whose row
filters it still chooses adaptively); photographs of tissue shrink by only 15% when deflated."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(rgb: np.ndarray) -> bytes:
    """The bytes of an 8-bit RGB PNG of ``[H, W, 3]`` uint8 pixels: every row unfiltered, stored (deflate level 0)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png takes [H, W, 3] uint8 pixels, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # each row: filter type 0, then its pixels
    rows[:, 1:] = rgb.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 0))
            + _chunk(b"IEND", b""))


def write_png(path: Path, rgb: np.ndarray) -> None:
    """``encode_png`` of the pixels, written to ``path``."""
    Path(path).write_bytes(encode_png(rgb))
