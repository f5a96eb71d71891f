"""Finding the images of a data set: class folders or a CSV manifest, with the case of each image."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lymphoma.errors import InputError
from lymphoma.images import IMAGE_SUFFIXES, WSI_SUFFIXES, is_image_file, is_unread_image_file, unread_advice
from lymphoma.regions import REGION_SUFFIXES, find_region_file

DEFAULT_CASE_PATTERN = r"^(?P<case>.+?)(?:-R\d+)?_\d+$"


@dataclass(frozen=True)
class ImageRecord:
    """One input image: absolute path, class label and the case (patient) it comes from."""

    path: str
    label: str
    case: str
    regions: str = ""  # a GeoJSON file of annotated regions (lymphoma.regions), or ""
    key: str = ""      # its name in stores and outputs (image_keys); "" takes its file's own

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", image_keys([Path(self.path)])[0])

    @property
    def name(self) -> str:
        """The file name stores record for its tiles: its key with the file's suffix."""
        return self.key + Path(self.path).suffix


KEY_SEPARATOR = "__"


def image_item(path: Path) -> Path:
    """What stands for an image among its folders: its file, or a DICOM slide's series folder (its files are the
    slide's levels)."""
    return path.parent if path.suffix.lower() == ".dcm" else path


def own_name(path: Path) -> str:
    """An image's own name: its file stem, or a DICOM slide's series folder."""
    item = image_item(path)
    return path.stem if item == path else item.name


def image_keys(paths: Sequence[Path]) -> list[str]:
    """Each image's name in stores and outputs: its file stem (a DICOM slide's series folder), or, where files
    share that name (per-patient folders of ``HE.svs``), the folders that tell them apart, joined by ``__``
    (``p1__HE``, ``p2__HE``). Files that no folder tells apart keep their shared name: callers refuse them."""
    parts = [(*image_item(p).parent.parts, own_name(p)) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, part in enumerate(parts):
        groups.setdefault(part[-1], []).append(i)
    keys = [part[-1] for part in parts]
    for members in (m for m in groups.values() if len(m) > 1):
        left = members
        for depth in range(2, max(len(parts[i]) for i in members) + 1):
            tails = {i: KEY_SEPARATOR.join(parts[i][-depth:]) for i in left}
            counts = Counter(tails.values())
            for i in left:
                if counts[tails[i]] == 1 or depth == 2:  # two of one folder keep its name and their own: refused
                    keys[i] = tails[i]
            left = [i for i in left if counts[tails[i]] > 1]
            if not left:
                break
    return keys


@dataclass(frozen=True)
class Skipped:
    """An input that was left out, and why."""

    path: str
    reason: str


@dataclass
class Inputs:
    """The usable images, the class names in label order, and what was skipped."""

    records: list[ImageRecord]
    classes: list[str]
    skipped: list[Skipped] = field(default_factory=list)


def case_of(stem: str, pattern: re.Pattern[str]) -> str | None:
    """The case id encoded in a file stem, or None when the stem does not match the pattern."""
    match = pattern.match(stem)
    if match is None:
        return None
    return match.group("case") if "case" in pattern.groupindex else match.group(0)


def compile_case_pattern(pattern: str) -> re.Pattern[str]:
    """Compile the configured case pattern; it must have a named group ``case``."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise InputError(f"data.case_pattern {pattern!r} is not a valid regular expression: {err}") from None
    if "case" not in compiled.groupindex:
        raise InputError(f"data.case_pattern {pattern!r} needs a named group (?P<case>...) that captures the case id")
    return compiled


def discover(
    source: str | Path,
    classes: Sequence[str] | None = None,
    case_pattern: str = DEFAULT_CASE_PATTERN,
    columns: Mapping[str, str] | None = None,
    strict: bool = False,
    regions: str | Path | None = None,
) -> Inputs:
    """List the images of ``source``: a folder with one sub-folder per class (holding images, or one folder per case
    of images, whose name is then their case; a DICOM slide is its series folder), or a CSV manifest.

    Images of unknown classes, missing files and names without a case are skipped and reported
    (errors in strict mode). An empty source or two files no folder tells apart (``image_keys``) are always errors.
    Each image's region file comes from the manifest's ``regions`` column, else ``<regions>/<key>.geojson``; a region file
    of that folder that names no image is reported as skipped.
    """
    source = Path(source)
    pattern = compile_case_pattern(case_pattern)
    skipped: list[Skipped] = []
    if source.is_dir():
        rows, class_names, skipped = _rows_from_folders(source, classes)
        region_column = {}
    elif source.is_file():
        rows, region_column = _rows_from_csv(source, columns or {})
        class_names = list(classes) if classes else sorted({label for _, label, _ in rows})
    else:
        raise InputError(f"data.source {source} does not exist; give a folder with one sub-folder per class "
                         "or a CSV manifest (path,label,case)")

    if strict and skipped:
        raise InputError(f"{skipped[0].path}: {skipped[0].reason}")
    records: list[ImageRecord] = []
    keys = image_keys([p.absolute() for p, _, _ in rows])
    for (path, label, case), key in zip(rows, keys):
        region_file = region_column.get(path) or find_region_file(regions, key)
        record = _record(path, label, case, class_names, pattern, region_file)
        if isinstance(record, ImageRecord):
            records.append(replace(record, key=key))
        elif strict:
            raise InputError(f"{path}: {record}")
        else:
            skipped.append(Skipped(str(path), record))

    if not records:
        raise InputError(f"no usable images in {source} (expected class sub-folders {class_names or ''} holding "
                         f"{'/'.join(IMAGE_SUFFIXES)} files, or a CSV manifest); skipped {len(skipped)} file(s): "
                         + reasons_by_count(skipped) + _other_classes(rows, class_names))
    _check_unique_names(records)
    _check_case_labels(records)
    skipped += _unused_region_files(regions, keys)
    return Inputs(records=sorted(records, key=lambda r: r.path), classes=class_names, skipped=skipped)


def _rows_from_folders(root: Path, classes: Sequence[str] | None
                       ) -> tuple[list[tuple[Path, str, str]], list[str], list[Skipped]]:
    """The (path, label, case) rows of ``<class>/<image>`` and ``<class>/<case>/<image>``: a folder in a class folder
    is a case (patient), and its name the case of its images, unless it holds a DICOM slide's series (then it is
    that slide, ``<class>/<slide>/*.dcm``, as it is inside a case folder); anything deeper is skipped and named."""
    folders = _visible(root, directories=True)
    class_names = list(classes) if classes else [p.name for p in folders]
    rows: list[tuple[Path, str, str]] = []
    deeper: list[Skipped] = []
    for folder in folders:
        wanted = folder.name in class_names
        rows += [(f, folder.name, "") for f in _visible(folder) if is_image_file(f) or wanted]
        for sub in _visible(folder, directories=True):
            slide = _dicom_slide(sub)
            if slide is not None:
                rows.append((slide, folder.name, ""))
            else:
                case_rows, case_skipped = _case_folder_rows(sub, folder.name, wanted)
                rows, deeper = rows + case_rows, deeper + case_skipped
    return rows, class_names, deeper


def _case_folder_rows(case_folder: Path, label: str, wanted: bool) -> tuple[list[tuple[Path, str, str]], list[Skipped]]:
    """The rows of a case folder's images and DICOM slides, and its other folders as skipped."""
    rows = [(f, label, case_folder.name) for f in _visible(case_folder) if is_image_file(f) or wanted]
    deeper = []
    for inner in _visible(case_folder, directories=True):
        slide = _dicom_slide(inner)
        if slide is not None:
            rows.append((slide, label, case_folder.name))
        else:
            deeper.append(Skipped(str(inner), "a folder inside a case folder; class folders hold images, or one folder "
                                              "per case of images: move its images up or list them in a CSV manifest "
                                              "(path,label,case)"))
    return rows, deeper


def _dicom_slide(folder: Path) -> Path | None:
    """The first DICOM file of a folder that holds a DICOM slide's series (OpenSlide finds the rest beside it), or
    None."""
    return next((f for f in _visible(folder) if f.suffix.lower() == ".dcm"), None)


def _visible(folder: Path, directories: bool = False) -> list[Path]:
    """The files (or folders) of ``folder`` whose names do not start with a dot, sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() if directories else p.is_file()))


def spelt_otherwise(label: str, class_names: Sequence[str]) -> str | None:
    """The class that ``label`` names in other upper and lower case (``cll`` for ``CLL``), or None."""
    return next((name for name in class_names if name.casefold() == label.casefold()), None)


def _other_classes(rows: Sequence[tuple[Path, str, str]], class_names: Sequence[str]) -> str:
    """Where no image is of a class of ``class_names`` but they name two or more others (a cohort of its own
    classes under the lymphoma defaults): how to train on those."""
    labels = sorted({label for _, label, _ in rows})
    if len(labels) < 2 or set(labels) & set(class_names) or any(spelt_otherwise(x, class_names) for x in labels):
        return ""
    return (f". The images name the classes {', '.join(labels)}: to train on them, set data.classes=null (the "
            f"class names found, sorted) or data.classes=[{','.join(labels)}] (that order)")


def unknown_class(label: str, class_names: Sequence[str]) -> str:
    """Why ``label`` is no class, naming the class it is where it differs only in upper and lower case."""
    same = spelt_otherwise(label, class_names)
    if same is not None:
        return (f"unknown class {label!r}: the class {same!r} spelt otherwise (classes are matched exactly); rename "
                f"the folder (or the manifest's labels) to {same!r}, or set data.classes to the names used")
    return f"unknown class {label!r}; known classes are {list(class_names)} (set data.classes or move the file)"


def reasons_by_count(skipped: Sequence[Skipped], shown: int = 5) -> str:
    """The distinct reasons of ``skipped``, most frequent first, each with its count and first file."""
    by_reason: dict[str, list[str]] = {}
    for item in skipped:
        by_reason.setdefault(item.reason, []).append(item.path)
    ranked = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    return "; ".join(f"{len(paths)} x {reason} (e.g. {paths[0]})" for reason, paths in ranked[:shown]) + (
        f"; and {len(ranked) - shown} other reason(s)" if len(ranked) > shown else "")


def _record(path: Path, label: str, case: str, class_names: Sequence[str], pattern: re.Pattern[str],
            region_file: Path | None) -> ImageRecord | str:
    """The image's record, or the reason it cannot be used."""
    if label not in class_names:
        return unknown_class(label, class_names)
    if not path.is_file():
        return "file not found; fix the path in the manifest or remove the line"
    if is_unread_image_file(path):
        return unread_advice(path)
    if not is_image_file(path):
        return f"not a supported image type; use one of {', '.join(IMAGE_SUFFIXES + WSI_SUFFIXES)}"
    case = case or case_of(own_name(path), pattern) or ""
    if not case:
        return (f"file name does not match data.case_pattern {pattern.pattern!r}; "
                "fix the pattern or give the case in a manifest column")
    if region_file is not None and not Path(region_file).is_file():
        return f"its region file {region_file} is not found; fix the manifest's regions column"
    return ImageRecord(str(path.resolve()), label, case, str(Path(region_file).resolve()) if region_file else "")


def _unused_region_files(folder: str | Path | None, keys: Sequence[str]) -> list[Skipped]:
    """The region files of ``folder`` whose stem is no image's key: named, so that a typo is seen."""
    if not folder:
        return []
    if not Path(folder).is_dir():
        raise InputError(f"data.regions {folder} is not a folder; give the folder that holds <image name>.geojson "
                         "region files, or null")
    stems = set(keys)
    return [Skipped(str(f), f"a region file for no image of data.source (no image named {f.stem}.*); rename it "
                            "after its image's file name") for f in sorted(Path(folder).iterdir())
            if f.suffix.lower() in REGION_SUFFIXES and f.stem not in stems]


WORKBOOKS = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0")  # .xlsx and .ods (zip); .xls (OLE2)


def read_user_text(path: Path) -> str:
    """A text file a person made (a manifest, a slide list): UTF-8, with or without the byte-order mark that
    Excel's "CSV UTF-8" writes; a spreadsheet workbook, or any other encoding, is an InputError naming the file and
    the fix."""
    if is_image_file(path) or is_unread_image_file(path):
        raise InputError(f"{path} is an image or slide file where a list of them was expected: data.source takes a "
                         "folder of class folders or a CSV manifest, --list a TSV or CSV naming the files; images to "
                         "predict are given as its inputs")
    data = path.read_bytes()
    if data.startswith(WORKBOOKS):
        raise InputError(f"{path}: a spreadsheet workbook (.xlsx, .xls, .ods), not a text file; save the sheet as CSV "
                         "(Excel: File > Save As > \"CSV UTF-8 (Comma delimited)\") and give that file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it "
                         "as UTF-8 (Excel: \"CSV UTF-8\"; iconv -f latin1 -t utf-8)") from None


def user_csv(path: Path) -> csv.DictReader:
    """A DictReader over a CSV a person made (``read_user_text``): comma-separated, semicolon-separated (Excel's "CSV"
    where the decimal mark is a comma, as in most of Europe) or tab-separated: the separator its header line holds
    most often, commas on a tie."""
    text = read_user_text(path)
    header = text.split("\n", 1)[0]
    separator = max(",;\t", key=header.count)
    return csv.DictReader(io.StringIO(text, newline=""), delimiter=separator)


def slashed(raw: str, base: Path | None) -> str:
    """A path a Windows tool wrote (``CLL\\p07\\slide.svs``) with forward slashes, unless a file of that very name
    (backslashes and all, relative to ``base``) exists here."""
    if "\\" not in raw:
        return raw
    literal = Path(raw) if base is None or Path(raw).is_absolute() else base / raw
    return raw if literal.exists() else raw.replace("\\", "/")


def _rows_from_csv(manifest: Path, columns: Mapping[str, str]) -> tuple[list[tuple[Path, str, str]], dict[Path, Path]]:
    """The (path, label, case) rows of a manifest, and the region file of each row that has one."""
    names = {"path": "path", "label": "label", "case": "case", "regions": "regions", **columns}
    reader = user_csv(manifest)
    header = reader.fieldnames or []
    missing = [names[key] for key in ("path", "label") if names[key] not in header]
    if missing:
        raise InputError(f"{manifest}: missing column(s) {missing}; the header has {header}. "
                         "Name them path,label[,case] or map them with data.columns")
    rows, region_files = [], {}
    for line_no, row in enumerate(reader, start=2):
        raw_path = slashed((row.get(names["path"]) or "").strip(), manifest.parent)
        if not raw_path:
            raise InputError(f"{manifest}, line {line_no}: empty {names['path']!r} column; fill it or delete the line")
        path = Path(raw_path)
        if not path.is_absolute():
            path = manifest.parent / path
        rows.append((path, (row.get(names["label"]) or "").strip(), (row.get(names["case"]) or "").strip()))
        region = slashed((row.get(names["regions"]) or "").strip(), manifest.parent)
        if region:
            region_files[path] = Path(region) if Path(region).is_absolute() else manifest.parent / region
    return rows, region_files


def shared_key(keys: Sequence[str], paths: Sequence[object]) -> tuple[str, object, object] | None:
    """The first key that two files share (the key and both paths), or None: files ``image_keys`` could not tell
    apart, which their callers refuse in their own words."""
    seen: dict[str, object] = {}
    for key, path in zip(keys, paths):
        if key in seen:
            return key, seen[key], path
        seen[key] = path
    return None


def _check_unique_names(records: Sequence[ImageRecord]) -> None:
    twin = shared_key([r.key for r in records], [r.path for r in records])
    if twin:
        raise InputError(f"two images named {twin[0]}: {twin[1]} and {twin[2]}; file names identify images in the "
                         "stores and outputs, rename or remove one")


def case_of_two_classes(items: Sequence[Any]) -> tuple[Any, Any] | None:
    """The first two items (with ``case``, ``label``: images or slides) of one case and two classes, or None; items
    without a label (None) are passed over. A case is one patient, of one class: callers refuse it in their own
    words."""
    first: dict[str, Any] = {}
    for item in items:
        if item.label is None:
            continue
        other = first.setdefault(item.case, item)
        if other.label != item.label:
            return other, item
    return None


def _check_case_labels(records: Sequence[ImageRecord]) -> None:
    pair = case_of_two_classes(records)
    if pair:
        previous, record = pair
        raise InputError(f"case {record.case} has images of two classes ({previous.label} and {record.label}), "
                         f"e.g. {record.path}; fix the labels or the case ids")
