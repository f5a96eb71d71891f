"""Large whole slides built from real tissue: a mosaic of the lymphoma images written as a tiled,
pyramidal, deflate-compressed TIFF with its resolution, one tile at a time (never whole in memory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

TILE = 256


def _source_tiles(images: list[Path]) -> list[np.ndarray]:
    """256-px crops of the real images, the mosaic's building blocks."""
    crops = []
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        crops.append(np.ascontiguousarray(pixels[28:28 + TILE, 80:80 + TILE]))
    return crops


def write_mosaic_slide(path: Path, images: list[Path], width: int, height: int, mpp: float = 0.5,
                       levels: int = 3) -> Path:
    """A pyramidal TIFF of ``width`` x ``height`` pixels at ``mpp``, each level half the previous one."""
    crops = _source_tiles(images)

    def tiles(level: int) -> Iterator[np.ndarray]:
        w, h = width >> level, height >> level
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                block = crops[((ty // TILE) * 7 + (tx // TILE) * 3 + level) % len(crops)]
                if level:  # a coarser level: a real crop shrunk, like a scanner's pyramid
                    block = np.asarray(Image.fromarray(block).resize((TILE, TILE)))
                yield block

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", compressionargs={"level": 1},
                       dtype=np.uint8)
        tif.write(tiles(0), shape=(height, width, 3), resolution=(1e4 / mpp, 1e4 / mpp),
                  resolutionunit="CENTIMETER", **options)
        for level in range(1, levels):
            tif.write(tiles(level), shape=(height >> level, width >> level, 3), subfiletype=1,
                      resolution=(1e4 / mpp / 2 ** level, 1e4 / mpp / 2 ** level), resolutionunit="CENTIMETER",
                      **options)
    return path


def mosaic_levels(images: list[Path], width: int, height: int, levels: int = 3) -> list[np.ndarray]:
    """A small mosaic of real tissue and its pyramid (each level half the previous, resized by PIL), in memory."""
    crops = _source_tiles(images)
    base = np.zeros((height, width, 3), dtype=np.uint8)
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            block = crops[((ty // TILE) * 7 + (tx // TILE) * 3) % len(crops)]
            base[ty:ty + TILE, tx:tx + TILE] = block[:height - ty, :width - tx]
    out = [base]
    for _ in range(1, levels):
        h, w = out[-1].shape[:2]
        out.append(np.asarray(Image.fromarray(out[-1]).resize((w // 2, h // 2))))
    return out


def write_ome_pyramid(path: Path, levels: list[np.ndarray], mpp: float = 0.5, compression: str = "zlib") -> Path:
    """An OME-TIFF pyramid as Bio-Formats and QuPath write it: level 0 with OME-XML, the others in its SubIFDs;
    tiles of ``compression`` (zlib, jpeg as QuPath's default for RGB, lzw, ...)."""
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        options = dict(tile=(TILE, TILE), photometric="rgb", compression=compression,
                       compressionargs={"level": 1} if compression == "zlib" else {})
        tif.write(levels[0], subifds=len(levels) - 1, metadata={"axes": "YXS", "PhysicalSizeX": mpp,
                                                               "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm",
                                                               "PhysicalSizeYUnit": "µm"}, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    return path


VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _dicom_frames(pixels: np.ndarray) -> np.ndarray:
    """A level cut into TILE-px frames, row by row (TILED_FULL), padded with white."""
    h, w = pixels.shape[:2]
    across, down = -(-w // TILE), -(-h // TILE)
    frames = np.full((down * across, TILE, TILE, 3), 255, dtype=np.uint8)
    for ty in range(down):
        for tx in range(across):
            part = pixels[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
            frames[ty * across + tx, :part.shape[0], :part.shape[1]] = part
    return frames


def write_dicom_pyramid(folder: Path, levels: list[np.ndarray], mpp: float = 0.5) -> list[Path]:
    """A DICOM WSI series as scanners export it, one instance per level (uncompressed RGB, TILED_FULL), written
    with pydicom into ``folder``; returns the files, level 0 first."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    width0, height0 = levels[0].shape[1], levels[0].shape[0]
    paths = []
    for index, pixels in enumerate(levels):
        frames = _dicom_frames(pixels)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = VL_WHOLE_SLIDE, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = VL_WHOLE_SLIDE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.PatientName, ds.PatientID, ds.ContainerIdentifier = "SM", "test", "test", folder.name
        ds.ImageType = ["ORIGINAL" if index == 0 else "DERIVED", "PRIMARY", "VOLUME",
                        "NONE" if index == 0 else "RESAMPLED"]
        ds.InstanceNumber, ds.DimensionOrganizationType = index + 1, "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = pixels.shape[1], pixels.shape[0]
        ds.TotalPixelMatrixFocalPlanes = ds.NumberOfFocalPlanes = ds.NumberOfOpticalPaths = 1
        ds.Rows = ds.Columns = TILE
        ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width0 * mpp / 1000, height0 * mpp / 1000  # mm
        spacing = mpp * width0 / pixels.shape[1] / 1000  # mm per pixel of this level
        measures = Dataset()
        measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        optical = Dataset()
        optical.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([optical])
        ds.PixelData = frames.tobytes()
        path = folder / f"{meta.MediaStorageSOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def damage_level0_tiles(source: Path, target: Path, first: int, count: int) -> None:
    """A copy of the slide ``source`` whose level-0 tiles ``first`` to ``first + count - 1`` are zeroed (a copy
    corrupted on its way: the header and the smaller levels still read)."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        for index in range(first, first + count):
            offset, size = page.dataoffsets[index], page.databytecounts[index]
            data[offset:offset + size] = bytes(size)
    target.write_bytes(bytes(data))
