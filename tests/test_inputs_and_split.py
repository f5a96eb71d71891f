"""Finding images and cases on the real data, and the case-level split."""

from __future__ import annotations

import csv
import shutil
from collections import Counter

import pytest

from conftest import pick_images
from lymphoma.errors import InputError
from lymphoma.inputs import (
    DEFAULT_CASE_PATTERN,
    ImageRecord,
    case_of,
    compile_case_pattern,
    discover,
)
from lymphoma.split import assign_phases, check_no_leakage, split_cases


def test_case_pattern_drops_image_number_and_re_cut_suffix(manifest_rows):
    pattern = compile_case_pattern(DEFAULT_CASE_PATTERN)
    for row in manifest_rows:
        assert case_of(row["lowres_path"].rsplit("/", 1)[1].rsplit(".", 1)[0], pattern) == row["case_id"]
    tcga = compile_case_pattern(r"^(?P<case>TCGA-\w\w-\w{4})")  # the README's pattern for TCGA's slide names
    assert {case_of(s, tcga) for s in ("TCGA-AB-1234-01Z-00-DX1", "TCGA-AB-1234-11A-01-TS1")} == {"TCGA-AB-1234"}


def test_class_folders_give_labels_and_cases_of_the_real_data(data_root, manifest_rows):
    inputs = discover(data_root / "lowres", ["CLL", "FL", "MCL"])
    assert len(inputs.records) == len(manifest_rows) == 307
    truth = {row["lowres_path"].rsplit("/", 1)[1]: (row["cls"], row["case_id"]) for row in manifest_rows}
    assert all(truth[r.name] == (r.label, r.case) for r in inputs.records)
    assert not inputs.skipped


def test_case_folders_inside_class_folders_name_the_case_of_their_images(tmp_path, data_root, manifest_rows):
    """``<class>/<patient>/<n>.png``, as hospital exports are laid out: the folder is the case (the file names match
    no case pattern), files named alike in two patients are two images, a split keeps each folder on one side, a
    folder deeper than a case is named as skipped (an error in strict mode), one patient under two classes refused."""
    root = tmp_path / "export"
    truth = {}
    for row in pick_images(manifest_rows, 3, 3):
        folder = root / row["cls"] / f"patient {row['case_id']}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{len(list(folder.iterdir())) + 1}.png"
        shutil.copyfile(data_root / row["lowres_path"], target)
        truth[str(target)] = (row["cls"], f"patient {row['case_id']}")
    inputs = discover(root, ["CLL", "FL", "MCL"])
    assert {r.path: (r.label, r.case) for r in inputs.records} == truth and len(truth) == 27
    assert len({r.key for r in inputs.records}) == 27 and not inputs.skipped
    phase_of = split_cases(inputs.records, val_fraction=0.34, test_fraction=0.0, seed=0)
    assert set(phase_of) == {case for _, case in truth.values()}
    deeper = next(root.glob("CLL/*")) / "scans"
    deeper.mkdir()
    shutil.copyfile(next(iter(truth)), deeper / "9.png")
    inputs = discover(root, ["CLL", "FL", "MCL"])
    assert len(inputs.records) == 27 and [s.path for s in inputs.skipped] == [str(deeper)]
    assert "inside a case folder" in inputs.skipped[0].reason
    with pytest.raises(InputError, match="scans: a folder inside a case folder"):
        discover(root, ["CLL", "FL", "MCL"], strict=True)
    shutil.rmtree(deeper)
    shutil.copytree(next(root.glob("CLL/*")), root / "FL" / next(root.glob("CLL/*")).name)
    with pytest.raises(InputError, match="case patient .* has images of two classes"):
        discover(root, ["CLL", "FL", "MCL"])


def test_csv_manifest_with_mapped_columns(data_root, manifest_rows):
    inputs = discover(data_root / "manifest.csv", None, columns={"path": "lowres_path", "label": "cls", "case": "case_id"})
    assert inputs.classes == ["CLL", "FL", "MCL"]
    assert Counter(r.label for r in inputs.records) == Counter(row["cls"] for row in manifest_rows)


def test_split_keeps_every_case_on_one_side_and_every_class_in_each_phase(data_root):
    records = discover(data_root / "lowres").records
    phase_of = split_cases(records, val_fraction=0.25, test_fraction=0.15, seed=3)
    by_phase = assign_phases(records, phase_of)
    case_sets = {phase: {r.case for r in recs} for phase, recs in by_phase.items()}
    assert not case_sets["train"] & case_sets["val"] and not case_sets["train"] & case_sets["test"]
    assert not case_sets["val"] & case_sets["test"]
    for phase in ("train", "val", "test"):
        assert {r.label for r in by_phase[phase]} == {"CLL", "FL", "MCL"}
    assert split_cases(records, 0.25, 0.15, seed=3) == phase_of
    assert any(split_cases(records, 0.25, 0.15, seed=s) != phase_of for s in range(4, 8))
    per_class_val = Counter(r.label for r in records if phase_of[r.case] == "val" and r.name.endswith("_001.png"))
    assert per_class_val == {"CLL": 2, "FL": 2, "MCL": 2}  # round(0.25 * 7 or 8 cases)


def test_leakage_check_rejects_a_case_in_two_phases():
    a = ImageRecord("/x/a_001.png", "CLL", "case-a")
    b = ImageRecord("/x/a_002.png", "CLL", "case-a")
    with pytest.raises(InputError, match="case case-a is in both train and val"):
        check_no_leakage({"train": [a], "val": [b]})


def test_too_few_cases_for_the_split_is_an_error(data_root):
    records = [r for r in discover(data_root / "lowres").records if r.case in ("sj-03-2810", "sj-05-1881")]
    with pytest.raises(InputError, match="too few for val_fraction"):
        split_cases(records, val_fraction=0.5)


def test_unknown_class_folder_is_skipped_and_strict_mode_fails(make_dataset):
    root = make_dataset(1, 2)
    (root / "DLBCL").mkdir()
    shutil.copyfile(next((root / "CLL").iterdir()), root / "DLBCL" / "other_001.png")
    inputs = discover(root, ["CLL", "FL", "MCL"])
    assert [s.path.rsplit("/", 1)[1] for s in inputs.skipped] == ["other_001.png"]
    assert "unknown class 'DLBCL'" in inputs.skipped[0].reason
    with pytest.raises(InputError, match="other_001.png: unknown class 'DLBCL'"):
        discover(root, ["CLL", "FL", "MCL"], strict=True)


def test_manifest_with_missing_file_and_unknown_label(tmp_path, data_root, manifest_rows):
    path = tmp_path / "list.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "case"])
        for row in manifest_rows[:4]:
            writer.writerow([data_root / row["lowres_path"], row["cls"], row["case_id"]])
        writer.writerow([tmp_path / "gone_001.png", "CLL", "x"])
        writer.writerow([data_root / manifest_rows[5]["lowres_path"], "Hodgkin", "y"])
    inputs = discover(path, ["CLL", "FL", "MCL"])
    assert len(inputs.records) == 4
    reasons = {s.path.rsplit("/", 1)[1]: s.reason for s in inputs.skipped}
    assert "file not found" in reasons["gone_001.png"]
    assert "unknown class 'Hodgkin'" in next(r for p, r in reasons.items() if p != "gone_001.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.png,CLL\n")
    with pytest.raises(InputError, match="missing column.*'path'.*data.columns"):
        discover(bad)


def test_empty_folder_duplicates_and_mixed_case_labels(tmp_path, make_dataset):
    (tmp_path / "empty" / "CLL").mkdir(parents=True)
    with pytest.raises(InputError, match="no usable images in .*empty"):
        discover(tmp_path / "empty", ["CLL", "FL", "MCL"])
    root = make_dataset(1, 1)
    first = next((root / "CLL").iterdir())
    shutil.copyfile(first, root / "FL" / first.name)  # told apart by their folders, but one case in two classes
    with pytest.raises(InputError, match=f"case {first.stem.rsplit('_', 1)[0]} has images of two classes"):
        discover(root)
    (root / "FL" / first.name).unlink()
    shutil.copyfile(first, root / "FL" / first.name.replace("_0", "_9"))
    with pytest.raises(InputError, match="has images of two classes"):
        discover(root)
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_prediction_takes_the_case_from_the_file_name_when_folders_tell_two_copies_apart(data_root, manifest_rows):
    """The data set's folder holds a slide twice, at 0.3x and at full size, under the same name: their keys name
    the folders (``lowres__CLL__...``), their case is the patient's, as training finds it, not the key."""
    import re

    from lymphoma.inputs import DEFAULT_CASE_PATTERN
    from lymphoma.prediction_inputs import expand_inputs

    row = next(r for r in manifest_rows if r["fullres_jpeg_path"])
    paths = [str(data_root / row["lowres_path"]), str(data_root / row["fullres_jpeg_path"])]
    slides = expand_inputs(paths, None, None, ["CLL", "FL", "MCL"], re.compile(DEFAULT_CASE_PATTERN))
    assert [s.key.split("__")[0] for s in slides] == ["lowres", "fullres-jpeg"]
    assert [(s.label, s.case) for s in slides] == [(row["cls"], row["case_id"])] * 2


def test_a_case_whose_slides_have_two_classes_is_refused_before_any_prediction(data_root, manifest_rows, tmp_path):
    """Numbered files of several patients in class folders (``CLL/img_001.png``, ``FL/img_001.png``) are one case by
    the default case pattern: its case-level figure (one case, "1.000") and every interval drawn by case would be
    wrong, so prediction refuses it, naming both slides and the fixes; cases given in a list are taken as given."""
    import re

    from lymphoma.inputs import DEFAULT_CASE_PATTERN
    from lymphoma.prediction_inputs import expand_inputs

    rows = [next(r for r in manifest_rows if r["cls"] == cls) for cls in ("CLL", "FL")]
    for row in rows:
        (tmp_path / row["cls"]).mkdir()
        shutil.copyfile(data_root / row["lowres_path"], tmp_path / row["cls"] / "img_001.png")
    classes, pattern = ["CLL", "FL", "MCL"], re.compile(DEFAULT_CASE_PATTERN)
    with pytest.raises(InputError, match=rf"case 'img' has slides of two classes \(CLL: {tmp_path}/CLL/img_001.png; "
                                         rf"FL: {tmp_path}/FL/img_001.png\); a case is one patient: give each "):
        expand_inputs([str(tmp_path)], None, None, classes, pattern)
    listing = tmp_path / "slides.tsv"
    listing.write_text("".join(f"{r['cls']}/img_001.png\t{r['cls']}\t{r['case_id']}\n" for r in rows))
    slides = expand_inputs([], listing, tmp_path, classes, pattern)
    assert [(s.label, s.case) for s in slides] == [(r["cls"], r["case_id"]) for r in rows]
