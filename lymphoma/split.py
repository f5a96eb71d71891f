"""Case-level train/val/test split, stratified by class and seeded, with a leakage check."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from lymphoma.errors import InputError
from lymphoma.files import write_csv_atomic
from lymphoma.inputs import ImageRecord

PHASES = ("train", "val", "test")


def split_cases(records: Sequence[ImageRecord], val_fraction: float, test_fraction: float = 0.0,
                seed: int = 0) -> dict[str, str]:
    """Assign every case to a phase, per class, so that each phase keeps the class mix.

    Each class gives ``round(fraction * n_cases)`` cases (at least one when the fraction is above
    zero) to val and test; training keeps at least one case per class.
    """
    for name, value in (("split.val_fraction", val_fraction), ("split.test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise InputError(f"{name} is {value}; it must be in [0, 1)")
    cases_by_class: dict[str, set[str]] = defaultdict(set)
    for record in records:
        cases_by_class[record.label].add(record.case)

    rng = random.Random(seed)
    phase_of: dict[str, str] = {}
    for label in sorted(cases_by_class):
        cases = sorted(cases_by_class[label])
        rng.shuffle(cases)
        n_val = _count(val_fraction, len(cases))
        n_test = _count(test_fraction, len(cases))
        if len(cases) - n_val - n_test < 1:
            raise InputError(f"class {label} has {len(cases)} case(s): too few for val_fraction={val_fraction} and "
                             f"test_fraction={test_fraction} with one case left for training; add cases or lower them")
        for i, case in enumerate(cases):
            phase_of[case] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return phase_of


def _count(fraction: float, n: int) -> int:
    return 0 if fraction == 0 else max(1, round(fraction * n))


def assign_phases(records: Sequence[ImageRecord], phase_of: dict[str, str]) -> dict[str, list[ImageRecord]]:
    """Group records by the phase of their case, after checking that no case is in two phases."""
    by_phase: dict[str, list[ImageRecord]] = {phase: [] for phase in PHASES}
    for record in records:
        by_phase[phase_of[record.case]].append(record)
    check_no_leakage(by_phase)
    return {phase: recs for phase, recs in by_phase.items() if recs}


def check_no_leakage(by_phase: dict[str, Sequence[ImageRecord]]) -> None:
    """Raise when one case (patient) has images in two phases."""
    seen: dict[str, str] = {}
    for phase, records in by_phase.items():
        for record in records:
            other = seen.setdefault(record.case, phase)
            if other != phase:
                raise InputError(f"case {record.case} is in both {other} and {phase} (e.g. {record.path}): "
                                 "a patient must stay on one side of the split")


def write_split_csv(path: Path, by_phase: dict[str, Sequence[ImageRecord]]) -> None:
    """Write ``phase,case,label,path,regions,key`` rows, one per image (regions: its region file, or empty; key:
    its name in stores and outputs)."""
    write_csv_atomic(path, ["phase", "case", "label", "path", "regions", "key"],
                     ([phase, r.case, r.label, r.path, r.regions, r.key] for phase, records in by_phase.items()
                      for r in records))
