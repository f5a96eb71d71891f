"""The inputs of a prediction: image and slide files, wildcards (``**`` recursive) and TSV or CSV lists, with
their truth and case when known."""

from __future__ import annotations

import csv
import glob
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from lymphoma.errors import InputError
from lymphoma.images import is_image_file, is_unread_image_file, one_file_per_dicom_slide
from lymphoma.inputs import (
    case_of,
    case_of_two_classes,
    image_item,
    image_keys,
    own_name,
    read_user_text,
    shared_key,
    slashed,
    spelt_otherwise,
    user_csv,
)
from lymphoma.prediction import SlideInput
from lymphoma.regions import find_region_file

Row = tuple[str, Optional[str], Optional[str], str]  # path, label, case, where it was given (a list's line)
LIST_HEADERS = ("path", "file", "filename")  # a TSV's first line starting so is its header
PREDICT_MARKER, FEATURES_MARKER, MIL_PREDICT_MARKER = ".lymphoma-predict", ".lymphoma-features", ".lymphoma-mil-predict"
OUTPUT_MARKERS = (PREDICT_MARKER, FEATURES_MARKER, MIL_PREDICT_MARKER)  # a folder a command wrote: never its input


def expand_inputs(patterns: Sequence[str], list_file: Optional[Path], basepath: Optional[Path],
                  classes: Sequence[str], case_pattern: re.Pattern[str],
                  regions: Optional[str] = None, columns: Optional[Mapping[str, str]] = None,
                  outputs: Optional[Path] = None) -> list[SlideInput]:
    """Slides from names and wildcards (``**`` recursive) and from a list: a TSV whose columns are path[, label[,
    case]] (``#`` lines and blank lines skipped), or a CSV whose header names them (``columns``: data.columns, as
    for a training manifest); relative paths under ``basepath``. Truth and case come from the list's
    columns or, for files, from their folders (``truth_from_folders``), else from the file's own name by
    ``case_pattern`` (not its key, which names folders too where two files share a name); region files from
    ``<regions>/<key>.geojson``. Files under ``outputs`` (the command's output folder: its heat maps are PNGs), or
    under any folder an earlier prediction or embedding wrote (``OUTPUT_MARKERS``: one set aside by ``--restart``
    too), are no match of a wildcard or folder."""
    if basepath is not None and list_file is None:
        raise InputError(f"--basepath {basepath} is where a --list's relative paths lie, and no --list is given; name "
                         "the files and wildcards by their own paths (or put them in a --list)")
    rows: list[Row] = []
    marked: dict[Path, bool] = {}
    for pattern in patterns:
        matches = one_file_per_dicom_slide([m for m in _matches(pattern) if not _in_outputs(m, outputs, marked)])
        if not matches:
            raise InputError(f"{pattern!r} matches no image file; check the path and quote wildcards so the shell "
                             "leaves them to lymphoma (e.g. 'cohort/**/*.tif')")
        rows += [(m, None, None, m) for m in matches]
    if list_file is not None:
        rows += _read_list(list_file, basepath, columns or {})
    if not rows:
        raise InputError(f"--list {list_file} names no slide; give its paths one per line" if list_file else
                         "no slides to predict: give file names, wildcards or --list slides.tsv")
    _check_labels(rows, classes, list_file)
    unique = _once_each(rows)
    keys = slide_keys([Path(os.path.abspath(path)) for path, _, _, _ in unique.values()])
    slides = []
    for (resolved, (path, label, case, _)), key in zip(unique.items(), keys):
        folder_label, folder_case = truth_from_folders(Path(path), classes)
        region_file = find_region_file(regions, key)  # <slide name>.geojson: a DICOM slide's is its folder's
        slides.append(SlideInput(resolved, key, label or folder_label,
                                 case or folder_case or case_of(own_name(Path(path)), case_pattern) or key,
                                 str(region_file.resolve()) if region_file else ""))
    _check_case_labels(slides)
    return slides


def _once_each(rows: Sequence[Row]) -> dict[str, Row]:
    """Each file once (by its resolved path), with the class and case any of its rows gives: a wildcard's match
    takes them from a list that names it too; two rows that give it different ones are an InputError naming both."""
    unique: dict[str, Row] = {}
    for path, label, case, where in rows:
        first = unique.setdefault(str(Path(path).resolve()), (path, label, case, where))
        if any(None not in (mine, theirs) and mine != theirs for mine, theirs in ((label, first[1]), (case, first[2]))):
            raise InputError(f"{path} is given twice with another class or case ({first[3]}: {first[1] or '-'}, "
                             f"{first[2] or '-'}; {where}: {label or '-'}, {case or '-'}); keep the one that is right")
        unique[str(Path(path).resolve())] = (first[0], first[1] or label, first[2] or case, first[3] if first[1] else where)
    return unique


def truth_from_folders(path: Path, classes: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
    """The class and case that a file's folders tell, as in training's class folders: a parent folder named after
    a class (``CLL/x.svs``), or a grandparent so named, whose child is then the case (``CLL/p07/x.svs``); a DICOM
    slide's series folder stands for its file."""
    item = image_item(path)
    if item.parent.name in classes:
        return item.parent.name, None
    if item.parent.parent.name in classes:
        return item.parent.parent.name, item.parent.name
    return None, None


def slide_keys(paths: Sequence[Path]) -> list[str]:
    """Each slide's name in the outputs (``lymphoma.inputs.image_keys``); two files that no folder tells apart are
    an InputError naming both."""
    keys = image_keys(paths)
    twin = shared_key(keys, paths)
    if twin:
        raise InputError(f"two inputs named {twin[0]}: {twin[1]} and {twin[2]}; outputs are named after the file, "
                         "rename one or predict them separately")
    return keys


def _under(path: str, folder: Optional[Path]) -> bool:
    return folder is not None and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def _in_outputs(path: str, outputs: Optional[Path], marked: dict[Path, bool]) -> bool:
    """Whether ``path`` lies under ``outputs`` or under a folder that holds one of ``OUTPUT_MARKERS`` (``marked``:
    what is known of each folder so far)."""
    if _under(path, outputs):
        return True
    for folder in Path(os.path.abspath(path)).parents:
        if folder not in marked:
            marked[folder] = any((folder / marker).is_file() for marker in OUTPUT_MARKERS)
        if marked[folder]:
            return True
    return False


def _matches(pattern: str) -> list[str]:
    """The image files a word names: a wildcard's matches, every image file under a folder (``folder/**/*``: none
    hidden, such as the ``._<name>`` files a Mac leaves beside each copied file), or the file itself (a missing one
    fails as its slide, by name). Images of a type not read here (CZI, HEIC, ...) are matched too: each fails as its
    slide, saying how to convert it, rather than being left out without a word."""
    if glob.has_magic(pattern):
        found = sorted(glob.glob(pattern, recursive=True))
    elif Path(pattern).is_dir():  # hidden files skipped, as wildcards and training's class folders skip them
        found = sorted(str(p) for p in Path(pattern).rglob("*")
                       if not any(part.startswith(".") for part in p.relative_to(pattern).parts))
    else:
        return [pattern]
    return [m for m in found if Path(m).is_file() and (is_image_file(Path(m)) or is_unread_image_file(Path(m)))]


def _check_labels(rows: Sequence[Row], classes: Sequence[str], list_file: Optional[Path]) -> None:
    """Every label given in the list is one of the model's classes; else one error naming them all by line."""
    unknown = [(label, where) for _, label, _, where in rows if label is not None and label not in classes]
    if not unknown:
        return

    def named(label: str, where: str) -> str:
        same = spelt_otherwise(label, classes)
        return f"{where}: {label!r}" + (f" ({same!r}?)" if same is not None else "")
    shown = "; ".join(named(label, where) for label, where in unknown[:5])
    more = f"; and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise InputError(f"--list {list_file}: {len(unknown)} label(s) not among the model's classes {list(classes)}: "
                     f"{shown}{more}; correct them, or leave the label column empty for a slide of another class "
                     "(it is predicted, without a truth to score it against)")


def _check_case_labels(slides: Sequence[SlideInput]) -> None:
    """A case (patient) has one class: two among its labelled slides are an InputError naming both slides, since
    its case-level figures and the intervals drawn by case would be wrong (numbered files of several patients,
    ``CLL/img_001.png`` and ``FL/img_001.png``, are one case ``img`` by the default data.case_pattern)."""
    pair = case_of_two_classes(slides)
    if pair:
        other, slide = pair
        raise InputError(f"case {slide.case!r} has slides of two classes ({other.label}: {other.path}; "
                         f"{slide.label}: {slide.path}); a case is one patient: give each slide's case (a --list's "
                         "third column, or case folders <class>/<case>/<slide>), or a data.case_pattern that "
                         "finds the patient in the file names")


def _read_list(path: Path, basepath: Optional[Path], columns: Mapping[str, str]) -> list[Row]:
    """The rows of a ``--list``: a CSV (``.csv``: a header naming its columns, as a training manifest's) or a TSV; paths
    with Windows' backslashes read with slashes (``slashed``)."""
    if not path.is_file():
        raise InputError(f"--list {path} {'is a folder' if path.is_dir() else 'not found'}; give a TSV file "
                         "(path[<tab>label[<tab>case]] per line) or a CSV with a header (path[,label][,case])")
    if basepath is not None and not basepath.is_dir():  # else every relative path would fail as its slide
        raise InputError(f"--basepath {basepath} is not a folder; give the folder the list's relative paths are under")
    entries = [(slashed(raw, basepath), label, case, where) for raw, label, case, where in
               (_csv_entries(path, columns) if path.suffix.lower() == ".csv" else _tsv_entries(path))]
    if basepath is None:
        _check_relative_paths(path, [raw for raw, _, _, _ in entries])
    return [(str(Path(raw) if basepath is None or Path(raw).is_absolute() else
                 _inside(basepath, raw, f"{path}, {where}")), label, case, where) for raw, label, case, where in entries]


def _check_relative_paths(path: Path, paths: Sequence[str]) -> None:
    """Without --basepath a list's relative paths are read from the current folder: where none of them is there
    but some lie beside the list, an InputError saying to give --basepath (rather than a failed slide per line)."""
    relative = [Path(raw) for raw in paths if not Path(raw).is_absolute()]
    if relative and not any(p.exists() for p in relative) and any((path.parent / p).exists() for p in relative):
        raise InputError(f"--list {path}: its relative paths ({relative[0]}, ...) are not in the current folder "
                         f"{Path.cwd()} but lie beside the list: add --basepath {path.parent.absolute()}")


def _tsv_entries(path: Path) -> list[Row]:
    """path[<tab>label[<tab>case]] per line, a field in double quotes where it holds a quote or separator (as
    Excel's "Text (Tab delimited)" writes it); ``#`` lines, blank lines and a header line skipped."""
    rows: list[Row] = []
    for number, line in enumerate(read_user_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([line], delimiter="\t"))]  # quoted as Excel quotes "a, b.png"
        if len(fields) > 3 or not fields[0]:
            raise InputError(f"{path}, line {number}: expected tab-separated path[, label[, case]], got {line!r}")
        if number == 1 and fields[0].split(",")[0].strip().lower() in LIST_HEADERS:
            if len(fields) == 1 and "," in fields[0]:
                raise InputError(f"--list {path}: its header {line.strip()!r} is comma-separated; name the file "
                                 f"{path.with_suffix('.csv').name} to read it as CSV, or separate the columns by tabs")
            continue
        rows.append((fields[0], (fields[1] or None) if len(fields) > 1 else None,
                     (fields[2] or None) if len(fields) > 2 else None, f"line {number}"))
    return rows


def _csv_entries(path: Path, columns: Mapping[str, str]) -> list[Row]:
    """A CSV's rows (comma-, semicolon- or tab-separated: ``user_csv``) by its header's names: path, and label and
    case where the header has them, each by its data.columns name or else its own (an experiment's mapping for its
    manifest does not hide a plain list's ``path`` column); rows whose path is empty or starts with ``#`` skipped."""
    reader = user_csv(path)
    header = [name.strip() for name in reader.fieldnames or []]
    names = {key: next((n for n in (columns.get(key, key), key) if n in header), None) for key in ("path", "label", "case")}
    if names["path"] is None:
        mapped = f"{columns['path']!r} or " if columns.get("path", "path") != "path" else ""
        raise InputError(f"--list {path}: no {mapped}'path' column; the header has {header}. Name the columns "
                         "path[,label][,case] in its first line, or map yours: data.columns.path=<column> (and .label, .case)")
    reader.fieldnames = header
    rows: list[Row] = []
    for row in reader:
        raw = (row.get(names["path"]) or "").strip()
        if not raw or raw.startswith("#"):
            continue
        label, case = ((row.get(names[key] or "") or "").strip() or None for key in ("label", "case"))
        rows.append((raw, label, case, f"line {reader.line_num}"))
    return rows


def _inside(basepath: Path, relative: str, where: str) -> Path:
    """``basepath / relative``, refused when ``..`` takes it outside the base path."""
    base = Path(os.path.normpath(basepath.absolute()))
    file = Path(os.path.normpath(base / relative))
    if not file.is_relative_to(base):
        raise InputError(f"{where}: {relative!r} leads outside --basepath {basepath}; relative paths must stay "
                         "inside it (write an absolute path for a file elsewhere)")
    return file
