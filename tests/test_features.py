"""`lymphoma features` on real images: CLAM/TRIDENT-layout files whose features equal a direct forward of the
encoder, a trained DenseNet as encoder, resume after kill -9, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import config_for, on_a_terminal, replaced_while_the_first_task_runs, tiny_timm_file
from jobs.cli import main
from jobs.train import run_train
from lymphoma.augment import eval_batch
from lymphoma.backbones import load_pretrained
from lymphoma.images import read_rgb
from lymphoma.model import build_model
from lymphoma.png import write_png
from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings
from lymphoma.stain import StainNormalizer, fit_target
from lymphoma.tiling import cut_tiles, grid_shape


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    tiny_timm_file(path, "resnet10t", num_classes=1000)
    return path


pytestmark = pytest.mark.usefixtures("no_network")


def features(out: Path, *words: str) -> int:
    return main(["features", "--out", str(out), "cluster.poll_s=0.1", *words])


def test_features_equal_a_direct_forward_of_the_backbone(make_dataset, resnet_file, tmp_path, capsys):
    source = make_dataset(cases_per_class=2, images_per_case=1)
    words = [f"data.source={source}", f"run.root={tmp_path}", "model.backbone=timm:resnet10t",
             f"model.weights={resnet_file}", "predict.slides_per_task=3", "predict.batch_size=16"]
    assert features(tmp_path / "out", *words) == 0
    assert "6 of 6 slide(s) embedded (6 now, 0 already complete; " in capsys.readouterr().out
    model = build_model(ModelSettings(backbone="timm:resnet10t").architecture(1))
    load_pretrained(model, resnet_file)
    model.net.reset_classifier(0)
    model.eval()
    settings, augment = TileSettings(), AugmentSettings()  # the run's: the defaults
    normalizer = StainNormalizer(fit_target_default())
    with (tmp_path / "out" / "features.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"} and {r["label"] for r in rows} == {"CLL", "FL", "MCL"}
    for row in rows[:3]:
        with h5py.File(row["file"]) as h5:  # read as CLAM's and TRIDENT's MIL code reads it
            stored, coords, attrs = h5["features"][:], h5["coords"][:], dict(h5.attrs)
        tiles = cut_tiles(read_rgb(row["path"]), settings)
        np.testing.assert_array_equal(coords, tiles.coords)
        with torch.inference_mode():
            direct = model(eval_batch(normalizer.batch(tiles.pixels), augment, torch.device("cpu"))).numpy()
        assert stored.shape == direct.shape == (len(tiles.pixels), 512) and stored.dtype == np.float32
        np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5)
        assert attrs["backbone"] == "timm:resnet10t" and attrs["tile_size"] == 128 and attrs["feature_dim"] == 512
        assert attrs["label"] == row["label"] and attrs["encoder"] == str(resnet_file)
        pt = tmp_path / "out" / "pt_files" / f"{Path(row['file']).stem}.pt"  # as CLAM's MIL training loads it
        np.testing.assert_array_equal(torch.load(pt, weights_only=True).numpy(), stored)
    pt.unlink()  # a folder of a version that wrote no .pt: a rerun resumes every slide and makes the missing file
    assert features(tmp_path / "out", *words) == 0 and "(0 now, 6 already complete; " in capsys.readouterr().out
    np.testing.assert_array_equal(torch.load(pt, weights_only=True).numpy(), stored)
    assert features(tmp_path / "out", *words, rows[0]["path"]) == 2  # one slide: features.csv would lose five
    assert (f"{tmp_path / 'out'} holds the embeddings of 5 slide(s) this request does not name (" in
            capsys.readouterr().err and len((tmp_path / "out" / "features.csv").read_text().splitlines()) == 7)
    shutil.copyfile(rows[3]["path"], rows[0]["path"])  # a slide rescanned since: embedded again, and said
    assert features(tmp_path / "out", *words) == 0
    printed = capsys.readouterr()
    assert "(1 now, 5 already complete; " in printed.out
    assert f"1 slide file(s) changed since this folder embedded them (size or modification time): embedded again from " \
           f"the file as it is now: {rows[0]['path']}" in printed.err
    with h5py.File(rows[0]["file"]) as h5, h5py.File(rows[3]["file"]) as other:  # alone in its batches now, with
        # other slides' tiles then: oneDNN's kernels for another batch size round the last bit otherwise on some CPUs
        np.testing.assert_allclose(h5["features"][:], other["features"][:], rtol=1e-5, atol=1e-6)
    moved = source.with_name(f"{source.name}-moved")  # the cohort moved (mv keeps sizes and times): all resume
    source.rename(moved)
    words[0] = f"data.source={moved}"
    assert features(tmp_path / "out", *words) == 0
    printed = capsys.readouterr()
    assert "(0 now, 6 already complete; " in printed.out and "6 slide file(s) found at another path" in printed.err
    with (tmp_path / "out" / "features.csv").open() as handle:
        assert all(Path(r["path"]).is_relative_to(moved) for r in csv.DictReader(handle))
    assert features(tmp_path / "out", *words, "--restart") == 0  # afresh, the earlier folder kept beside
    assert "(6 now, 0 already complete; " in capsys.readouterr().out
    (aside,) = tmp_path.glob("out.before-*")
    assert len(list((aside / "h5_files").glob("*.h5"))) == 6 and (aside / "features.csv").is_file()


def fit_target_default():
    from lymphoma.settings import StainSettings

    return fit_target(StainSettings())


@pytest.fixture(scope="module")
def encoder(tiled) -> Path:
    """A DenseNet trained for two steps on the 417x312 copies (64-pixel tiles): the checkpoint records that size."""
    run_train(config_for(tiled, "encoder", "train.epochs=1", "train.max_steps_per_epoch=2"))
    return tiled[1] / "encoder" / "train" / "checkpoints" / "last.pt"


def test_a_trained_densenet_is_an_encoder_and_bad_encoders_are_named(encoder, make_dataset, tmp_path, capsys):
    """A checkpoint embeds real images with its own tiling; no encoder, a missing weight file, an architecture timm
    does not have or a block to freeze that it has not, is named before anything is submitted. The output folder
    is new, empty or an earlier run's (marked, or from before marks): never someone else's, whose config.yaml or
    features.csv it would replace."""
    source = make_dataset(cases_per_class=1, images_per_case=1)
    assert features(tmp_path / "dense", "--checkpoint", str(encoder), f"{source}/**/*.png",
                    f"run.root={tmp_path}", "cluster.kind=debug") == 0
    files = sorted((tmp_path / "dense" / "h5_files").glob("*.h5"))
    assert len(files) == 3
    with h5py.File(files[0]) as h5:
        width = build_model(torch.load(encoder, weights_only=True)["architecture"]).classifier.in_features
        assert h5["features"].shape[1] == width and h5["coords"].attrs["patch_size"] == 64  # the checkpoint's tiling
        assert h5.attrs["backbone"] == "densenet:densenet-reduced"
    (tmp_path / "dense" / ".lymphoma-features").unlink()  # a folder made before folders were marked: still ours
    capsys.readouterr()
    assert features(tmp_path / "dense", "--checkpoint", str(encoder), f"{source}/**/*.png",
                    f"run.root={tmp_path}", "cluster.kind=debug") == 0
    assert "(0 now, 3 already complete" in capsys.readouterr().out
    mine = tmp_path / "project"
    mine.mkdir()
    for name in ("config.yaml", "features.csv"):
        (mine / name).write_text("keep me")
    assert features(mine, "--checkpoint", str(encoder), f"{source}/**/*.png", f"run.root={tmp_path}") == 2
    assert f"output folder {mine} exists and holds other files" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in mine.iterdir() if p.is_file()} == {"config.yaml": "keep me",
                                                                               "features.csv": "keep me"}
    from jobs.run_folder import folder_lock

    with folder_lock(tmp_path / "dense", "features"):  # as another `lymphoma features` into it, still running
        assert features(tmp_path / "dense", "--checkpoint", str(encoder), f"{source}/**/*.png",
                        f"run.root={tmp_path}") == 2
    assert f"another `lymphoma features` (pid {os.getpid()}) is using {tmp_path / 'dense'}" in capsys.readouterr().err
    assert features(tmp_path / "none", f"{source}/**/*.png", f"run.root={tmp_path}") == 2
    assert "needs an encoder: --checkpoint" in capsys.readouterr().err
    assert features(tmp_path / "miss", f"{source}/**/*.png", f"run.root={tmp_path}", "model.backbone=timm:resnet10t",
                    f"model.weights={tmp_path / 'absent.safetensors'}") == 2
    assert "model.weights=" in capsys.readouterr().err
    assert features(tmp_path / "typo", f"{source}/**/*.png", f"run.root={tmp_path}",
                    "model.backbone=timm:resnet10x") == 2  # refused before a task is submitted or a folder made
    assert "timm has no architecture 'resnet10x'; similar: resnet10t" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    assert features(tmp_path / "freeze", f"{source}/**/*.png", f"run.root={tmp_path}", "model.backbone=timm:resnet10t",
                    "model.freeze=layer9") == 2  # the same for a block the network does not have
    assert "model.freeze='layer9' is not a block of ResNet" in capsys.readouterr().err
    assert not (tmp_path / "freeze").exists()


def test_mil_on_a_tile_model_that_learnt_from_its_test_cases_says_its_figures_are_not_held_out(
        encoder, tiled, make_dataset, tmp_path, capsys):
    """The checkpoint records the cases it trained on (its run's train phase; the fixed schedule chose nothing on
    val); `lymphoma features` keeps that beside the embeddings, and `lymphoma mil` with that one encoder for every
    fold names the test cases it has seen, in a warning, report.txt and report.json. A folder whose encoder is not
    known (made before the record) is reported as such, without a warning."""
    with (tiled[1] / "base" / "split.csv").open() as handle:
        trained = sorted({row["case"] for row in csv.DictReader(handle) if row["phase"] == "train"})
    assert torch.load(encoder, weights_only=True)["cases_seen"] == trained and len(trained) == 3
    source = make_dataset(cases_per_class=2, images_per_case=1)  # the same first cases: the encoder's among them
    common = [f"run.root={tmp_path}", "run.name=leak", "cluster.kind=debug"]
    assert features(tmp_path / "leak" / "features", "--checkpoint", str(encoder), f"{source}/**/*.png", *common) == 0
    assert json.loads((tmp_path / "leak" / "features" / "encoder.json").read_text())["cases_seen"] == trained
    capsys.readouterr()
    mil = ["mil", f"data.source={source}", *common, "cv.folds=2", "cv.bootstrap=100", "mil.epochs=1",
           "mil.heatmaps=false"]
    assert main(mil) == 0
    err = capsys.readouterr().err
    assert "lymphoma mil: the encoder learnt from (or chose its epoch on) 3 of the 6 cases these folds test" in err
    report = tmp_path / "leak" / "mil" / "report.json"
    assert json.loads(report.read_text())["encoder_saw_test_cases"] == trained
    assert report.with_suffix(".txt").read_text().startswith("WARNING: the encoder learnt from")
    (tmp_path / "leak" / "features" / "encoder.json").unlink()
    assert main(mil) == 2  # the embeddings' encoder is no longer known: not the model's, as far as can be told
    assert "(they differ in: the encoder of the embeddings), which this run would replace" in capsys.readouterr().err
    assert main([*mil, "--restart"]) == 0
    assert "the encoder learnt from" not in capsys.readouterr().err
    assert json.loads(report.read_text())["encoder_saw_test_cases"] is None


def test_a_checkpoint_encoder_tiles_at_its_scale_as_prediction_does(encoder, data_root, manifest_rows, tmp_path,
                                                                    capsys):
    """A full-size image (1388x1040) of the 417x312 copies the encoder was trained on is cut at their scale, its
    file's tiles attribute holding the resize; a square crop of it, off the scale, is embedded as it is with
    prediction's warning naming the tiles.resize that matches it. A tile setting other than the checkpoint's is an
    error without --force, and with it the image is cut at that resize."""
    full = next(r for r in manifest_rows if r["fullres_jpeg_path"])
    other = next(r for r in manifest_rows if Path(r["lowres_path"]).stem != Path(full["fullres_jpeg_path"]).stem)
    both = [str(data_root / full["fullres_jpeg_path"]), str(data_root / other["lowres_path"])]  # two stems
    crop = tmp_path / "square-crop.png"
    write_png(crop, read_rgb(both[0])[:, :1040])
    words = ["--checkpoint", str(encoder), f"run.root={tmp_path}", "cluster.kind=debug"]
    assert features(tmp_path / "scale", *words, *both, str(crop)) == 0
    err = capsys.readouterr().err
    assert "lymphoma features: 1 of 3 image(s) were resized to the scale of the model's training images" in err
    assert "1 of 3 image(s) are at 2.9x the scale" in err and "embed again with --force tiles.resize=0.347" in err
    files = tmp_path / "scale" / "h5_files"
    with h5py.File(files / f"{Path(both[0]).stem}.h5") as large, h5py.File(files / f"{Path(both[1]).stem}.h5") as copy:
        assert large.attrs["matched_resize"] == pytest.approx(0.3, abs=0.001) and copy.attrs["matched_resize"] == 0
        assert np.array_equal(large["coords"][:], copy["coords"][:])  # the copy's grid
        assert TileSettings(**json.loads(large.attrs["tiles"])).resize == large.attrs["matched_resize"]
    assert features(tmp_path / "refused", *words, both[0], "tiles.resize=0.3") == 2
    assert "tiles.resize=0.3 but the model was trained with 1" in capsys.readouterr().err
    assert features(tmp_path / "forced", *words, str(crop), "tiles.resize=0.347", "--force") == 0
    assert "scale of the model's training images" not in capsys.readouterr().err
    with h5py.File(tmp_path / "forced" / "h5_files" / "square-crop.h5") as forced:
        settings = TileSettings(**json.loads(forced.attrs["tiles"]))
        assert settings.resize == 0.347 and settings.size == 64 and forced.attrs["matched_resize"] == 0
        assert len(forced["coords"]) == np.prod(grid_shape(1040, 1040, settings)) > 0


def test_killed_features_resume_only_the_remaining_slides(data_root, manifest_rows, resnet_file, tmp_path):
    """A rerun after kill -9 embeds only the slides without a complete file and record; on a terminal its bar
    starts at those already done and ends at every slide."""
    listing = tmp_path / "cohort.tsv"
    rows = manifest_rows[::8]
    listing.write_text("".join(f"{r['lowres_path']}\t{r['cls']}\t{r['case_id']}\n" for r in rows))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.cli", "features", "--list", str(listing), "--basepath", str(data_root),
               "--out", str(out), "model.backbone=timm:resnet10t", f"model.weights={resnet_file}",
               f"run.root={tmp_path}", "predict.batch_size=16", "cluster.kind=debug"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list((out / "h5_files").glob("*.h5"))) < 4:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "h5_files").glob("*.h5")}
    assert 4 <= len(done) < len(rows)
    # complete: file and record both written (a kill between the two leaves a file that is redone)
    done_records = {p.stem for p in (out / "records").glob("*.json")} & {Path(n).stem for n in done}
    code, printed = on_a_terminal(command, timeout_s=600)
    assert code == 0, printed
    assert f"{len(rows)} of {len(rows)} slide(s) embedded ({len(rows) - len(done_records)} now, " \
           f"{len(done_records)} already complete" in printed
    bar = [line for line in printed.replace("\r", "\n").splitlines() if line.startswith("features:")]
    assert bar and f"| {len(done_records)}/{len(rows)} " in bar[0] and f"| {len(rows)}/{len(rows)} " in bar[-1], bar
    for name in done:
        if Path(name).stem in done_records:
            assert (out / "h5_files" / name).stat().st_mtime_ns == done[name]
    assert len(list((out / "h5_files").glob("*.h5"))) == len(rows) and not list((out / "h5_files").glob(".*tmp*"))


def test_weights_written_over_while_features_run_never_give_two_encoders_under_one_name(make_dataset, resnet_file,
                                                                                       tmp_path):
    """A weight file written over while the array's tasks wait (`cp` of another model onto it) gave the tasks that
    started later other embeddings under one encoder.json: the tasks read the job's own link to the file, which
    tells the write, and those tasks fail saying so; the files written name the user's file and one encoder."""
    from safetensors.torch import load_file, save_file

    source = make_dataset(cases_per_class=2, images_per_case=1)
    weights, other = tmp_path / "vits.safetensors", tmp_path / "other.safetensors"
    shutil.copyfile(resnet_file, weights)
    save_file({k: v * 0.5 for k, v in load_file(str(resnet_file)).items()}, str(other))
    out, first = tmp_path / "out", 3
    command = [sys.executable, "-m", "jobs.cli", "features", "--out", str(out), f"data.source={source}",
               f"run.root={tmp_path}", "model.backbone=timm:resnet10t", f"model.weights={weights}",
               f"predict.slides_per_task={first}", "predict.batch_size=16", "cluster.parallelism=1",
               "cluster.poll_s=0.05"]
    code, printed = replaced_while_the_first_task_runs(command, out / "records", weights, other, first, in_place=True)
    assert code == 1 and f"{weights} was written over in place while this job ran" in printed, printed
    fingerprints, encoders = set(), set()
    for path in sorted((out / "h5_files").glob("*.h5")):
        with h5py.File(path) as h5:
            fingerprints.add(h5.attrs["fingerprint"])
            encoders.add(h5.attrs["encoder"])
    assert len(fingerprints) == 1 and encoders == {str(weights)}, (fingerprints, encoders)
    assert len(list((out / "h5_files").glob("*.h5"))) == first and not list((out / "engine").glob("pinned-*"))


def test_a_slide_whose_reading_hangs_fails_alone_in_features_too(data_root, manifest_rows, resnet_file, stalling_mount,
                                                                 tmp_path):
    """predict.read_timeout_min holds for `lymphoma features` (the same readers): a slide on a filesystem that
    stopped answering fails alone and the next slides are embedded."""
    paths = [data_root / row["lowres_path"] for row in manifest_rows[::40][:3]]
    shutil.copyfile(paths[0], stalling_mount.source / "stalled.png")
    stalled = stalling_mount.path / "stalled.png"
    assert stalled.stat().st_size > 0  # cached by the kernel: naming it needs no answer from the filesystem
    listing = tmp_path / "cohort.tsv"
    listing.write_text("".join(f"{path}\tFL\tc{i}\n" for i, path in enumerate([paths[1], stalled, paths[2]])))
    stalling_mount.stall()
    command = [sys.executable, "-m", "jobs.cli", "features", "--list", str(listing), "--out", str(tmp_path / "out"),
               "model.backbone=timm:resnet10t", f"model.weights={resnet_file}", f"run.root={tmp_path}",
               "predict.read_timeout_min=0.05", "predict.batch_size=16", "cluster.poll_s=0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    with (tmp_path / "out" / "features.csv").open() as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert rows["stalled.png"]["status"] == "failed" and "its reading hangs" in rows["stalled.png"]["error"]
    assert [rows[p.name]["status"] for p in paths[1:]] == ["ok", "ok"]


def test_bf16_embeddings_are_near_fp32_and_never_taken_for_them(make_dataset, resnet_file, tmp_path, capsys, caplog):
    """predict.precision=bf16 on a CPU with bf16 units: embeddings near fp32's, marked bf16, with a fingerprint of
    their own (fp32 into the same folder is refused, or where its encoder.json is gone embeds everything again); on
    a CPU without them (PyTorch would emulate bf16 9x slower): fp32's embeddings, marked fp32, with a warning that
    says why."""
    from lymphoma.precision import cpu_has_bf16

    source = make_dataset(cases_per_class=1, images_per_case=1)
    words = [f"data.source={source}", f"run.root={tmp_path}", "model.backbone=timm:resnet10t",
             f"model.weights={resnet_file}", "cluster.kind=debug"]
    assert features(tmp_path / "fp32", *words) == 0
    caplog.clear()
    assert features(tmp_path / "bf16", *words, "predict.precision=bf16") == 0
    ran = "bf16" if cpu_has_bf16() else "fp32"
    assert ("this CPU has no bf16 units" in caplog.text) == (ran == "fp32")
    pairs = [(path, tmp_path / "bf16" / "h5_files" / path.name)
             for path in sorted((tmp_path / "fp32" / "h5_files").glob("*.h5"))]
    assert len(pairs) == 3
    for fp32_file, bf16_file in pairs:
        with h5py.File(fp32_file) as full, h5py.File(bf16_file) as half:
            exact, approx = full["features"][:], half["features"][:]
            np.testing.assert_array_equal(full["coords"][:], half["coords"][:])
            assert (full.attrs["precision"], half.attrs["precision"]) == ("fp32", ran)
            assert (full.attrs["fingerprint"] != half.attrs["fingerprint"]) == (ran == "bf16")
        assert approx.dtype == np.float32 and np.array_equal(exact, approx) == (ran == "fp32")  # bf16 ran, or fp32
        cosine = (exact * approx).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(approx, axis=1)
        assert cosine.min() > 0.999, cosine.min()  # measured: 0.99999, and at most 0.5% of the largest value off
        assert np.abs(exact - approx).max() < 0.02 * np.abs(exact).max()
    capsys.readouterr()
    stamps = [half.stat().st_mtime_ns for _, half in pairs]
    assert features(tmp_path / "bf16", *words) == 2  # fp32 into the bf16 folder: refused, the folder kept
    assert (f"{tmp_path / 'bf16'} holds the embeddings of 3 slide(s) by another encoder or other settings "
            f"({resnet_file}; this run differs in: predict.precision); embedding here would replace them"
            ) in capsys.readouterr().err
    assert [half.stat().st_mtime_ns for _, half in pairs] == stamps
    (tmp_path / "bf16" / "encoder.json").unlink()  # as an older version left it: the files' fingerprints decide
    assert features(tmp_path / "bf16", *words) == 0  # and none is taken as done
    done = "3 now, 0 already complete" if ran == "bf16" else "0 now, 3 already complete"  # or fp32's own, kept
    assert f"3 of 3 slide(s) embedded ({done}" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_embeddings_match_torchs_and_are_kept_apart(make_dataset, resnet_file, tmp_path, precision):
    """predict.engine=openvino: the encoder's ONNX export run by OpenVINO gives torch's fp32 embeddings within 1e-4 of
    their scale (bf16 where this CPU has it: cosine above 0.999), says so in every file, and has a fingerprint
    of its own."""
    source = make_dataset(cases_per_class=1, images_per_case=1)
    words = [f"data.source={source}", f"run.root={tmp_path}", "model.backbone=timm:resnet10t",
             f"model.weights={resnet_file}", "cluster.kind=debug"]
    assert features(tmp_path / "torch", *words) == 0
    assert features(tmp_path / "openvino", *words, "predict.engine=openvino", f"predict.precision={precision}") == 0
    files = sorted((tmp_path / "torch" / "h5_files").glob("*.h5"))
    assert len(files) == 3
    for path in files:
        with h5py.File(path) as ours, h5py.File(tmp_path / "openvino" / "h5_files" / path.name) as theirs:
            exact, served = ours["features"][:], theirs["features"][:]
            assert (ours.attrs["engine"], theirs.attrs["engine"]) == ("torch", "openvino")
            assert ours.attrs["fingerprint"] != theirs.attrs["fingerprint"]
            runs = theirs.attrs["precision"]
        assert runs == precision or (precision, runs) == ("bf16", "fp32")  # fp32 where the CPU has no bf16
        if runs == "fp32":
            assert np.abs(exact - served).max() < 1e-4 * np.abs(exact).max()
        cosine = (exact * served).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(served, axis=1)
        assert cosine.min() > 0.999, cosine.min()
    assert list((tmp_path / "openvino" / "engine").glob("encoder-*.onnx"))  # exported once, for the next task
