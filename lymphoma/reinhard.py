"""Reinhard normalisation of a uint8 tile: torchstain's formulas (sRGB -> CIE LAB, each channel's mean and
standard deviation moved to the target's, back to sRGB, truncated to uint8) computed in float32.

LAB is linear in f = (f(X/Xn), f(Y/Yn), f(Z/Zn)), CIE's cube root of each white-scaled XYZ value, and so is the
way back; moving each channel's mean and deviation is linear too. So the whole move, from a pixel's f to its
output's, is one 3x3 matrix and an offset (``_move``), and every other step acts on each value alone. The sRGB
decoding of two bytes at once is read from a table, the statistics are sums taken block by block (no
concatenation, no second pass), and the output is interleaved one channel at a time (a transposed copy costs 5x
as much). With a whole image (stain.scope image) 2.1x faster than the step-by-step LAB version it replaces, 1.3x
on a 128-px tile (measured beside each other), 5x faster than torchstain's NumpyReinhardNormalizer
(bench/bench_stain.py). The formulas in float64 and torchstain agree with it within one level, on fewer than 1
value in 10,000 of real tiles (tested). It runs once per image or tile of every tiling, training phase,
prediction and embedding. The statistics moved from are the tile's own, or given (those of its whole image)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65, the reference white of the LAB conversion
_LEVELS = np.arange(256) / 255
_LINEAR = np.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92).astype(np.float32)
# the linear values of two consecutive bytes, indexed by the little-endian uint16 they make: half the lookups
_PAIRS = np.stack(np.meshgrid(_LINEAR, _LINEAR, indexing="ij")[::-1], -1).reshape(-1, 2)
_TO_XYZ = (_RGB_TO_XYZ / _WHITE[:, None]).astype(np.float32)                   # white-scaled XYZ of linear RGB
_FROM_XYZ = (np.linalg.inv(_RGB_TO_XYZ) * _WHITE[None, :]).astype(np.float32)
# LAB = _LAB_OF_F @ f + _LAB_OFFSET: L = 116 fy - 16, a = 500 (fx - fy), b = 200 (fy - fz)
_LAB_OF_F = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_LAB_OFFSET = np.array([-16.0, 0.0, 0.0])
_F_OF_LAB = np.linalg.inv(_LAB_OF_F)
_LAB_OF_F32 = _LAB_OF_F.astype(np.float32)
_F32 = np.float32
BLOCK = 1 << 14  # pixels converted at once (a 128-px tile): temporaries that stay in the cache


def _linear(pixels: np.ndarray) -> np.ndarray:
    """``[n, 3]`` float32 linear RGB of ``[n, 3]`` uint8 sRGB pixels."""
    flat = np.ascontiguousarray(pixels).reshape(-1)
    if flat.size % 2:
        return np.take(_LINEAR, pixels)
    return np.take(_PAIRS, flat.view("<u2"), axis=0).reshape(-1, 3)


def to_f(pixels: np.ndarray) -> np.ndarray:
    """``[3, n]`` float32 f(X/Xn), f(Y/Yn), f(Z/Zn) of ``[n, 3]`` uint8 pixels: the cube root above 0.008856,
    7.787 t + 16/116 below (CIE's f)."""
    xyz = _TO_XYZ @ _linear(pixels).T
    f = np.cbrt(xyz)
    if xyz.min() <= _F32(0.008856):
        low = xyz <= _F32(0.008856)
        f[low] = _F32(7.787) * xyz[low] + _F32(16 / 116)
    return f


def to_lab(tile: np.ndarray) -> np.ndarray:
    """``[3, P]`` float32: L in [0, 100], a and b about 0, of the ``[..., 3]`` uint8 pixels."""
    lab = _LAB_OF_F32 @ to_f(tile.reshape(-1, 3))
    lab[0] += _F32(_LAB_OFFSET[0])
    return lab


def from_f(f: np.ndarray, out: np.ndarray) -> None:
    """Writes into ``out`` (``[n, 3]`` uint8) the sRGB of ``[3, n]`` f values, clipped to the gamut and truncated
    (torchstain's rounding)."""
    xyz = f * f
    xyz *= f
    if f.min() <= _F32(0.2068966):
        low = f <= _F32(0.2068966)
        xyz[low] = (f[low] - _F32(16 / 116)) / _F32(7.787)
    linear = _FROM_XYZ @ xyz
    rgb = np.maximum(linear, 0, out=xyz)
    np.power(rgb, _F32(1 / 2.4), out=rgb)
    rgb *= _F32(1.055)
    rgb -= _F32(0.055)
    if linear.min() <= _F32(0.0031308):
        low = linear <= _F32(0.0031308)
        rgb[low] = _F32(12.92) * linear[low]
    np.clip(rgb, 0, 1, out=rgb)
    rgb *= 255
    planes = np.empty(rgb.shape, np.uint8)
    np.copyto(planes, rgb, casting="unsafe")  # truncated, as astype(uint8)
    flat = out.reshape(-1)
    for channel in range(3):  # 5x faster than one transposed copy
        flat[channel::3] = planes[channel]


def _f_blocks(pixels: np.ndarray) -> list[np.ndarray]:
    flat = pixels.reshape(-1, 3)
    return [to_f(flat[i:i + BLOCK]) for i in range(0, len(flat), BLOCK)]


def _lab_moments(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The LAB channels' means and standard deviations (float64) of f's blocks: sums of the LAB values less the
    first pixel's (a channel that does not vary gives exactly 0; a value near the mean keeps float32 sums from
    cancellation), each block's summed in float32 and the blocks' in float64."""
    shift = (_LAB_OF_F32 @ blocks[0][:, :1])[:, 0]
    n, sums, squares = 0, np.zeros(3), np.zeros(3)
    for f in blocks:
        lab = _LAB_OF_F32 @ f
        lab -= shift[:, None]
        n += f.shape[1]
        sums += lab.sum(1)
        squares += np.einsum("ij,ij->i", lab, lab)
    mean = sums / n
    return shift + mean + _LAB_OFFSET, np.sqrt(np.maximum(squares / n - mean * mean, 0))


def lab_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LAB channels' means and standard deviations ``([3], [3])`` of uint8 pixels ``[..., 3]``."""
    return _lab_moments(_f_blocks(pixels))


def _move(source: tuple[np.ndarray, np.ndarray], mean: Sequence[float], std: Sequence[float]
          ) -> tuple[np.ndarray, np.ndarray]:
    """The matrix and offset (float32) taking a pixel's f to the f of its output: to LAB, each channel moved from
    ``source``'s mean and deviation to ``mean`` and ``std``, back to f."""
    mu, sd = (np.asarray(v, np.float64) for v in source)
    ratio = np.asarray(std, np.float64) / sd
    matrix = _F_OF_LAB @ (ratio[:, None] * _LAB_OF_F)
    offset = _F_OF_LAB @ (ratio * (_LAB_OFFSET - mu) + np.asarray(mean, np.float64) - _LAB_OFFSET)
    return matrix.astype(np.float32), offset.astype(np.float32)[:, None]


def reinhard(tile: np.ndarray, mean: Sequence[float], std: Sequence[float],
             source: Optional[tuple[np.ndarray, np.ndarray]] = None) -> Optional[np.ndarray]:
    """The ``[H, W, 3]`` uint8 tile (or whole image) with its LAB channels' means and standard deviations moved
    to ``mean`` and ``std``; ``source``: the statistics to move from (those of the tile's image,
    ``lab_statistics``), else the tile's own. None where a channel does not vary (nothing to scale)."""
    blocks = _f_blocks(tile)
    source = source if source is not None else _lab_moments(blocks)
    if not (np.asarray(source[1]) > 0).all():
        return None
    matrix, offset = _move(source, mean, std)
    out = np.empty(tile.shape, np.uint8)
    flat = out.reshape(-1, 3)
    for i, f in enumerate(blocks):
        moved = matrix @ f
        moved += offset
        from_f(moved, flat[i * BLOCK:(i + 1) * BLOCK])
    return out
