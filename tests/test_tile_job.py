"""`lymphoma tile` end to end on real images, through real subprocesses of the local executor."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tables
import yaml

from conftest import pick_images, read_shards
from jobs.tile import run_tile
from lymphoma.phase_tiles import PhaseTiles
from lymphoma.settings import TileSettings
from lymphoma.sharding import load_manifest, phase_shards
from lymphoma.tiling import grid_shape


def test_local_array_writes_shards_split_manifest_and_config(make_dataset, make_config):
    source = make_dataset(4, 3)
    cfg = make_config(source, "tiles.size=128", "tiles.stride=96", "split.val_fraction=0.25")
    result = run_tile(cfg, progress=False)
    run_dir = result.run_dir

    with (run_dir / "split.csv").open() as handle:
        split = list(csv.DictReader(handle))
    assert len(split) == 36
    phases_of_case = {}
    for row in split:
        phases_of_case.setdefault(row["case"], set()).add(row["phase"])
    assert all(len(p) == 1 for p in phases_of_case.values())
    assert {row["phase"] for row in split} == {"train", "val"}

    manifest = load_manifest(result.manifest)
    per_image = grid_shape(312, 417, TileSettings(size=128, stride=96))
    for phase in ("train", "val"):
        entry = manifest["phases"][phase]
        n_images = sum(row["phase"] == phase for row in split)
        assert entry["n_images"] == n_images and entry["n_tiles"] == n_images * per_image[0] * per_image[1]
        assert len(entry["shards"]) == -(-n_images // 4)
        assert sum(s["n_tiles"] for s in entry["shards"]) == entry["n_tiles"]
        dataset = PhaseTiles(phase_shards(result.manifest, phase))
        assert len(dataset) == entry["n_tiles"]
        assert dataset.class_counts().tolist() == [entry["tiles_per_class"][c] for c in ("CLL", "FL", "MCL")]
        truth = {row["path"].rsplit("/", 1)[1]: (row["label"], row["case"]) for row in split if row["phase"] == phase}
        assert {(f, dataset.classes[k], c) for f, k, c in zip(dataset.filenames, dataset.labels, dataset.cases)} == \
            {(f, *truth[f]) for f in truth}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["tiles"]["stride"] == 96 and saved["data"]["source"] == str(source)
    assert "${" not in (run_dir / "config.yaml").read_text()
    logs = list((run_dir / "logs" / "tile").glob("*/*_log.out"))
    assert len(logs) == result.n_written  # one real subprocess per shard

    again = run_tile(cfg, progress=False)
    assert again.n_written == 0 and load_manifest(again.manifest) == manifest
    changed = run_tile(make_config(source, "tiles.size=128", "tiles.stride=64"), progress=False)
    assert changed.n_written == len(changed.summaries)


def test_debug_executor_gives_the_same_shards_as_local_processes(make_dataset, make_config):
    source = make_dataset(2, 2)
    local = run_tile(make_config(source, "run.name=local"), progress=False)
    debug = run_tile(make_config(source, "run.name=debug", cluster="debug"), progress=False)
    for phase in ("train", "val"):
        a = read_shards(phase_shards(local.manifest, phase))
        b = read_shards(phase_shards(debug.manifest, phase))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_rerun_after_kill_9_mid_write_completes_with_the_same_content(make_dataset, make_config, tmp_path):
    source = make_dataset(3, 8)
    args = [f"data.source={source}", f"run.root={tmp_path / 'runs'}", "run.name=killed", "tiles.images_per_shard=6",
            "tiles.stride=32", "cluster.poll_s=0.05"]
    command = [sys.executable, "-m", "jobs.cli", "tile", "--no-progress", *args]
    tiles_dir = tmp_path / "runs" / "killed" / "tiles"
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(tiles_dir.glob("*/*.h5")) and list(tiles_dir.glob("*/*.tmp-*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert list(tiles_dir.glob("*/*.tmp-*")), "the kill should land while a shard is being written"
    assert not (tiles_dir / "manifest.json").exists()
    complete_before = {p.name + p.parent.name: p.stat().st_mtime_ns for p in tiles_dir.glob("*/*.h5")}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = load_manifest(tiles_dir)
    n_shards = sum(len(p["shards"]) for p in manifest["phases"].values())
    assert f"{n_shards - len(complete_before)} shard(s) written, {len(complete_before)} already complete" in rerun.stdout
    for p in tiles_dir.glob("*/*.h5"):  # shards finished before the kill were kept, not rewritten
        if p.name + p.parent.name in complete_before:
            assert p.stat().st_mtime_ns == complete_before[p.name + p.parent.name]
    assert not list(tiles_dir.glob("*/*.tmp-*"))

    clean = run_tile(make_config(source, "run.name=clean", "tiles.images_per_shard=6", "tiles.stride=32",
                                 cluster="debug"), progress=False)
    for phase in manifest["phases"]:
        a, b = read_shards(phase_shards(tiles_dir, phase)), read_shards(phase_shards(clean.manifest, phase))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_summary_line_and_manifest_counts_through_the_cli(make_dataset, tmp_path):
    source = make_dataset(2, 2)
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "tile", "--no-progress", f"data.source={source}",
                          f"run.root={tmp_path}", "run.name=cli"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tiles/s" in out.stdout and "train" in out.stdout and "val" in out.stdout
    manifest = json.loads((tmp_path / "cli" / "tiles" / "manifest.json").read_text())
    for entry in manifest["phases"].values():
        for shard in entry["shards"]:
            with tables.open_file(tmp_path / "cli" / "tiles" / shard["path"]) as h5:
                assert h5.root.imgs.nrows == shard["n_tiles"]
                assert json.loads(h5.root._v_attrs.tiles_per_class) == shard["tiles_per_class"]


def test_full_resolution_jpeg_and_tiff_inputs_with_a_resize_factor(data_root, manifest_rows, tmp_path, make_config):
    """The 1388x1040 JPEGs and TIFF copies of them, resized by 0.3 as the tutorial's resize factor does."""
    from PIL import Image

    source = tmp_path / "fullres"
    rows = [row for row in manifest_rows if row["fullres_jpeg_path"]]
    for i, row in enumerate(rows[:12]):
        target = source / row["cls"] / row["filename"].replace(".tif", ".jpg" if i % 2 else ".tif")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(data_root / row["fullres_jpeg_path"]).save(target)
    result = run_tile(make_config(source, "tiles.resize=0.3", "tiles.size=128", "tiles.stride=128",
                                  "split.val_fraction=0.3"), progress=False)
    manifest = load_manifest(result.manifest)
    per_image = grid_shape(1040, 1388, TileSettings(size=128, stride=128, resize=0.3))
    assert per_image == (2, 3)  # 312 x 416 after resizing
    n_images = sum(p["n_images"] for p in manifest["phases"].values())
    assert n_images == len(list(source.rglob("*.*"))) and not manifest["skipped"]
    assert sum(p["n_tiles"] for p in manifest["phases"].values()) == n_images * 6
    with tables.open_file(phase_shards(result.manifest, "train")[0]) as h5:
        assert h5.root._v_attrs.resize == 0.3
        assert set(h5.root.images.col("width")) == {1388}


def test_a_damaged_shard_is_rewritten_by_a_rerun_and_named_by_training(make_dataset, make_config, capsys):
    from jobs.train import run_train
    from lymphoma.errors import InputError
    from lymphoma.store import verify_shard

    run = make_config(make_dataset(2, 2), "split.val_fraction=0.5", "tiles.images_per_shard=2")
    run_tile(run, progress=False)
    shard = phase_shards(run.manifest, "train")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed tiles
    shard.write_bytes(data)
    assert verify_shard(shard) is not None
    with pytest.raises(InputError, match=f"{shard} is damaged: .*rerun `lymphoma tile` with the same config"):
        run_train(run)
    again = run_tile(run, progress=False)
    assert again.n_written == 1 and verify_shard(shard) is None


def test_a_full_disk_is_one_clear_error_and_no_broken_shard_takes_a_final_name(make_dataset, small_disk, capsys):
    """Tiling 18 real images (about 2 MiB a shard) onto 4 MiB: exit 1, one message naming the folder and the
    space needed, never a traceback; every shard under its final name reads back whole; with room, a rerun
    keeps those and writes the rest."""
    from jobs.cli import main
    from lymphoma.store import verify_shard

    words = ["tile", "--no-progress", f"data.source={make_dataset(2, 3)}", f"run.root={small_disk}",
             "tiles.images_per_shard=3", "split.val_fraction=0"]
    assert main(words) == 1
    err = capsys.readouterr().err
    assert f"no space left in {small_disk}/default/tiles" in err and "MiB needed" in err, err
    assert "Traceback" not in err
    finished = sorted(small_disk.rglob("shard-*.h5"))
    assert 0 < len(finished) < 6 and not list(small_disk.rglob("*.tmp-*"))
    assert all(verify_shard(path) is None for path in finished)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(words) == 0
    assert f"{6 - len(finished)} shard(s) written, {len(finished)} already complete" in capsys.readouterr().out


def test_per_patient_folders_of_files_named_alike_are_tiled_and_predicted_under_their_folders(data_root, manifest_rows,
                                                                                           tmp_path, capsys):
    """A manifest of per-patient folders each holding 1.png, 2.png: every image is its own in the stores
    (``<patient>__1.png``), in split.csv and in the held-out prediction's slide names; two files of one name in one
    folder are refused before any tile is written."""
    from jobs.cli import main
    from jobs.pipeline import held_out_slides

    lines, names = ["path,label,case"], set()
    for row in pick_images(manifest_rows, 2, 2):
        folder = tmp_path / "export" / row["case_id"]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{len(list(folder.iterdir())) + 1}.png"
        shutil.copyfile(data_root / row["lowres_path"], target)
        lines.append(f"{target},{row['cls']},{row['case_id']}")
        names.add(f"{row['case_id']}__{target.stem}")
    manifest = tmp_path / "export" / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    words = ["tile", "--no-progress", f"data.source={manifest}", f"run.root={tmp_path / 'runs'}", "split.val_fraction=0.5",
             "tiles.size=64", "tiles.stride=64", "augment.crop=56"]
    assert main(words) == 0
    run = tmp_path / "runs" / "default"
    with (run / "split.csv").open() as handle:
        split = list(csv.DictReader(handle))
    assert {row["key"] for row in split} == names and len(split) == 12
    stored = {name for phase in ("train", "val") for name in PhaseTiles(phase_shards(run / "tiles", phase)).filenames}
    assert stored == {f"{name}.png" for name in names}  # every image's tiles under its own name, none merged
    val = held_out_slides(run / "split.csv", "val")
    assert {(s.key, s.path) for s in val} == {(r["key"], r["path"]) for r in split if r["phase"] == "val"}
    twin = next((tmp_path / "export").glob("*/1.png"))
    shutil.copyfile(twin, twin.with_suffix(".tif"))
    manifest.write_text(manifest.read_text() + f"{twin.with_suffix('.tif')},{split[0]['label']},{twin.parent.name}\n")
    assert main([*words, "run.name=twins"]) == 2
    assert f"two images named {twin.parent.name}__1: " in capsys.readouterr().err
    assert not {"split.csv", "tiles"} & {p.name for p in (tmp_path / "runs" / "twins").iterdir()}


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_a_run_folder_on_a_filesystem_without_locks_is_used_unlocked_with_one_warning(make_dataset, tmp_path, code,
                                                                                      monkeypatch, capsys):
    """NFS without its lock daemon answers flock with ENOLCK, Lustre mounted without flock (many clusters' scratch)
    with ENOSYS, where every command crashed with a traceback. Neither filesystem runs here, so flock answers as
    they do: the tiling goes on unlocked, warning once (it takes two locks)."""
    import fcntl

    from jobs.cli import main

    def no_locks(handle, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr("jobs.run_folder._WARNED_NO_LOCKS", set())  # once per filesystem and process
    assert main(["tile", "--no-progress", f"data.source={make_dataset(2, 1)}", f"run.root={tmp_path}",
                 "run.name=unlocked", "tiles.size=64", "tiles.stride=64", "augment.crop=56"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"{tmp_path / 'unlocked'} is on a filesystem without file locks ({os.strerror(code)}: ") == 1
    assert "going on unlocked" in err and (tmp_path / "unlocked" / "tiles" / "manifest.json").is_file()
