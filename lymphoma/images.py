"""Reading images as RGB uint8 arrays, with clear errors for files that cannot be used."""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from lymphoma.errors import ImageError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".jp2", ".j2k", ".gif")  # read through PIL
WSI_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm")  # read through OpenSlide
UNREAD_FORMATS = {".czi": "Zeiss CZI slide", ".vsi": "Olympus VSI slide", ".isyntax": "Philips iSyntax slide",
                  ".lif": "Leica LIF slide", ".nd2": "Nikon ND2 slide", ".heic": "HEIC image", ".heif": "HEIF image",
                  ".avif": "AVIF image"}  # neither PIL nor OpenSlide reads them: named, not called corrupt

_MODE_ADVICE = {
    "L": "is grayscale; H&E tiles need 3 colour channels: re-export it as RGB or remove it",
    "LA": "is grayscale with alpha; re-export it as RGB or remove it",
    "I;16": "is 16-bit grayscale; re-export it as 8-bit RGB or remove it",
    "I": "is 32-bit grayscale; re-export it as 8-bit RGB or remove it",
    "1": "is black and white; re-export it as RGB or remove it",
    "CMYK": "is CMYK; convert it to RGB or remove it",
}


EXACT_TO_RGB = ("RGBA", "P")  # read as RGB where nothing is lost: every pixel opaque; a palette's colours


def _exact_rgb(path: Path, img: Image.Image) -> np.ndarray:
    """The RGB pixels of an RGBA or palette image whose every pixel is opaque (what many tools save an RGB picture
    as): the same colours, nothing lost. A transparent pixel is an ImageError: what lies under it is the user's call."""
    img.load()
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
    if rgba[..., 3].min() < 255:
        raise ImageError(path, f"has transparent pixels ({img.mode} with alpha below 255); flatten it onto white as "
                         "RGB or remove it")
    return np.ascontiguousarray(rgba[..., :3])


def is_image_file(path: Path) -> bool:
    """True when the suffix is one of the supported image or whole-slide formats."""
    return path.suffix.lower() in IMAGE_SUFFIXES + WSI_SUFFIXES


def is_unread_image_file(path: Path) -> bool:
    """True for an image or slide of a type that is not read here (``UNREAD_FORMATS``)."""
    return path.suffix.lower() in UNREAD_FORMATS


def unread_advice(path: Path) -> str:
    """What a file of an ``UNREAD_FORMATS`` type is, and how to convert it."""
    kind = UNREAD_FORMATS[path.suffix.lower()]
    target = "OME-TIFF (Bio-Formats' bfconvert, or QuPath's export)" if kind.endswith("slide") else "TIFF or PNG"
    return f"is a {kind}, a format not read here (nor by OpenSlide); convert it to {target} and give that"


def one_file_per_dicom_slide(paths: list[str]) -> list[str]:
    """``paths`` with the DICOM files of one folder (the instances of one slide's series: its levels, label and
    overview) reduced to the first; OpenSlide finds the others beside it."""
    seen: set[Path] = set()
    out = []
    for path in paths:
        folder = Path(path).parent
        if Path(path).suffix.lower() == ".dcm":
            if folder in seen:
                continue
            seen.add(folder)
        out.append(path)
    return out


DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS)
Image.MAX_IMAGE_PIXELS = None  # read_rgb applies its own, configurable limit (tiles.max_pixels) instead


CONVERT_TO_SLIDE = ("convert it to a tiled pyramidal TIFF, which is read region by region (e.g. `vips tiffsave "
                    "<image> <slide>.tif --tile --pyramid --compression jpeg`)")


def _check_size(path: Path, size: tuple[int, int], max_pixels: int, as_slide: bool) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels, before anything is decoded, with
    the way to read it: raise the limit, or read it region by region (``as_slide``: it already is a slide's)."""
    width, height = size
    if width * height > max_pixels:
        tiff = path.suffix.lower() in TIFF_SUFFIXES
        instead = CONVERT_TO_SLIDE if as_slide or not tiff else \
            ("read it as a whole slide, region by region, as 8-bit RGB TIFFs are with tiles.target_mpp set (to predict "
             "with a model cut by pixels: --force tiles.target_mpp=<microns per pixel of its training images>)")
        raise ImageError(path, f"declares {width} x {height} = {width * height:,} pixels, more than tiles.max_pixels "
                               f"({max_pixels:,}): possibly a decompression bomb; if it is a real image, raise "
                               f"tiles.max_pixels (decoding takes {3 * width * height / 2**30:.1f} GiB) or {instead}")


def _png_rgb8(path: Path) -> Optional[np.ndarray]:
    """The pixels of an 8-bit RGB PNG decoded by Wuffs (pywuffs: 1.5x faster than libspng, 2.5x PIL's decoder on
    the data set's images, the same pixels: tested on all 307), else by libspng (pyspng) where pywuffs is not
    installed; None for any other PNG (16-bit, palette, grey, alpha), which PIL decodes, or where neither is."""
    decode = _fast_png_decoder()
    if decode is None:
        return None
    data = path.read_bytes()
    # IHDR, the first chunk: bit depth at byte 24, colour type at 25 (2: truecolour without alpha)
    if len(data) < 33 or data[12:16] != b"IHDR" or data[24] != 8 or data[25] != 2:
        return None
    _check_chunks(data)
    return decode(data)


_DECODERS = threading.local()  # a Wuffs decoder keeps state between calls: one per thread


def _wuffs_rgb(data: bytes) -> np.ndarray:
    decoder = getattr(_DECODERS, "wuffs", None)
    if decoder is None:
        from pywuffs import ImageDecoderType, PixelFormat, aux

        config = aux.ImageDecoderConfig()
        config.enabled_decoders = [ImageDecoderType.PNG]
        config.pixel_format = PixelFormat.RGB
        decoder = _DECODERS.wuffs = aux.ImageDecoder(config)
    result = decoder.decode(data)
    if result.error_message:  # the pixel buffer is there even then, partly decoded
        raise ValueError(result.error_message)
    return result.pixbuf


def _spng_rgb(data: bytes) -> np.ndarray:
    import pyspng

    return pyspng.load(data, "RGB")


@functools.cache
def _fast_png_decoder() -> Optional[Callable[[bytes], np.ndarray]]:
    """Wuffs where pywuffs is installed, else libspng where pyspng is, else None (PIL decodes)."""
    for module, decode in (("pywuffs", _wuffs_rgb), ("pyspng", _spng_rgb)):
        if importlib.util.find_spec(module) is not None:
            return decode
    return None


def _check_chunks(data: bytes) -> None:
    """Raise ValueError at the first chunk whose CRC does not match its bytes (Wuffs and libspng decode a corrupted
    pixel stream without a word; PIL refuses it): 0.1 ms for a 400 KB file."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(view[pos + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            raise ValueError(f"PNG chunk {bytes(view[pos + 4:pos + 8])!r} at byte {pos} is truncated or fails its CRC")
        if view[pos + 4:pos + 8] == b"IEND":
            return  # bytes some writers leave after the image's end are not its chunks (PIL ignores them too)
        pos = end + 4


def _unidentified_reason(path: Path) -> str:
    """Why PIL could not open ``path``: a TIFF whose samples PIL does not read (floating point, signed) named by
    its sample type, as tifffile reads its header; else a file that is no image or is damaged."""
    import tifffile

    if is_unread_image_file(path):
        return unread_advice(path)
    with path.open("rb") as handle:
        magic = handle.read(4)
    quiet = logging.getLogger("tifffile")  # it logs a damaged header as an error of its own besides raising
    try:
        quiet.disabled = True
        if magic not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            raise ValueError("not a TIFF")
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if page.dtype is None or not page.shape:  # an image file directory without an image
                raise ValueError("no image in its first page")
            dtype, samples = np.dtype(page.dtype), page.samplesperpixel
    except Exception:  # noqa: BLE001 - any failure to read the header: not a TIFF, or a damaged one
        return "not a readable image (corrupt, or of no image type read here); replace or remove it"
    finally:
        quiet.disabled = False
    kind = {"f": "floating-point", "i": "signed integer", "u": "unsigned integer"}.get(dtype.kind, str(dtype))
    return (f"is a TIFF of {kind} samples ({dtype.name}, {samples} per pixel), which is not read as colour; "
            "re-export it as 8-bit RGB (values 0 to 255) or remove it")


def read_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, as_slide: bool = False) -> np.ndarray:
    """Decode an image file to a ``[H, W, 3]`` uint8 array.

    An RGBA or palette image whose every pixel is opaque is read as its RGB colours. Raises ImageError naming the
    file for missing, corrupt, truncated, grayscale, CMYK, partly transparent or other non-RGB images, and for one
    whose header declares more than ``max_pixels`` pixels (a possible decompression bomb, refused before decoding),
    so that a caller can skip the file and go on (``as_slide``: the image is read as a slide, tiled at a resolution).
    """
    return decode_rgb(path, max_pixels, as_slide=as_slide)[0]


def decode_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               shrink_to: Optional[Callable[[int, int], Optional[tuple[int, int]]]] = None, as_slide: bool = False,
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_rgb``'s pixels and the image's full ``(height, width)``. ``shrink_to`` maps the full size to the size
    the caller will resize the image to (None: none): a JPEG is then decoded by its DCT scaling (libjpeg's draft
    mode) at the largest reduction by a power of two that stays at least that large, 2x faster for a half; other
    formats are decoded whole."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found; fix the path or remove it from the input list")
    try:
        with Image.open(path) as img:
            _check_size(path, img.size, max_pixels, as_slide)
            mode, full = img.mode, (img.height, img.width)
            if mode not in ("RGB", *EXACT_TO_RGB):
                advice = _MODE_ADVICE.get(mode, f"has colour mode {mode}; re-export it as 8-bit RGB")
                raise ImageError(path, advice)
            if mode in EXACT_TO_RGB:
                return _exact_rgb(path, img), full
            target = shrink_to(*full) if shrink_to is not None and img.format == "JPEG" else None
            if target is not None:
                img.draft("RGB", (target[1], target[0]))
            array = _png_rgb8(path) if img.format == "PNG" else None
            if array is None:
                img.load()
                array = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, _unidentified_reason(path)) from None
    except (OSError, SyntaxError, ValueError, RuntimeError) as err:  # ValueError: Wuffs', RuntimeError: libspng's
        raise ImageError(path, f"cannot be decoded ({err}); the file is probably truncated or corrupt: "
                         "copy it again or remove it") from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(path, f"decoded to shape {array.shape}, expected [H, W, 3]; re-export it as RGB")
    return array, full
