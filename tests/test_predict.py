"""Tile-vote prediction on real images: outputs, resume after a kill, cohort report, bad input, the pipeline."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, config_for, decompression_bomb, on_a_terminal, pick_images, replaced_while_the_first_task_runs
from hpc import ExecutorSettings
from jobs.cli import main
from jobs.predict import local_processes, slide_chunks
from jobs.train import run_train
from lymphoma.augment import build_augmenter, eval_batch
from lymphoma.case_bootstrap import bootstrap_intervals
from lymphoma.checkpoint import load_checkpoint, save_checkpoint
from lymphoma.errors import InputError
from lymphoma.files import PinnedFile
from lymphoma.images import read_rgb
from lymphoma.model import build_model
from lymphoma.png import encode_png, write_png
from lymphoma.prediction import Predictor, SlideInput
from lymphoma.run_report import write_run_report
from lymphoma.settings import AugmentSettings, PredictSettings, TileSettings
from lymphoma.stain import StainNormalizer
from lymphoma.tiling import cut_tiles, grid_shape


@pytest.fixture(scope="module")
def checkpoint(tiled) -> Path:
    run_train(config_for(tiled, "for-predict", "train.epochs=1", "train.max_steps_per_epoch=3"))
    return tiled[1] / "for-predict" / "train" / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, data_root, manifest_rows) -> Path:
    """12 real images in class folders (4 cases), not the ones the model was trained on."""
    root = tmp_path_factory.mktemp("cohort")
    for row in pick_images(manifest_rows[::-1], 2, 2):
        target = root / row["cls"] / Path(row["lowres_path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / row["lowres_path"], target)
    return root


def predict(checkpoint: Path, out: Path, *words: str) -> int:
    return main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "cluster.poll_s=0.1", *words])


def test_outputs_votes_and_the_model_applied_directly(checkpoint, cohort, tmp_path, capsys):
    assert predict(checkpoint, tmp_path / "out", f"{cohort}/**/*.png") == 0
    report = capsys.readouterr().out
    assert "12 of 12 slide(s) predicted (12 now, 0 already complete), 0 failed" in report
    state = load_checkpoint(checkpoint)
    model = build_model(state["architecture"])
    model.load_state_dict(state["model"])
    model.eval()
    settings, augment = TileSettings(**state["tiles"]), AugmentSettings(**state["augment"])
    normalizer = StainNormalizer.from_state(state["stain"])
    assert normalizer is not None and normalizer.target.method == "reinhard"  # the default
    for image_path in sorted(cohort.rglob("*.png"))[:4]:
        key = image_path.stem
        outputs = np.load(tmp_path / "out" / "slides" / f"{key}.npz")
        record = json.loads((tmp_path / "out" / "slides" / f"{key}.json").read_text())
        rows, cols = grid_shape(312, 417, settings)
        assert len(outputs["probs"]) == rows * cols == record["n_tiles"] == sum(record["votes"].values())
        assert outputs["votes"].tolist() == np.bincount(outputs["tile_class"], minlength=3).tolist()
        tiles = cut_tiles(read_rgb(image_path), settings)
        np.testing.assert_array_equal(outputs["coords"], tiles.coords)
        with torch.inference_mode():
            direct = model(eval_batch(normalizer.batch(tiles.pixels), augment, torch.device("cpu")))
        np.testing.assert_allclose(outputs["logits"], direct.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(outputs["probs"].sum(1), 1, atol=1e-5)
        assert record["majority_class"] == state["classes"][int(np.argmax(outputs["votes"]))]
        assert record["label"] == image_path.parent.name
    for backend in ("dali", "torch"):  # prediction's crop is the evaluation transform of both backends
        aug = build_augmenter(AugmentSettings(**{**state["augment"], "backend": backend}), False, torch.device("cpu"),
                              normalizer=normalizer)
        x = tiles.pixels[:4]
        batch = torch.stack([aug.sample(t) for t in x]) if aug.sample else torch.from_numpy(x)
        np.testing.assert_allclose(aug.batch(batch).numpy(),
                                   eval_batch(normalizer.batch(x), augment, torch.device("cpu")).numpy(), atol=1e-6)
    with (tmp_path / "out" / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 12 and {r["truth"] for r in summary} == {"CLL", "FL", "MCL"}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["image"]["n"] == 12 and metrics["case"]["n"] == 6
    assert sum(map(sum, metrics["image"]["confusion"])) == 12
    for level in ("image", "case"):  # the field's figures, from the slides' mean probabilities (scikit-learn)
        scores = metrics[level]
        assert set(scores["auc"]) == {"CLL", "FL", "MCL"} and 0 <= scores["macro_auc"] <= 1
        assert 0 <= scores["macro_f1"] <= 1 and 0 <= scores["ece"] <= 1
        assert sum(scores["reliability"]["count"]) == scores["n"]
    _summary_and_intervals_come_from_the_slides(tmp_path / "out", summary, metrics, state["classes"], report)
    check_qupath_exports(tmp_path / "out" / "slides", summary[0]["slide"], (417, 312), 64)
    for name in ("confusion_image.png", "confusion_case.png", "roc_image.png", "roc_case.png", "reliability_image.png",
                 "reliability_case.png", "slides/" + summary[0]["slide"] + ".png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 100
    with Image.open(tmp_path / "out" / "slides" / (summary[0]["slide"] + ".png")) as heatmap:  # lymphoma.png's
        assert heatmap.mode == "RGB" and heatmap.size == (209, 156) and np.asarray(heatmap).std() > 10


def _summary_and_intervals_come_from_the_slides(out: Path, summary: list[dict[str, str]], metrics: dict,
                                                classes: list[str], report: str) -> None:
    """summary.csv holds each slide's mean tile probabilities; the figures' intervals are the case bootstrap of the
    slides' own records, and are printed."""
    records = [json.loads((out / "slides" / f"{r['slide']}.json").read_text()) for r in summary]
    for row, record in zip(summary, records):  # each slide's mean tile probabilities, for analyses elsewhere
        assert [float(row[f"prob_{c}"]) for c in classes] == pytest.approx([record["mean_probs"][c] for c in classes],
                                                                           abs=5e-5)
    drawn = bootstrap_intervals(records, classes, "vote", 2000, 0.95, scores=True)  # cv.bootstrap, cv.confidence
    assert (metrics["bootstrap"], metrics["confidence"]) == (2000, 0.95)
    for level in ("image", "case"):
        for figure in ("accuracy", "balanced_accuracy", "macro_auc", "ece"):
            assert metrics[level]["interval"][figure] == drawn[f"{level}_{figure}"]
        low, high = metrics[level]["interval"]["accuracy"]
        assert low <= metrics[level]["accuracy"] <= high and low < high
        assert f"{level}-level accuracy {metrics[level]['accuracy']:.3f} [{low:.3f}, {high:.3f}], balanced" in report
    assert "95% intervals from 2000 resamples of the 6 cases" in report
    with (out / "cases.csv").open() as handle:  # the patients, each as the case level counts it
        cases = list(csv.DictReader(handle))
    confusion = np.zeros((3, 3), dtype=int)
    for row in cases:
        mine = [r for r in summary if r["case"] == row["case"]]
        assert int(row["slides"]) == len(mine) and row["truth"] == mine[0]["truth"] and row["failed_slides"] == "0"
        assert [int(row[f"slides_{c}"]) for c in classes] == [sum(r["predicted"] == c for r in mine) for c in classes]
        assert [float(row[f"prob_{c}"]) for c in classes] == pytest.approx(
            [np.mean([float(r[f"prob_{c}"]) for r in mine]) for c in classes], abs=1e-4)
        confusion[classes.index(row["truth"]), classes.index(row["predicted"])] += 1
    assert len(cases) == 6 and confusion.tolist() == metrics["case"]["confusion"]
    assert f"cases:    {out / 'cases.csv'}" in report


def test_pictures_are_pngs_that_any_reader_decodes_to_their_pixels(cohort, tmp_path):
    """lymphoma.png, which writes every slide's heatmap: PIL and libspng read back its pixels, odd sizes too."""
    import pyspng

    image = read_rgb(next(cohort.rglob("*.png")))
    for pixels in (image, image[:1, :7], image[:5, :1], image[::-1, ::3]):
        write_png(tmp_path / "p.png", pixels)
        with Image.open(tmp_path / "p.png") as decoded:
            np.testing.assert_array_equal(np.asarray(decoded), pixels)
        np.testing.assert_array_equal(pyspng.load((tmp_path / "p.png").read_bytes()), pixels)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        encode_png(image.astype(np.float32))


def test_an_image_overview_is_reduced_by_an_integer_factor_and_its_tiles_land_where_they_were_cut(data_root):
    """A plain image's overview (the heatmap's background) is the image box-reduced by the smallest integer factor
    that brings its longer side to 256 or less, and ``coords * coord_scale`` finds each tile's own pixels in it."""
    from lymphoma.tile_sources import open_tiles

    for folder, side, factor in (("lowres", 417, 2), ("fullres-jpeg", 1388, 6)):
        path = next((data_root / folder).rglob("*.*g"))
        source = open_tiles(str(path), TileSettings(min_tissue=0.0))
        tiles = np.concatenate(list(source.batches))
        image = read_rgb(path)
        assert max(image.shape[:2]) == side and 128 < max(source.overview.shape[:2]) <= 256
        np.testing.assert_array_equal(source.overview, np.asarray(Image.fromarray(image).reduce(factor)))
        span = source.extent * source.coord_scale
        assert span == pytest.approx(tiles.shape[1] / factor)
        for (x, y), tile in zip(source.coords * source.coord_scale, tiles):  # coords are (x, y)
            inside = source.overview[round(y):round(y + span), round(x):round(x + span)]
            assert np.abs(inside.mean((0, 1)) - tile.mean((0, 1))).max() < 3
            if factor == 2:  # tiles on even pixels: the overview holds each one reduced, exactly
                np.testing.assert_array_equal(inside, np.asarray(Image.fromarray(tile).reduce(factor)))


def test_slides_are_dealt_into_equal_chunks_one_per_task_and_at_least_one_per_core_share():
    """A job of fewer slides than predict.slides_per_task still runs cluster.parallelism tasks, chunks differ by
    one slide at most, none is over slides_per_task, and every slide is in one chunk, in order."""
    for n, per_task, parallelism, sizes in [(79, 64, 2, [40, 39]), (307, 64, 2, [62, 62, 61, 61, 61]),
                                             (6, 2, 2, [2, 2, 2]), (128, 64, 2, [64, 64]), (1, 64, 2, [1]),
                                             (0, 64, 2, []), (9, 64, 1, [9])]:
        slides = [SlideInput(f"s{i}.png", f"s{i}") for i in range(n)]
        chunks = slide_chunks(slides, per_task, parallelism)
        assert [len(c) for c in chunks] == sizes and [s for c in chunks for s in c] == slides
    # only the local executor's tasks share this machine's cores; a SLURM task has its own
    assert [local_processes(ExecutorSettings(kind, parallelism=4)) for kind in ("local", "debug", "slurm")] == [4, 1, 1]


def check_qupath_exports(slides: Path, key: str, size: tuple[int, int], side: float) -> None:
    """<key>.geojson read back with shapely: one classified detection square of ``side`` full-resolution pixels
    per tile, inside the image, its class the tile's and its probabilities the npz's; <key>.h5 the same corners."""
    import h5py
    from shapely.geometry import box, shape

    outputs = np.load(slides / f"{key}.npz")
    collection = json.loads((slides / f"{key}.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(outputs["probs"])
    image = box(0, 0, *size)
    classes = list(outputs["classes"])
    for feature, probs, tile_class in zip(collection["features"], outputs["probs"], outputs["tile_class"]):
        square = shape(feature["geometry"])
        assert square.is_valid and image.buffer(1).contains(square)
        assert abs(square.area - side * side) < 0.02 * side * side
        properties = feature["properties"]
        assert properties["objectType"] == "detection" and properties["classification"]["name"] == classes[tile_class]
        assert np.allclose([properties["measurements"][f"probability {c}"] for c in classes], probs, atol=1e-5)
    with h5py.File(slides / f"{key}.h5") as h5:
        corners = np.array([shape(f["geometry"]).bounds[:2] for f in collection["features"]])
        assert np.abs(h5["coords"][:] - corners).max() <= 0.5 and h5["coords"].attrs["patch_level"] == 0
        assert abs(h5["coords"].attrs["patch_size"] - side) <= 1 and np.allclose(h5["probs"][:], outputs["probs"])


def test_killed_prediction_resumes_only_the_remaining_slides(checkpoint, data_root, manifest_rows, tmp_path):
    listing = tmp_path / "cohort.tsv"
    rows = manifest_rows[::5]
    listing.write_text("path\tlabel\tcase\n# every fifth image of the data set\n\n"
                       + "".join(f"{r['lowres_path']}\t{r['cls']}\t{r['case_id']}\n" for r in rows))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(checkpoint), "--list", str(listing),
               "--basepath", str(data_root), "--out", str(out), "predict.slides_per_task=40", "predict.batch_size=16",
               "cluster.parallelism=1", "cluster.poll_s=0.05"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list((out / "slides").glob("*.json"))) < 5:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.stem: p.stat().st_mtime_ns for p in (out / "slides").glob("*.json")}
    assert 5 <= len(done_before) < len(rows) and not (out / "summary.csv").exists()
    code, printed = on_a_terminal(command, timeout_s=600)
    assert code == 0, printed
    assert (f"{len(rows)} of {len(rows)} slide(s) predicted ({len(rows) - len(done_before)} now, "
            f"{len(done_before)} already complete)") in printed
    bar = [line for line in printed.replace("\r", "\n").splitlines() if line.startswith("predict:")]
    assert bar and f"| {len(done_before)}/{len(rows)} " in bar[0] and f"| {len(rows)}/{len(rows)} " in bar[-1], bar
    for key, mtime in done_before.items():
        assert (out / "slides" / f"{key}.json").stat().st_mtime_ns == mtime
    with (out / "summary.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert not list((out / "slides").glob(".*tmp*"))


def test_ctrl_c_on_a_terminal_stops_the_prediction_with_its_message_alone(checkpoint, data_root, tmp_path):
    """Ctrl-C on a terminal signals the whole process group, the command's local task controllers too: each printed
    its KeyboardInterrupt traceback over the command's message. Their stderr goes to the logs' controllers.err; no
    task outlives the command; a rerun completes the slides."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(checkpoint), "--out", str(out),
               str(data_root / "lowres" / "CLL"), "predict.slides_per_task=20", "cluster.parallelism=2",
               "cluster.poll_s=0.05"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list((out / "slides").glob("*.json"))) < 3:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it
    printed, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "lymphoma predict: stopped (Ctrl-C); its local tasks were stopped too" in err and "Traceback" not in err, err
    assert "KeyboardInterrupt" in (out / "logs" / "controllers.err").read_text()
    time.sleep(2)
    assert subprocess.run(["pgrep", "-f", f"submitit.local._local {out}"], capture_output=True).stdout == b""
    assert predict(checkpoint, out, str(data_root / "lowres" / "CLL")) == 0


def test_an_output_folder_of_other_files_or_paths_of_the_wrong_kind_are_refused(checkpoint, cohort, tmp_path,
                                                                               capsys):
    """Someone else's folder as --out (its files kept), a file as --out, a folder as --checkpoint or --list: each
    an error naming the path and what it should be. A folder another prediction is writing: refused at once."""
    image = str(next(cohort.rglob("*.png")))
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert predict(checkpoint, other, image) == 2
    assert "exists and holds other files" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    assert predict(checkpoint, other / "notes.txt", image) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert predict(checkpoint.parent, tmp_path / "d", image) == 2
    assert f"checkpoint {checkpoint.parent} is a folder; give the path of a best.pt" in capsys.readouterr().err
    assert predict(checkpoint, tmp_path / "d", "--list", str(cohort)) == 2
    assert f"--list {cohort} is a folder; give a TSV file" in capsys.readouterr().err
    from jobs.run_folder import folder_lock

    assert predict(checkpoint, tmp_path / "busy", image) == 0
    with folder_lock(tmp_path / "busy", "predict"):  # as a prediction into it, still running, holds it
        assert predict(checkpoint, tmp_path / "busy", image) == 2
    assert f"another `lymphoma predict` (pid {os.getpid()}) is using {tmp_path / 'busy'}; wait for it to end or " \
           "give another --out" in capsys.readouterr().err


def test_a_folder_keeps_its_prediction_until_a_rerun_resumes_or_extends_it(checkpoint, cohort, tmp_path, capsys):
    """A second prediction into one folder (the default `runs/<name>/predict` of every checkpoint, or one --out)
    would replace its summary by another cohort's, or its slides' outputs by another model's: refused, naming what
    it holds, before anything there is written; naming the earlier slides too adds to it, resuming them."""
    fl, mcl = sorted(cohort.glob("FL/*.png")), sorted(cohort.glob("MCL/*.png"))
    out = tmp_path / "out"
    assert predict(checkpoint, out, *map(str, fl)) == 0
    capsys.readouterr()

    def written() -> dict[Path, bytes]:  # all but its logs and lock
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts and p.name[0] != "."}

    kept = written()
    assert json.loads((out / "slides" / f"{fl[0].stem}.json").read_text())["checkpoint"] == str(checkpoint)

    assert predict(checkpoint, out, *map(str, mcl)) == 2  # another cohort
    err = capsys.readouterr().err
    assert f"{out} holds the predictions of {len(fl)} slide(s) this request does not name ({fl[0]}" in err
    assert f"name them too (to add slides to it), or give another --out, or --restart (which keeps {out} as out.before-" \
        in err and written() == kept
    assert predict(checkpoint, out, *map(str, fl), "predict.tta=true") == 2  # other settings, named
    err = capsys.readouterr().err
    assert (f"{out} holds the predictions of {len(fl)} of these slides made by another model or other settings "
            "(they differ in: predict.tta (False there, True now)); ") in err and "give another --out" in err
    assert written() == kept
    other = tmp_path / "other.pt"
    shutil.copyfile(checkpoint, other)
    assert predict(other, out, *map(str, fl)) == 2  # another model
    assert f"(they differ in: the checkpoint (there {checkpoint}, now {other})); " in capsys.readouterr().err
    record = json.loads((out / "slides" / f"{fl[0].stem}.json").read_text())
    (out / "slides" / f"{fl[0].stem}.json").write_text(json.dumps({k: v for k, v in record.items() if k != "identity"}))
    assert predict(other, out, *map(str, fl)) == 2  # a record of an earlier version names no settings
    assert f"made by another model or other settings (checkpoint {checkpoint}: another file, " in capsys.readouterr().err
    (out / "slides" / f"{fl[0].stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    assert written() == kept

    assert predict(checkpoint, out, *map(str, fl + mcl)) == 0  # extended: the earlier slides resumed
    assert (f"{len(fl + mcl)} of {len(fl + mcl)} slide(s) predicted ({len(mcl)} now, {len(fl)} already complete)"
            in capsys.readouterr().out)
    with (out / "summary.csv").open() as handle:
        assert sorted(r["path"] for r in csv.DictReader(handle)) == sorted(map(str, fl + mcl))

    from lymphoma.precision import cpu_has_bf16
    half = tmp_path / "bf16"
    assert predict(checkpoint, half, *map(str, fl), "predict.precision=bf16") == 0
    capsys.readouterr()
    assert predict(checkpoint, half, *map(str, fl), "predict.precision=bf16") == 0  # the same request resumes
    assert f"(0 now, {len(fl)} already complete)" in capsys.readouterr().out  # where bf16 ran as fp32 too
    ran = {json.loads(p.read_text())["precision"] for p in (half / "slides").glob("*.json")}
    assert ran == {"bf16" if cpu_has_bf16() else "fp32"}


def test_restart_keeps_the_earlier_folder_beside_and_never_sets_aside_a_folder_of_other_files(checkpoint, cohort,
                                                                                               tmp_path, capsys):
    """`--restart`: another model or cohort into the folder of an earlier prediction, which is renamed
    `<name>.before-<date-time>` whole; a folder of someone else's files is refused, not renamed."""
    fl, mcl = sorted(cohort.glob("FL/*.png")), sorted(cohort.glob("MCL/*.png"))
    out = tmp_path / "out"
    assert predict(checkpoint, out, *map(str, fl)) == 0
    kept = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    assert predict(checkpoint, foreign, *map(str, fl), "--restart") == 2
    assert f"output folder {foreign} exists and holds other files" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("foreign")] == ["foreign"]
    assert predict(checkpoint, out, *map(str, mcl), "--restart") == 0
    assert f"restarting: the earlier output of `lymphoma predict` is kept in {out}.before-" in capsys.readouterr().out
    (aside,) = tmp_path.glob("out.before-*")
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file() and "logs" not in p.parts
            and not p.name.startswith(".predict.lock")} == {k: v for k, v in kept.items() if k.name != ".predict.lock"}
    assert sorted(p.stem for p in (out / "slides").glob("*.json")) == sorted(p.stem for p in mcl)


def test_a_slide_file_replaced_since_it_was_predicted_is_predicted_again_and_said(checkpoint, cohort, tmp_path,
                                                                                  capsys):
    """A slide rescanned or re-exported under its name (another size or modification time) is predicted again from
    the file as it is now, and the report says which; the others resume. A record of an earlier version, which kept
    no size and time, resumes as it did."""
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "FL", slides)
    names = sorted(slides.glob("*.png"))
    out = tmp_path / "out"
    assert predict(checkpoint, out, str(slides)) == 0
    capsys.readouterr()
    replacement = sorted(cohort.glob("MCL/*.png"))[0]
    shutil.copyfile(replacement, names[0])
    assert predict(checkpoint, out, str(slides)) == 0
    printed = capsys.readouterr()
    assert f"{len(names)} of {len(names)} slide(s) predicted (1 now, {len(names) - 1} already complete)" in printed.out
    note = (f"1 slide file(s) changed since this folder predicted them (size or modification time): predicted again "
            f"from the file as it is now: {names[0]}")
    assert note in printed.err and note in json.loads((out / "metrics.json").read_text())["warnings"]
    assert predict(checkpoint, tmp_path / "fresh", str(replacement)) == 0
    capsys.readouterr()
    fresh = json.loads((tmp_path / "fresh" / "slides" / f"{replacement.stem}.json").read_text())
    again = json.loads((out / "slides" / f"{names[0].stem}.json").read_text())
    assert again["n_tiles"] == fresh["n_tiles"] and again["votes"] == fresh["votes"]
    for path in out.glob("slides/*.json"):  # as an earlier version wrote them
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "slide_file"}))
    os.utime(names[1], ns=(1, 1))
    assert predict(checkpoint, out, str(slides)) == 0
    assert f"(0 now, {len(names)} already complete)" in capsys.readouterr().out


def test_a_slide_whose_reading_hangs_fails_alone_and_the_slides_after_it_go_on(checkpoint, cohort, stalling_mount,
                                                                               tmp_path):
    """A slide on a filesystem that stopped answering (a real FUSE mount whose daemon is stopped, as a network
    filesystem's) hung its task, and with it the slides after it, until the time limit, or for ever on this machine:
    after predict.read_timeout_min without a tile it fails alone, saying so, and a new reader reads the next slides.
    Its record keeps no file stamp (a stat could hang as well)."""
    images = sorted(cohort.glob("*/*.png"))
    shutil.copyfile(images[0], stalling_mount.source / "stalled.png")
    stalled = stalling_mount.path / "stalled.png"
    assert stalled.stat().st_size > 0  # cached by the kernel: naming it needs no answer from the filesystem
    listing = tmp_path / "cohort.tsv"
    order = [images[1], images[2], stalled, *images[3:6]]  # one reader: the slides after it wait for it
    listing.write_text("".join(f"{path}\tFL\tc{i}\n" for i, path in enumerate(order)))
    stalling_mount.stall()
    command = [sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(checkpoint), "--list", str(listing),
               "--out", str(tmp_path / "out"), "predict.read_timeout_min=0.05", "predict.readers=1",
               "predict.slides_per_task=64", "cluster.poll_s=0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "slides").glob("*.json")}
    assert sorted(records) == sorted(path.stem for path in order)
    assert records["stalled"]["status"] == "failed" and records["stalled"]["slide_file"] is None
    assert "nothing read for 0.05 min (predict.read_timeout_min): its reading hangs" in records["stalled"]["error"]
    assert all(r["status"] == "ok" for key, r in records.items() if key != "stalled"), records
    assert "1 of 6 slide(s) failed" in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize("in_place", [False, True], ids=["renamed-over", "written-over-in-place"])
def test_a_checkpoint_replaced_while_its_prediction_runs_never_mixes_two_models(checkpoint, cohort, tmp_path,
                                                                                 in_place):
    """Tasks wait in a queue; a checkpoint written anew meanwhile (a training's best.pt, `cp` over a model) gave the
    tasks that started later the new model, and one report mixed two models under one name. The job reads the file
    through a name of its own (a hard link under engine/, here on the same filesystem; gone once its tasks have
    ended): a new file renamed over the checkpoint, as trainings write it, leaves every slide to the first model;
    one written over it in place (`cp`), which a link follows, fails the tasks that start after it, saying so."""
    model, other = tmp_path / "model.pt", tmp_path / "other.pt"
    shutil.copyfile(checkpoint, model)
    state = load_checkpoint(checkpoint)
    weights, classes = dict(state["model"]), len(state["classes"])
    head = [k for k, v in weights.items() if k.endswith("bias") and tuple(v.shape) == (classes,)][-1]
    weights[head] = torch.arange(classes, dtype=weights[head].dtype) * 100.0  # every tile: the last class
    save_checkpoint({**state, "model": weights}, other)
    out, first = tmp_path / "out", 6
    command = [sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(model), "--out", str(out), str(cohort),
               f"predict.slides_per_task={first}", "cluster.parallelism=1", "cluster.poll_s=0.05"]
    code, printed = replaced_while_the_first_task_runs(command, out / "slides", model, other, first, in_place)
    records = [json.loads(p.read_text()) for p in sorted((out / "slides").glob("*.json"))]
    ok = [r for r in records if r["status"] == "ok"]
    assert len({r["fingerprint"] for r in ok}) == 1 and ok[0]["identity"]["checkpoint"] == str(model)
    assert predict(checkpoint, tmp_path / "direct", str(cohort)) == 0
    direct = {p.stem: json.loads(p.read_text())["votes"] for p in (tmp_path / "direct" / "slides").glob("*.json")}
    assert all(r["votes"] == direct[r["key"]] for r in ok)
    assert not list((out / "engine").glob("pinned-*"))
    if in_place:
        assert code == 1 and f"{model} was written over in place while this job ran" in printed, printed
        assert len(ok) == len(records) == first  # the later task's slides: failed rows of the report, none written
    else:
        assert code == 0 and len(ok) == 12, printed
    with pytest.raises(InputError, match=r"model\.pt changed while this command read it"):
        PinnedFile.pin(model, tmp_path / "pins", [1, 2])


def test_a_cohort_moved_elsewhere_resumes_and_one_copied_without_its_times_is_not_taken_for_it(checkpoint, cohort,
                                                                                                 tmp_path, capsys):
    """Slides moved (a cohort copied to scratch with `rsync -a`, mounted elsewhere: the same name, size and
    modification time at another path) keep their predictions, under the new path, said; copies with new times are
    other files, and the folder's predictions of the old paths are not silently left out of its summary."""
    slides = tmp_path / "a" / "FL"
    shutil.copytree(cohort / "FL", slides)  # copy2: times kept
    out = tmp_path / "out"
    assert predict(checkpoint, out, str(slides)) == 0
    capsys.readouterr()
    (tmp_path / "a").rename(tmp_path / "b")
    moved = tmp_path / "b" / "FL"
    assert predict(checkpoint, out, str(moved)) == 0
    printed = capsys.readouterr()
    assert "4 of 4 slide(s) predicted (0 now, 4 already complete)" in printed.out
    note = "4 slide file(s) found at another path than this folder's predictions of them name, with the same name, size"
    assert note in printed.err and note in json.loads((out / "metrics.json").read_text())["warnings"][0]
    with (out / "summary.csv").open() as handle:
        assert sorted(Path(r["path"]).parent for r in csv.DictReader(handle)) == [moved] * 4
    shutil.copytree(moved, tmp_path / "c" / "FL", copy_function=shutil.copyfile)  # new modification times
    assert predict(checkpoint, out, str(tmp_path / "c" / "FL")) == 2
    assert "holds the predictions of 4 slide(s) this request does not name" in capsys.readouterr().err


def test_an_output_folder_inside_the_cohort_is_no_input_to_its_own_rerun(checkpoint, cohort, tmp_path, capsys):
    """`--out cohort/preds` with `'cohort/**/*.png'`: the rerun's wildcard would match the first run's heat maps
    (`preds/slides/<name>.png`, PNGs named as the slides): they are no inputs, and the rerun resumes; nor are those
    of an earlier prediction beside it (`--restart` keeps the folder as `preds.before-<date-time>`, in the cohort)."""
    shutil.copytree(cohort / "FL", tmp_path / "cohort" / "FL")
    out = tmp_path / "cohort" / "preds"
    for _ in range(2):
        assert predict(checkpoint, out, f"{tmp_path}/cohort/**/*.png") == 0
    assert "4 of 4 slide(s) predicted (0 now, 4 already complete)" in capsys.readouterr().out
    assert len(list((out / "slides").glob("*.png"))) == 4
    assert predict(checkpoint, out, f"{tmp_path}/cohort/**/*.png", "--restart") == 0
    assert "4 of 4 slide(s) predicted (4 now, 0 already complete)" in capsys.readouterr().out
    assert len(list(tmp_path.glob("cohort/preds.before-*/slides/*.png"))) == 4
    assert predict(checkpoint, tmp_path / "cohort" / "again", f"{tmp_path}/cohort/**/*.png") == 0
    assert "4 of 4 slide(s) predicted (4 now, 0 already complete)" in capsys.readouterr().out


def test_bad_prediction_input(checkpoint, cohort, tmp_path, capsys):
    assert predict(checkpoint, tmp_path / "a", f"{tmp_path}/nothing/**/*.tif") == 2
    assert "matches no image file" in capsys.readouterr().err
    odd = tmp_path / "odd.tsv"
    odd.write_text("a.png\tCLL\tcase\textra\n")
    assert predict(checkpoint, tmp_path / "b", "--list", str(odd)) == 2
    assert "odd.tsv, line 1: expected tab-separated path[, label[, case]]" in capsys.readouterr().err
    escape = tmp_path / "escape.tsv"
    escape.write_text(f"path\tlabel\n{next(cohort.rglob('*.png')).relative_to(cohort)}\tCLL\n../../etc/passwd\tCLL\n")
    assert predict(checkpoint, tmp_path / "b", "--list", str(escape), "--basepath", str(cohort)) == 2
    assert f"escape.tsv, line 3: '../../etc/passwd' leads outside --basepath {cohort}" in capsys.readouterr().err
    assert predict(checkpoint, tmp_path / "b", "--basepath", str(cohort), "*/*.png") == 2  # patterns under it?
    assert f"--basepath {cohort} is where a --list's relative paths lie, and no --list is given" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert predict(checkpoint, tmp_path / "c", str(next(cohort.rglob("*.png"))), "tiles.size=128") == 2
    assert "tiles.size=128 but the model was trained with 64" in capsys.readouterr().err
    assert predict(checkpoint, tmp_path / "c", str(next(cohort.rglob("*.png"))), "tiles.size=128", "--force") == 0
    capsys.readouterr()

    bad = tmp_path / "bad"
    bad.mkdir()
    good = next(cohort.rglob("*.png"))
    (bad / "corrupt_001.png").write_bytes(b"\x89PNG not really")
    Image.open(good).crop((0, 0, 40, 40)).save(bad / "tiny_001.png")
    listing = tmp_path / "mixed.tsv"
    Image.new("RGB", (2000, 2000), (255, 255, 255)).save(bad / "blank_001.tif")  # a blank slide-sized scan
    Image.new("RGB", (400, 300), (0, 0, 0)).save(bad / "black_001.png")  # a failed scan: given a class before
    listing.write_text(f"{good}\n{bad / 'corrupt_001.png'}\n{bad / 'tiny_001.png'}\n{bad / 'missing_001.png'}\n"
                       f"{bad / 'blank_001.tif'}\n{bad / 'black_001.png'}\n")
    assert predict(checkpoint, tmp_path / "d", "--list", str(listing)) == 1  # any failed input: exit 1
    captured = capsys.readouterr()
    out = captured.out
    assert "1 of 6 slide(s) predicted" in out and "5 failed" in out
    assert captured.err.strip().splitlines()[-1].startswith("lymphoma predict: 5 of 6 slide(s) failed")
    with (tmp_path / "d" / "summary.csv").open() as handle:
        errors = {r["slide"]: r["error"] for r in csv.DictReader(handle)}
    assert errors[good.stem] == ""
    assert "not a readable image" in errors["corrupt_001"]
    assert "smaller than a 64-pixel tile" in errors["tiny_001"]
    assert "file not found" in errors["missing_001"]
    assert errors["blank_001"].startswith("has no tissue: every pixel is background")  # as tiling skips it
    assert errors["black_001"].startswith("has no tissue: it is one flat colour (RGB 0, 0, 0; ")
    blank = json.loads((tmp_path / "d" / "slides" / "blank_001.json").read_text())
    assert blank["status"] == "failed" and "class" not in blank and "votes" not in blank


def test_slides_of_one_name_in_per_patient_folders_are_told_apart_by_their_folders(checkpoint, cohort, tmp_path,
                                                                                   capsys):
    """Hospital exports keep one folder per patient of files named alike (p1/HE.png, p2/HE.png): each is predicted
    under the folders that tell it apart, as its own case; laid out as training's <class>/<case>/ folders, each
    takes its class as truth and its folder as case; two files of one name in one folder are refused."""
    first, second = sorted(cohort.rglob("*.png"))[:2]
    for patient, image in (("p1", first), ("p2", second)):
        (tmp_path / "export" / patient).mkdir(parents=True)
        shutil.copyfile(image, tmp_path / "export" / patient / "HE.png")
    assert predict(checkpoint, tmp_path / "both", f"{tmp_path / 'export'}/**/*.png") == 0
    assert "2 of 2 slide(s) predicted" in capsys.readouterr().out
    with (tmp_path / "both" / "summary.csv").open() as handle:
        rows = {r["slide"]: r for r in csv.DictReader(handle)}
    assert sorted(rows) == ["p1__HE", "p2__HE"] and rows["p1__HE"]["case"] != rows["p2__HE"]["case"]
    assert rows["p2__HE"]["path"] == str(tmp_path / "export" / "p2" / "HE.png")
    assert sorted(p.name for p in (tmp_path / "both" / "slides").glob("*.json")) == ["p1__HE.json", "p2__HE.json"]
    for patient, image in (("p1", first), ("p2", second)):  # each row is its own image's, as predicted alone
        assert predict(checkpoint, tmp_path / patient, str(image)) == 0
        with (tmp_path / patient / "summary.csv").open() as handle:
            alone = next(csv.DictReader(handle))
        assert [rows[f"{patient}__HE"][k] for k in ("votes_CLL", "votes_FL", "votes_MCL", "confidence")] == \
            [alone[k] for k in ("votes_CLL", "votes_FL", "votes_MCL", "confidence")]
    for label, patient, image in (("CLL", "p1", first), ("MCL", "p2", second)):  # training's <class>/<case>/ too
        (tmp_path / "classes" / label / patient).mkdir(parents=True)
        shutil.copyfile(image, tmp_path / "classes" / label / patient / "HE.png")
    assert predict(checkpoint, tmp_path / "truth", str(tmp_path / "classes")) == 0
    with (tmp_path / "truth" / "summary.csv").open() as handle:
        told = {r["slide"]: (r["truth"], r["case"]) for r in csv.DictReader(handle)}
    assert told == {"p1__HE": ("CLL", "p1"), "p2__HE": ("MCL", "p2")}
    Image.open(first).save(tmp_path / "export" / "p1" / "HE.tif")
    assert predict(checkpoint, tmp_path / "same", f"{tmp_path / 'export'}/p1/*") == 2
    assert f"two inputs named p1__HE: {tmp_path / 'export' / 'p1' / 'HE.png'} and " in capsys.readouterr().err


def test_unknown_labels_are_named_by_line_and_a_prediction_where_all_failed_says_so(checkpoint, cohort, tmp_path,
                                                                                    capsys):
    labels, (one, two) = tmp_path / "labels.tsv", sorted(cohort.rglob("*.png"))[:2]
    labels.write_text(f"path\tlabel\n{one}\tDLBCL\n{two}\tcll\n")  # another class; a class in lower case
    assert predict(checkpoint, tmp_path / "b", "--list", str(labels)) == 2
    assert (f"--list {labels}: 2 label(s) not among the model's classes ['CLL', 'FL', 'MCL']: line 2: 'DLBCL'; "
            "line 3: 'cll' ('CLL'?); correct them, or leave the label column empty") in capsys.readouterr().err
    assert predict(checkpoint, tmp_path / "b", "--list", str(labels), "--basepath", str(tmp_path / "nowhere")) == 2
    assert f"--basepath {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty_001.png"
    empty.write_bytes(b"")
    assert predict(checkpoint, tmp_path / "e", str(empty)) == 1
    assert capsys.readouterr().err.strip().endswith("1 of 1 slide(s) failed (listed above and in "
                                                    f"{tmp_path / 'e' / 'summary.csv'}); none was predicted")


def test_an_inconsistent_checkpoint_names_what_is_wrong(checkpoint, cohort, tmp_path, capsys):
    """Architecture lacking keys, class names that disagree with the head, unknown tile settings: rc 2, named."""
    import torch

    state = load_checkpoint(checkpoint)
    edits = {
        "no-growth": (dict(state, architecture={k: v for k, v in state["architecture"].items() if k != "growth_rate"}),
                      "'architecture' lacks ['growth_rate']"),
        "two-names": (dict(state, classes=["CLL", "FL"]),
                      "'classes' names 2 classes ['CLL', 'FL'] but the model's head has 3"),
        "twin-names": (dict(state, classes=["CLL", "CLL", "MCL"]), "'classes' must be distinct class names"),
        "odd-tiles": (dict(state, tiles={**state["tiles"], "zoom": 2}),
                      "'tiles' holds settings this version does not know: ['zoom']"),
    }
    image = str(next(cohort.rglob("*.png")))
    for name, (edited, message) in edits.items():
        torch.save(edited, tmp_path / f"{name}.pt")
        assert predict(tmp_path / f"{name}.pt", tmp_path / name, image) == 2
        err = capsys.readouterr().err
        assert f"{name}.pt is inconsistent: {message}" in err and "Traceback" not in err, err


def test_a_whole_slide_and_a_pixel_model_get_advice_that_works(checkpoint, data_root, tmp_path, capsys):
    """A model trained on pixel tiles meets an .svs: the failed row says what will work, the override without
    --force says what --force means, and --force tiles.target_mpp=... does tile the slide at that resolution."""
    slide = data_root.parent / "wsi" / "CMU-1-Small-Region.svs"  # 2220 x 2967 px at 0.499 microns per pixel
    assert predict(checkpoint, tmp_path / "a", str(slide)) == 1
    out = capsys.readouterr().out
    assert "Predicting: use a model trained with tiles.target_mpp, or pass --force tiles.target_mpp=" in out
    assert predict(checkpoint, tmp_path / "b", str(slide), "tiles.target_mpp=2.0") == 2
    err = capsys.readouterr().err
    assert "tiles.target_mpp=2.0 but the model was trained with None (on pixel tiles of images whose resolution" in err
    assert "pass --force to tile with yours" in err
    assert predict(checkpoint, tmp_path / "c", str(slide), "tiles.target_mpp=2.0", "--force") == 0
    # read at the resolution given, the slide is at no pixel scale: no word of the training images' size
    assert "the scale of the model's training images" not in capsys.readouterr().err
    assert json.loads((tmp_path / "c" / "metrics.json").read_text()).get("warnings", []) == []
    record = json.loads((tmp_path / "c" / "slides" / "CMU-1-Small-Region.json").read_text())
    outputs = np.load(tmp_path / "c" / "slides" / "CMU-1-Small-Region.npz")
    assert record["n_tiles"] == len(outputs["coords"]) > 0
    step = 64 * 2.0 / 0.499  # 64-px tiles at 2 microns per pixel: about 256 level-0 pixels apart
    assert np.all(np.abs(np.diff(np.unique(outputs["coords"][:, 0])) - step) < 2)
    check_qupath_exports(tmp_path / "c" / "slides", "CMU-1-Small-Region", (2220, 2967), step)


def test_images_at_another_scale_are_matched_to_the_training_scale_or_named_with_the_resize_that_matches(
        checkpoint, data_root, manifest_rows, tmp_path, capsys):
    """The model trained on the 417x312 copies records that size. The same fields of view at full size (1388x1040,
    the training images' width:height) are resized to the training scale before they are cut (predict.scale=match,
    the default), into the grid of the copies, with a note that names them; a square crop of one, off the scale but
    of another aspect, is predicted as it is, with a warning naming the tiles.resize that would match it. With
    predict.scale=keep the full-size images are taken as they are and warned of; with that resize, nothing is said."""
    assert load_checkpoint(checkpoint)["image_size"] == [312, 417]
    full = [r for r in manifest_rows if r["fullres_jpeg_path"]][:2]
    paths = [str(data_root / r["fullres_jpeg_path"]) for r in full] + [str(data_root / manifest_rows[0]["lowres_path"])]
    crop = tmp_path / "square-crop.png"
    write_png(crop, read_rgb(paths[0])[:, :1040])
    assert predict(checkpoint, tmp_path / "a", *paths, str(crop)) == 0
    err = capsys.readouterr().err
    assert "2 of 4 image(s) were resized to the scale of the model's training images before tiling" in err
    assert "1388x1040 pixels, resized by 0.3, against the training images' median 417x312" in err
    assert "1 of 4 image(s) are at 2.9x the scale of the model's training images" in err
    assert "square-crop.png: 1040x1040 pixels" in err and "--force tiles.resize=0.347" in err
    warnings = json.loads((tmp_path / "a" / "metrics.json").read_text())["warnings"]  # kept with the prediction
    assert len(warnings) == 2 and "were resized to the scale" in warnings[0] and "2.9x the scale" in warnings[1]
    page = write_run_report(tmp_path, tmp_path / "a").read_text()
    assert "<p class=warn>Warning: 2 of 4 image(s) were resized" in page
    slides = tmp_path / "a" / "slides"
    lowres = json.loads((slides / f"{Path(paths[2]).stem}.json").read_text())
    assert lowres["image_size"] == [312, 417] and "matched_resize" not in lowres
    matched = json.loads((slides / f"{Path(paths[0]).stem}.json").read_text())
    assert matched["image_size"] == [1040, 1388] and matched["matched_resize"] == pytest.approx(417 / 1388, rel=2e-3)
    assert matched["n_tiles"] == lowres["n_tiles"]  # cut as the 417x312 copies are
    same_grid = np.load(slides / f"{Path(paths[0]).stem}.npz")["coords"]
    assert np.array_equal(same_grid, np.load(slides / f"{Path(paths[2]).stem}.npz")["coords"])
    square = json.loads((slides / f"{Path(paths[0]).stem}.geojson").read_text())["features"][0]["geometry"]
    (x0, y0), (x1, _) = square["coordinates"][0][:2]
    settings = TileSettings(**load_checkpoint(checkpoint)["tiles"])
    assert x1 - x0 == pytest.approx(settings.size / matched["matched_resize"])  # QuPath's squares: the file's pixels
    cropped = json.loads((slides / "square-crop.json").read_text())
    assert "matched_resize" not in cropped and cropped["n_tiles"] == np.prod(grid_shape(1040, 1040, settings))
    assert predict(checkpoint, tmp_path / "b", *paths, "predict.scale=keep") == 0
    err = capsys.readouterr().err
    assert "3 of 3 image(s) are at" not in err and "2 of 3 image(s) are at 3.3x the scale" in err
    assert "predict again with --force tiles.resize=0.3" in err and "were resized" not in err
    record = json.loads((tmp_path / "b" / "slides" / f"{Path(paths[0]).stem}.json").read_text())
    assert record["n_tiles"] == np.prod(grid_shape(1040, 1388, settings)) and "matched_resize" not in record
    assert predict(checkpoint, tmp_path / "c", *paths[:2], "tiles.resize=0.3", "--force") == 0
    assert "scale of the model's training images" not in capsys.readouterr().err
    assert "warnings" not in json.loads((tmp_path / "c" / "metrics.json").read_text())
    record = json.loads((tmp_path / "c" / "slides" / f"{Path(paths[0]).stem}.json").read_text())
    assert record["n_tiles"] == lowres["n_tiles"] and "matched_resize" not in record
    with pytest.raises(InputError, match="predict.scale is 'auto'; allowed: match, keep"):
        PredictSettings(scale="auto")


def test_the_whole_pipeline_on_a_small_real_subset(make_dataset, tmp_path, capsys):
    source = make_dataset(2, 2)
    for image in list(source.glob("*/*.png")):  # names as people write them: the page's links must keep '#' and '%'
        image.rename(image.with_name(image.name.replace("_", " #%41_", 1)))
    code = main(["run", "--no-progress", f"data.source={source}", f"run.root={tmp_path}", "run.name=e2e", *FAST,
                 "split.val_fraction=0.5", "train.epochs=2", "train.max_steps_per_epoch=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = tmp_path / "e2e"
    for path in ("config.yaml", "split.csv", "tiles/manifest.json", "train/config.yaml", "train/history.json",
                 "train/checkpoints/best.pt", "train/checkpoints/last.pt", "predict/summary.csv",
                 "predict/metrics.json", "predict/confusion_image.png", "predict/confusion_case.png"):
        assert (run / path).stat().st_size > 0, path
    assert list((run / "train" / "tensorboard").glob("events.out.tfevents.*"))
    with (run / "split.csv").open() as handle:
        val = [r for r in csv.DictReader(handle) if r["phase"] == "val"]
    metrics = json.loads((run / "predict" / "metrics.json").read_text())
    assert metrics["predicted"] == len(val) == metrics["image"]["n"] and metrics["case"]["n"] == 3
    for row in val:
        stem = Path(row["path"]).stem
        assert json.loads((run / "predict" / "slides" / f"{stem}.json").read_text())["label"] == row["label"]
        assert np.load(run / "predict" / "slides" / f"{stem}.npz")["probs"].shape[1] == 3
    assert "== done in" in out and str(run) in out
    common, best = [f"data.source={source}", f"run.root={tmp_path}", "run.name=e2e"], run / "train/checkpoints/best.pt"
    assert main(["validate", "--checkpoint", str(best)]) == 0  # the page shows the other commands' outputs too
    assert main(["features", "--no-progress", "--checkpoint", str(best), *common]) == 0
    assert main(["mil", "--no-progress", *common, "cv.folds=2", "mil.epochs=2", "cv.bootstrap=100"]) == 0
    assert main(["report", str(run)]) == 0
    check_report_in_a_browser(run, val, tmp_path / "report.png")
    again = ["run", "--no-progress", f"data.source={source}", f"run.root={tmp_path}", "run.name=e2e", *FAST,
             "split.val_fraction=0.5", "train.epochs=2", "train.max_steps_per_epoch=3", "tiles.stride=32"]
    assert main(again) == 2  # other tiles: the model is not resumed on them, and says how to train afresh
    assert "(`lymphoma run --restart`, `lymphoma cv --restart` alike; the old train/ folder" in capsys.readouterr().err
    assert main([*again, "--restart"]) == 0 and len(list(run.glob("train.before-*/checkpoints/last.pt"))) == 1
    assert json.loads((run / "predict" / "metrics.json").read_text())["predicted"] == len(val)


def test_a_full_disk_is_one_error_naming_the_out_folder_and_a_rerun_with_room_finishes(checkpoint, cohort,
                                                                                      small_disk, capsys):
    """Predicting 12 images onto 200 KiB beside the job's copy of the checkpoint (their outputs take about 240):
    exit 1 and one message naming the --out folder and --out as the way elsewhere, never a traceback or the
    logging module's reports of its own failed writes (the log file is given up with one warning); with room, a
    rerun keeps the finished slides and predicts the rest. The copy is gone once the tasks have ended."""
    room = -(-checkpoint.stat().st_size // 4096) * 4 + 200  # KiB: the copy's pages (the disk is another filesystem)
    subprocess.run(["mount", "-o", f"remount,size={room}k", str(small_disk)], check=True)
    out = small_disk / "predictions"
    assert predict(checkpoint, out, str(cohort)) == 1
    err = capsys.readouterr().err
    assert f"no space left in {out} (" in err and "give --out a folder on a disk with room" in err, err
    assert "Traceback" not in err and "Logging error" not in err and err.count("cannot be written") <= 1, err
    finished = {p.stem for p in (out / "slides").glob("*.json")}
    assert not list((out / "engine").glob("pinned-*"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert predict(checkpoint, out, str(cohort)) == 0
    assert f"12 of 12 slide(s) predicted ({12 - len(finished)} now, {len(finished)} already complete), 0 failed" \
        in capsys.readouterr().out


def test_the_progress_of_a_prediction_counts_records_written_since_it_started(tmp_path):
    """The bar of `lymphoma predict` reads the slides' records as tasks write them: one already there (another
    checkpoint's, to be redone) counts only once rewritten, a slide never written not at all, and the slides
    resumed from the start."""
    import io

    from jobs.progress import SlideProgress

    (tmp_path / "stale.json").write_text("{}")
    os.utime(tmp_path / "stale.json", ns=(1, 1))
    stream = io.StringIO()
    bar = SlideProgress(tmp_path, ["stale", "new", "never"], 2, "predict", stream=stream)
    assert bar.bar.total == 5 and bar.written() == 0
    (tmp_path / "new.json").write_text("{}")
    (tmp_path / "other.json").write_text("{}")  # not a slide of this prediction
    assert bar.written() == 1
    (tmp_path / "stale.json").write_text('{"done": 1}')
    assert bar.written() == 2
    bar.close()
    assert bar.bar.n == 4 and "4/5" in stream.getvalue().splitlines()[-1]
    silent = SlideProgress(tmp_path, ["new"], 0, "predict", enabled=False, stream=io.StringIO())
    silent.close()
    assert silent.bar.disable


def test_accuracy_on_cases_the_model_learnt_from_is_called_no_held_out_figure(checkpoint, tiled, tmp_path, capsys):
    """Predicting, with their classes, a case the model trained on and one it never saw: the first is named in a
    warning (printed and kept in metrics.json) as no held-out figure; the case it never saw is not."""
    with (tiled[1] / "base" / "split.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    trained, unseen = (next(r for r in rows if r["phase"] == phase) for phase in ("train", "val"))
    listing = tmp_path / "cohort.tsv"
    listing.write_text("".join(f"{r['path']}\t{r['label']}\t{r['case']}\n" for r in (trained, unseen)))
    assert predict(checkpoint, tmp_path / "out", "--list", str(listing)) == 0
    note = (f"1 of the 2 case(s) predicted with a known class were learnt from in training (or chose the model's "
            f"epoch): {trained['case']}; accuracy on them is not a held-out figure")
    assert note in capsys.readouterr().err
    assert [w for w in json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"] if note in w]


def test_a_report_over_damaged_files_names_them_and_shows_the_rest(checkpoint, cohort, tmp_path, capsys):
    """A heat map cut short is named in its slide's row (never embedded as a broken picture) and a history.json or
    metrics.json cut short in place of its section, each with a warning: `lymphoma report` (and the end of `run`
    and `cv`, which write the page after all their work) never fails on one damaged file."""
    run = tmp_path / "damaged"
    assert predict(checkpoint, run / "predict", str(cohort)) == 0
    pictures = sorted((run / "predict" / "slides").glob("*.png"))
    pictures[0].write_bytes(pictures[0].read_bytes()[:100])
    (run / "train").mkdir()
    (run / "train" / "history.json").write_text('[{"epoch": 0, "train_loss": 1.09')
    capsys.readouterr()
    assert main(["report", str(run / "nowhere")]) == 2
    assert f"run folder {run / 'nowhere'} does not exist; give the path of a run folder" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0  # the run folder as a path, or by run.root and run.name below
    err, page = capsys.readouterr().err, (run / "report.html").read_text()
    assert f"{pictures[0]} is not a readable picture" in err and f"unreadable picture: {pictures[0].name}" in page
    assert f"{run / 'train' / 'history.json'} is not valid JSON" in err
    assert "<h2 id=training>Training</h2><p class=warn>Not shown: " in page
    image = json.loads((run / "predict" / "metrics.json").read_text())["image"]
    low, high = image["interval"]["accuracy"]  # figures with their case-bootstrap intervals
    assert f"<td>{image['accuracy']:.3f} [{low:.3f}, {high:.3f}]</td>" in page and "In brackets: 95% intervals" in page
    for other in pictures[1:]:  # every other slide keeps its heat map
        assert f'alt="tile classes of {other.stem}"' in page
    assert page.count("<img") == len(pictures) - 1 + 6  # and the confusion, ROC and reliability plots
    assert main(["report", str(run / "predict")]) == 0  # a prediction's own folder is its page's prediction
    alone = (run / "predict" / "report.html").read_text()
    assert "<h1>Prediction predict</h1>" in alone and f"<td>{image['accuracy']:.3f} [{low:.3f}, {high:.3f}]</td>" in alone
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "notes")]) == 2  # no run there: no page written into the folder
    assert f"{tmp_path / 'notes'} holds no run and no prediction (no config.yaml, " in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    assert main(["report", f"run.root={tmp_path}", "run.name=damaged", "--predict", str(tmp_path / "none")]) == 2
    assert f"--predict {tmp_path / 'none'}: no prediction there" in capsys.readouterr().err
    metrics = run / "predict" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    assert main(["report", f"run.root={tmp_path}", "run.name=damaged"]) == 0
    assert f"{metrics} is not valid JSON" in capsys.readouterr().err
    page = (run / "report.html").read_text()
    assert "<h2 id=prediction>Prediction</h2><p class=warn>Not shown: " in page and '<a href="#prediction">' in page
    assert main(["validate", "--checkpoint", str(checkpoint), "--out", str(run / "validate")]) == 0  # as versions
    assert main(["report", str(run)]) == 0  # before 64a52fc wrote a validation: shown too
    assert "<h2 id=validation>Validation</h2><h3>validate</h3><p>best.pt (epoch 1) on the val tiles: " in \
        (run / "report.html").read_text()


def check_report_in_a_browser(run: Path, val: list[dict[str, str]], screenshot: Path) -> None:
    """report.html in real headless Chromium: no error, every picture decoded, every section and slide shown, the
    links lead to files of the run."""
    from browser import chromium, render_page

    if chromium() is None:
        if os.environ.get("LYMPHOMA_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed (scripts/test.sh installs Debian's chromium)")
        pytest.skip("no Chromium here (scripts/test.sh installs it)")
    page = render_page(run / "report.html", screenshot)
    assert page.errors == []
    alts = [alt for alt, _ in page.images]
    assert page.images and all(decoded for _, decoded in page.images), page.images
    assert "training curves" in alts and "confusion matrix (image level)" in alts and "ROC curves, one-vs-rest (case level)" in alts
    assert "confusion matrix (tiles)" in alts and "first-layer kernels" in alts  # lymphoma validate's
    for row in val:  # every held-out slide has its row and its heat map
        assert Path(row["path"]).stem in page.text and f"tile classes of {Path(row['path']).stem}" in alts
    for heading in ("Config", "Split by case", "Tiles", "Training", "Prediction", "Validation", "best-val", "Features",
                    "Multiple-instance learning"):
        assert heading in page.text
    assert "12 of 12 slide(s) embedded" in page.text and "attention-MIL, one bag per slide (12 bags)" in page.text
    opened = [Path(urllib.parse.unquote(urllib.parse.urlparse(link).path)) for link in page.links]  # as the browser
    files = [path for path in opened if path != run / "report.html"]  # does; the page's own: its section links
    assert files and all(f.exists() for f in files), [f for f in files if not f.exists()]
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_a_task_that_dies_is_reported_with_its_log(checkpoint, cohort, tmp_path):
    """kill -9 of one array task (not of the caller): the other task's slides are kept, the dead task's
    slides are failed rows naming its log, the command fails, and a rerun completes them."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(checkpoint), f"{cohort}/**/*.png",
               "--out", str(out), "predict.slides_per_task=6", "predict.batch_size=4", "cluster.parallelism=2",
               "cluster.poll_s=0.05"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", f"submitit.core._submit {out}"], capture_output=True, text=True)
        pids = [int(p) for p in found.stdout.split()]
        victim = min(pids) if pids else None
        time.sleep(0.02)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout + stderr
    assert "task(s) of 'predict-default' failed" in stderr and "_log.err" in stderr
    assert "the task's process was killed before it wrote a result or an error (SIGKILL, from outside" in stderr
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    dead = [r for r in rows if r["status"] == "failed"]
    assert dead and all("died before writing it; log:" in r["error"] for r in dead)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"12 of 12 slide(s) predicted ({len(dead)} now, {12 - len(dead)} already complete)" in rerun.stdout


def test_tta_averages_the_eight_symmetries_and_mean_aggregation(checkpoint, cohort, tmp_path):
    from lymphoma.prediction import dihedral_views

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = list(dihedral_views(x))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all distinct, and all symmetries of x
    assert any(torch.equal(v, x.transpose(2, 3)) for v in views) and torch.equal(views[0], x)

    plain = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 32)
    tta = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 32, tta=True)
    assert plain.fingerprint != tta.fingerprint  # outputs of one never pass for the other's on resume
    tiles = np.stack([read_rgb(p)[:64, :64] for p in sorted(cohort.glob("*/*.png"))[:4]])
    with torch.inference_mode():
        x = eval_batch(plain.normalize_stain(tiles), plain.augment, torch.device("cpu"))
        expected = torch.stack([plain.model(v.contiguous(memory_format=torch.channels_last)).softmax(1)
                                for v in dihedral_views(x)]).mean(0)
    assert torch.allclose(tta.logits(tiles).exp(), expected, atol=1e-5)

    assert predict(checkpoint, tmp_path / "mean", f"{cohort}/**/*.png", "predict.aggregate=mean",
                   "predict.tta=true") == 0
    with (tmp_path / "mean" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["predicted"] == r["mean_prob_class"] for r in rows)
    metrics = json.loads((tmp_path / "mean" / "metrics.json").read_text())
    assert metrics["aggregate"] == "mean" and metrics["image"]["n"] == 12
    record = json.loads(next((tmp_path / "mean" / "slides").glob("*.json")).read_text())
    assert record["fingerprint"] == tta.fingerprint


def test_parallel_readers_give_the_same_outputs_and_a_bomb_fails_alone(checkpoint, cohort, tmp_path, capsys):
    """predict.readers=3 reads slides in 3 threads: the same outputs in the same order as one reader; an image
    that makes the reader raise anything (a decompression bomb) is a failed row, the others are predicted and
    the command ends."""
    bad = tmp_path / "bad" / "CLL"
    bad.mkdir(parents=True)
    decompression_bomb(bad / "bomb_001.png")
    inputs = [f"{cohort}/**/*.png", str(bad / "bomb_001.png")]
    assert predict(checkpoint, tmp_path / "one", *inputs, "predict.heatmaps=false", "cluster.kind=debug") == 1
    capsys.readouterr()
    assert predict(checkpoint, tmp_path / "three", *inputs, "predict.heatmaps=false", "predict.readers=3",
                   "predict.batch_size=7", "cluster.kind=debug") == 1
    assert "12 of 13 slide(s) predicted (12 now, 0 already complete), 1 failed" in capsys.readouterr().out
    failed = json.loads((tmp_path / "three" / "slides" / "bomb_001.json").read_text())
    assert failed["status"] == "failed" and "declares 30000 x 30000" in failed["error"]
    for image in sorted(cohort.rglob("*.png")):
        one = np.load(tmp_path / "one" / "slides" / f"{image.stem}.npz")
        three = np.load(tmp_path / "three" / "slides" / f"{image.stem}.npz")
        np.testing.assert_array_equal(one["coords"], three["coords"])
        np.testing.assert_allclose(one["logits"], three["logits"], rtol=1e-4, atol=1e-4)


def cohort_tiles(predictor, cohort: Path) -> np.ndarray:
    """Every tile of the cohort's real images, cut and stain-normalised as prediction does."""
    tiles = np.concatenate([cut_tiles(read_rgb(p), predictor.tiles).pixels for p in sorted(cohort.rglob("*.png"))])
    return predictor.normalize_stain(tiles)


def test_export_onnx_and_torchscript_agree_with_pytorch_on_real_tiles(checkpoint, cohort, tmp_path, capsys):
    import onnxruntime

    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "served")]) == 0
    assert "tile classes equal to PyTorch's on 100% of 16 check tiles" in capsys.readouterr().out
    recipe = json.loads((tmp_path / "served" / "preprocessing.json").read_text())
    assert recipe["classes"] == ["CLL", "FL", "MCL"] and recipe["input"]["shape"] == ["batch", 64, 64, 3]
    assert recipe["inside_the_model"]["centre_crop"] == 56 and recipe["before_the_model"]["stain_normalization"]
    assert recipe["tiling"]["training_image_size"] == [312, 417]  # the scale of pixel tiles, for a server
    scale = recipe["tiling"]["scale"]
    assert "an image more than 1.5x off along a side, with the training images' width:height within 3%" in scale
    predictor = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64)
    tiles = cohort_tiles(predictor, cohort)
    reference = predictor.logits(tiles, stain_normalized=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "served" / "model.onnx"))  # without this project
    served = torch.from_numpy(session.run(None, {"tiles": tiles})[0])
    scripted = torch.jit.load(str(tmp_path / "served" / "model.torchscript.pt"))(torch.from_numpy(tiles))
    for logits in (served, scripted):
        assert torch.allclose(logits, reference, atol=1e-4)
        assert torch.equal(logits.argmax(1), reference.argmax(1))
    record = json.loads((tmp_path / "served" / "export.json").read_text())
    digests = {entry["path"]: entry["sha256"] for entry in record["files"].values()}
    digests["preprocessing.json"] = record["preprocessing_sha256"]  # a server tells files of two exports apart
    assert digests == {name: hashlib.sha256((tmp_path / "served" / name).read_bytes()).hexdigest()
                       for name in ("model.onnx", "model.torchscript.pt", "preprocessing.json")}


def test_an_export_that_does_not_fit_keeps_the_earlier_one_whole(checkpoint, small_disk, tmp_path, capsys):
    """A DenseNet-121 exported over the reduced DenseNet's files on a disk without room for it: one error naming
    the folder (exit 1), and the earlier model.onnx and model.torchscript.pt stay whole, beside the export.json
    that describes them (written in place, a server would have found half a model). An --out that is a file is
    named as such."""
    from lymphoma.checkpoint import save_checkpoint
    from lymphoma.model import build_model
    from lymphoma.settings import ModelSettings

    served = small_disk / "served"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(served)]) == 0
    before = {p.name: p.read_bytes() for p in served.iterdir() if p.is_file()}
    state = torch.load(checkpoint, weights_only=True)
    architecture = ModelSettings(preset="densenet121").architecture(3)
    larger = tmp_path / "densenet121.pt"
    save_checkpoint({**state, "architecture": architecture, "model": build_model(architecture).state_dict()}, larger)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(larger), "--out", str(served)]) == 1
    assert f"no space left in {served}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in served.iterdir() if p.is_file()} == before
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(served / "export.json")]) == 2
    assert f"--out {served / 'export.json'} is a file, not a folder" in capsys.readouterr().err


def test_an_export_in_fewer_formats_leaves_no_earlier_model_beside_its_record(checkpoint, tmp_path, capsys):
    """`--formats onnx` over an earlier export of both formats: the earlier TorchScript file, which export.json no
    longer describes and a server could still load, is gone; a file of that name the folder held before any export
    is the user's and stays, and one that an export would write over is refused."""
    served = tmp_path / "served"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(served)]) == 0
    assert (served / "model.torchscript.pt").is_file()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(served), "--formats", "onnx"]) == 0
    assert sorted(p.name for p in served.iterdir() if p.is_file()) == ["export.json", "model.onnx",
                                                                       "preprocessing.json"]
    assert list(json.loads((served / "export.json").read_text())["files"]) == ["onnx"]
    own = tmp_path / "own"
    own.mkdir()
    (own / "model.torchscript.pt").write_bytes(b"the user's own model")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(own), "--formats", "onnx"]) == 0
    assert (own / "model.torchscript.pt").read_bytes() == b"the user's own model"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.onnx").write_bytes(b"another tool's model")  # which an export would replace: refused
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(theirs)]) == 2
    assert (f"{theirs} holds model.onnx, which no `lymphoma export` wrote (no export.json beside it) and this "
            "export would replace; give another --out") in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir() if p.is_file()] == ["model.onnx"]  # and its logs/
    assert (theirs / "model.onnx").read_bytes() == b"another tool's model"


@pytest.fixture(scope="module")
def decisive(tiled) -> Path:
    """A model trained further (200 steps, no weight average) than ``checkpoint``, whose tile classes are
    decisions rather than near-ties of an untrained model (where bf16 rounding alone flips 2% to 4% of them; 90
    steps were not enough once Reinhard's arithmetic changed the tiles by one level on a few values)."""
    run_train(config_for(tiled, "decisive", "train.epochs=10", "train.max_steps_per_epoch=20", "train.lr=0.003",
                         "train.ema=null"))
    return tiled[1] / "decisive" / "train" / "checkpoints" / "last.pt"


def _same_clear_decisions(low: torch.Tensor, reference: torch.Tensor, tolerance: float = 0.02) -> None:
    """bf16's logits within ``tolerance`` of fp32's, and the same class on every tile whose fp32 decision is
    clearer than twice that (a top-two margin rounding cannot cross), over a tenth of them. Tiles nearer a tie may
    flip: how many depends on how the model happened to train (1% to 4% of real tiles), and so does the share of
    clear ones, by CPU: 0.19 of the tiles on an AMD EPYC with avx512_bf16, over 0.25 on Intel CPUs with AMX."""
    top_two = reference.topk(2, 1).values
    clear = top_two[:, 0] - top_two[:, 1] > 2 * tolerance
    assert (low - reference).abs().max() < tolerance and clear.float().mean() > 0.1
    assert torch.equal(low.argmax(1)[clear], reference.argmax(1)[clear])


def test_every_engine_gives_pytorchs_classes_on_real_tiles(decisive, cohort, tmp_path, capsys):
    """engine=onnxruntime, openvino and compile: PyTorch's logits within 1e-4; precision=bf16 (torch, openvino):
    logits within 0.02 and the same class wherever fp32's is clear (_same_clear_decisions), fp32's own on a CPU
    without bf16 units; all through `lymphoma predict` end to end, with the same slide classes."""
    from lymphoma.precision import cpu_has_bf16

    checkpoint = decisive
    fp32 = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64)
    tiles = cohort_tiles(fp32, cohort)
    reference = fp32.logits(tiles, stain_normalized=True)
    onnx = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64, engine="onnxruntime")
    assert torch.allclose(onnx.logits(tiles, stain_normalized=True), reference, atol=1e-4)
    compiled = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64, engine="compile")
    assert torch.allclose(compiled.logits(tiles, stain_normalized=True), reference, atol=1e-4)
    bf16 = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64, precision="bf16")
    assert bf16.precision == ("bf16" if cpu_has_bf16() else "fp32")  # never emulated: 9x slower than fp32
    assert torch.equal(bf16.logits(tiles, stain_normalized=True), reference) == (bf16.precision == "fp32")
    _same_clear_decisions(bf16.logits(tiles, stain_normalized=True), reference)
    openvino = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64, engine="openvino")
    assert openvino.exported.precision == "fp32"
    assert torch.allclose(openvino.logits(tiles, stain_normalized=True), reference, atol=1e-4)
    openvino_bf16 = Predictor.from_checkpoint(checkpoint, torch.device("cpu"), 64, engine="openvino", precision="bf16")
    _same_clear_decisions(openvino_bf16.logits(tiles, stain_normalized=True), reference)
    assert predict(checkpoint, tmp_path / "torch", f"{cohort}/**/*.png") == 0
    for words in (["predict.engine=onnxruntime"], ["predict.precision=bf16"], ["predict.engine=compile"],
                  ["predict.engine=openvino", "predict.precision=bf16"]):
        out = tmp_path / "-".join(w.split("=")[1] for w in words)
        assert predict(checkpoint, out, f"{cohort}/**/*.png", *words) == 0
        with (tmp_path / "torch" / "summary.csv").open() as a, (out / "summary.csv").open() as b:
            assert [r["predicted"] for r in csv.DictReader(a)] == [r["predicted"] for r in csv.DictReader(b)]
    assert predict(checkpoint, tmp_path / "bad", f"{cohort}/**/*.png", "predict.engine=tensorrt") == 2
    assert "predict.engine is 'tensorrt'; allowed: torch, compile, onnxruntime, openvino" in capsys.readouterr().err


OPENVINO_ENGINES_RELEASED_OUT_OF_ORDER = """
import gc, os, signal
import faulthandler
import numpy as np, torch
from lymphoma.engines import OpenVinoEngine, TileClassifier, onnx_bytes
from lymphoma.settings import AugmentSettings
faulthandler.enable()  # as pytest and the task processes do: a signal stack of Python's own
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
onnx = onnx_bytes(TileClassifier(model, AugmentSettings(), 32), 32)
engine = OpenVinoEngine(onnx, 1, "fp32")
engine(np.zeros((2, 32, 32, 3), np.uint8))
engine = OpenVinoEngine(onnx, 1, "bf16")  # the fp32 engine is released first, then the bf16 one
engine(np.zeros((2, 32, 32, 3), np.uint8))
del engine
gc.collect()
signal.signal(signal.SIGTERM, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGTERM)
print("alive", flush=True)
"""


def test_openvino_engines_released_in_any_order_leave_signals_handled():
    """OpenVINO's CPU plugin points the thread that makes it at a signal stack of its own and, released, at the one
    it found: with a Core per engine, a fp32 engine replaced by a bf16 one left the thread on freed memory, and the
    next handled signal killed the process with a segmentation fault (a pytest run died so). One Core a process:
    the child handles SIGTERM and lives on."""
    done = subprocess.run([sys.executable, "-c", OPENVINO_ENGINES_RELEASED_OUT_OF_ORDER], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert (done.returncode, done.stdout.split()) == (0, ["handled", "alive"]), done.stderr[-2000:]


def test_openvino_is_imported_before_torch_where_tasks_are_told_to(monkeypatch):
    """In a process that imported torch first, OpenVINO's CPU inference idled a quarter of the time (2 tasks on 2
    cores: 0.78 to 0.80 of the wall busy against 0.93 to 0.99; bench/bench_import_order.py). With the variable that
    `predict` and `features` set for their tasks, importing the job's module imports openvino first; without it,
    not at all; and only predict.engine=openvino sets it."""
    from jobs import OPENVINO_FIRST, openvino_first_in_tasks

    code = ("import sys, jobs.predict; from lymphoma.engines import imported_after_torch; names = list(sys.modules); "
            "print('openvino' in sys.modules and names.index('openvino') < names.index('torch'), imported_after_torch())")
    env = {k: v for k, v in os.environ.items() if k != OPENVINO_FIRST}
    for value, expected in (("1", "True False"), (None, "False False")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**env, OPENVINO_FIRST: value} if value else env)
        assert done.stdout.strip() == expected, done.stderr[-2000:]
    monkeypatch.setenv(OPENVINO_FIRST, "0")  # restored afterwards
    openvino_first_in_tasks("torch")
    assert os.environ[OPENVINO_FIRST] == "0"
    openvino_first_in_tasks("openvino")
    assert os.environ[OPENVINO_FIRST] == "1"


def test_predict_tasks_run_openvino_imported_before_torch(checkpoint, cohort, tmp_path, monkeypatch):
    """End to end: `lymphoma predict` with predict.engine=openvino, its task a separate local process: every image
    gets a class, and the task's log has no word of openvino imported after torch (which this test's own process
    did, and says so)."""
    from jobs import OPENVINO_FIRST
    from lymphoma.engines import imported_after_torch

    monkeypatch.delenv(OPENVINO_FIRST, raising=False)
    monkeypatch.setenv(OPENVINO_FIRST, "0")  # what run_predict sets is undone afterwards
    assert predict(checkpoint, tmp_path / "out", f"{cohort}/**/*.png", "predict.engine=openvino",
                   "predict.precision=fp32", "cluster.kind=local") == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "slides").glob("*.json")]
    assert len(records) == 12 and all(r["status"] == "ok" for r in records)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "out" / "logs").rglob("*") if p.is_file())
    assert "predict" in logs  # the task's own log lines are there
    assert "imported after torch" not in logs
    import openvino  # noqa: F401  (this process imported torch long before)

    assert imported_after_torch()


def test_a_machine_that_cannot_compile_is_named_before_any_slide_is_read(checkpoint, cohort, tmp_path):
    """predict.engine=compile without a working C++ compiler (and with an empty inductor cache, so that it must
    compile): the task stops at the model with a named error, and no slide gets a class."""
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    command = [sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(checkpoint), f"{cohort}/**/*.png",
               "--out", str(tmp_path / "out"), "predict.engine=compile"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1
    assert "predict.engine=compile cannot compile the model on this machine" in done.stderr
    assert "set predict.engine=torch" in done.stderr
    assert not list((tmp_path / "out" / "slides").glob("*.npz"))


def test_probability_maps_paint_each_class_probability_where_its_tile_is(checkpoint, cohort, tmp_path):
    from lymphoma.plots import probability_grid

    image = sorted(cohort.rglob("*.png"))[0]
    assert predict(checkpoint, tmp_path / "maps", str(image), "predict.probability_maps=true") == 0
    assert Image.open(tmp_path / "maps" / "slides" / f"{image.stem}-probabilities.png").size[0] > 300
    outputs = np.load(tmp_path / "maps" / "slides" / f"{image.stem}.npz")
    grid = probability_grid((312, 417), outputs["coords"], outputs["probs"], 1.0, 64, 64)
    for (x, y), probs in zip(outputs["coords"], outputs["probs"]):
        np.testing.assert_allclose(grid[:, y + 32, x + 32], probs, rtol=1e-6)
    assert np.isnan(grid[:, 311, 416]).all()  # the strip no tile covers
