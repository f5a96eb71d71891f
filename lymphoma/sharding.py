"""Grouping images into shards, fingerprinting what each shard is made from, and the shard manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from lymphoma.errors import InputError
from lymphoma.files import write_text_atomic
from lymphoma.inputs import ImageRecord, Skipped
from lymphoma.regions import regions_stamp
from lymphoma.settings import TileSettings
from lymphoma.store import STORE_FORMAT, ShardSummary

MANIFEST_NAME = "manifest.json"
STAIN_AFTER_RESIZE = "resized, then normalised"  # image-scope stain normalisation of a resized image


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its phase, number and images; ``relpath`` is relative to the tiles folder."""

    phase: str
    index: int
    records: tuple[ImageRecord, ...]

    @property
    def relpath(self) -> str:
        return f"{self.phase}/shard-{self.index:05d}.h5"


def plan_shards(by_phase: Mapping[str, Sequence[ImageRecord]], images_per_shard: int) -> list[ShardPlan]:
    """Cut each phase's images, in order, into shards of at most ``images_per_shard`` images."""
    if images_per_shard < 1:
        raise InputError(f"tiles.images_per_shard must be >= 1, got {images_per_shard}")
    plans = []
    for phase, records in by_phase.items():
        for index, start in enumerate(range(0, len(records), images_per_shard)):
            plans.append(ShardPlan(phase, index, tuple(records[start:start + images_per_shard])))
    return plans


def fingerprint(plan: ShardPlan, classes: Sequence[str], settings: TileSettings, compression: str,
                stain: Optional[dict[str, Any]] = None) -> str:
    """A hash of everything a shard's content depends on: images and region files (path, size, mtime), labels,
    settings, and the stain target where tiling normalises (stain.scope image), with the order of resizing and
    normalising where an image is resized (a shard cut before that order changed is cut again, not mixed with
    the new ones; the fingerprints of every other shard are what they were)."""
    images = []
    for record in plan.records:
        stat = Path(record.path).stat() if Path(record.path).exists() else None
        images.append([record.path, record.label, record.case, stat and stat.st_size, stat and stat.st_mtime_ns])
        if record.regions:  # an edited region file re-tiles its shard
            images[-1].append(regions_stamp(record.regions))
    payload = {"format": STORE_FORMAT, "phase": plan.phase, "classes": list(classes),
               "tiles": settings.as_dict(), "compression": compression, "images": images}
    if stain is not None:
        payload["stain"] = stain
        if settings.resize != 1 and not settings.by_resolution:  # since 53195cc: resized, then normalised
            payload["stain_order"] = STAIN_AFTER_RESIZE
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def write_manifest(tiles_dir: Path, classes: Sequence[str], settings: TileSettings, compression: str,
                   summaries: Sequence[ShardSummary], skipped_inputs: Sequence[Skipped],
                   stain: Optional[dict[str, Any]] = None) -> Path:
    """Write ``manifest.json``: every shard with its counts, per-phase totals, everything skipped, and the stain
    target the tiles were normalised to (null: stored as read)."""
    phases: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        entry = asdict(summary)
        entry["path"] = str(Path(summary.path).relative_to(tiles_dir))
        phase = phases.setdefault(summary.phase, {"shards": [], "n_tiles": 0, "n_images": 0,
                                                  "tiles_per_class": dict.fromkeys(classes, 0),
                                                  "images_per_class": dict.fromkeys(classes, 0)})
        phase["shards"].append(entry)
        phase["n_tiles"] += summary.n_tiles
        phase["n_images"] += summary.n_images
        for name in classes:
            phase["tiles_per_class"][name] += summary.tiles_per_class[name]
            phase["images_per_class"][name] += summary.images_per_class[name]
    skipped = [asdict(s) for s in skipped_inputs]
    skipped += [item for summary in summaries for item in summary.skipped]
    manifest = {"format": STORE_FORMAT, "classes": list(classes), "tiles": settings.as_dict(),
                "compression": compression, "stain": stain, "phases": phases, "skipped": skipped}
    path = tiles_dir / MANIFEST_NAME
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest written by write_manifest."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no shard manifest; run `lymphoma tile` first") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not a valid manifest ({err}); rerun `lymphoma tile` to rewrite it") from None


def phase_shards(path: str | Path, phase: str) -> list[Path]:
    """Absolute paths of the shards of ``phase`` listed in the manifest at ``path`` (file or folder)."""
    path = Path(path)
    manifest = load_manifest(path)
    folder = path if path.is_dir() else path.parent
    if phase not in manifest["phases"]:
        raise InputError(f"{path}: no {phase!r} phase; it has {sorted(manifest['phases'])}")
    return [folder / shard["path"] for shard in manifest["phases"][phase]["shards"]]


def tiles_fingerprint(tiles_dir: Path) -> str:
    """One hash of the shards the manifest in ``tiles_dir`` lists, each by what it was made from: equal only
    for the same images, labels, split and tile settings (a checkpoint records it; resuming compares it)."""
    manifest = load_manifest(tiles_dir)
    shards = sorted((phase, shard["path"], shard.get("fingerprint", "")) for phase, entry in manifest["phases"].items()
                    for shard in entry["shards"])
    return hashlib.sha256(json.dumps([manifest["tiles"], shards]).encode()).hexdigest()
