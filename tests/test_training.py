"""Training on real tiles: DDP over real processes, resume after a kill, TensorBoard, validate, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DDP_STEPS, FAST, config_for
from jobs.run_folder import open_run
from jobs.tile import run_tile
from jobs.train import run_train
from lymphoma.checkpoint import load_checkpoint, save_checkpoint
from lymphoma.errors import InputError
from lymphoma.mid_epoch import epoch_order, resume_point
from lymphoma.model import build_model
from lymphoma.training import open_phase, weights_digest
from lymphoma.validation import validate


def final_digest(runs: Path, name: str) -> str:
    state = load_checkpoint(runs / name / "train" / "checkpoints" / "last.pt")
    model = build_model(state["architecture"])
    model.load_state_dict(state["model"])
    return weights_digest(model)


def started_lines(runs: Path, name: str) -> list[str]:
    """The start line of each training process of a run (device, processes, threads, loaders), from its logs."""
    logs = sorted((runs / name / "train" / "logs").rglob("*_log.out"))
    return [f"{name}: {line}" for log in logs for line in log.read_text().splitlines() if "training on" in line]


def test_two_process_gloo_ddp_keeps_ranks_identical(tiled, local_ddp):
    results = local_ddp
    assert sorted(r["rank"] for r in results) == [0, 1] and {r["world_size"] for r in results} == {2}
    assert results[0]["weights_sha1"] == results[1]["weights_sha1"]
    single = run_train(config_for(tiled, "single", "train.epochs=1", "train.max_steps_per_epoch=4"))
    assert single[0]["weights_sha1"] != results[0]["weights_sha1"]  # two ranks saw twice the data


# no regularisation, so that 4 epochs on 12 images must show the loss falling
PLAIN = ["train.label_smoothing=0", "train.weight_decay=0", "model.drop_rate=0", "augment.hed_scale=0",
         "augment.hed_shift=0", "stain.normalize=none"]


def test_loss_falls_and_tensorboard_holds_every_tag(tiled, tmp_path, monkeypatch):
    cfg = config_for(tiled, "learn", "train.epochs=4", "augment.rotate=0", "augment.hue=0.05",
                     "augment.grayscale_p=0", "train.lr=0.002", *PLAIN)
    summary = run_train(cfg)[0]
    history = json.loads((tiled[1] / "learn" / "train" / "history.json").read_text())
    assert len(history) == 4 and summary["epochs"] == 4
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    task_log = "".join(p.read_text() for p in (tiled[1] / "learn" / "train" / "logs").rglob("*_log.out"))
    epochs = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    lymphoma\.training: epoch (\d)/4: train loss",
                        task_log, re.MULTILINE)  # the task logs each epoch with its time
    assert epochs == ["1", "2", "3", "4"], task_log[-2000:]
    events = EventAccumulator(str(tiled[1] / "learn" / "train" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    cells = {f"val/{i}{j}" for i in range(3) for j in range(3)}
    assert {"train/loss", "val/loss", "val/accuracy", "lr", "train/images_per_s"} | cells <= scalars
    assert {"augment/before", "augment/after"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Scalars("val/loss")] == [1, 2, 3, 4]
    confusion = sum(events.Scalars(c)[-1].value for c in cells)
    assert confusion == len(__import__("lymphoma.phase_tiles", fromlist=["PhaseTiles"]).PhaseTiles(
        __import__("lymphoma.sharding", fromlist=["phase_shards"]).phase_shards(tiled[1] / "learn" / "tiles", "val")))
    best = load_checkpoint(tiled[1] / "learn" / "train" / "checkpoints" / "best.pt")
    assert best["epoch"] == summary["best_epoch"] and best["classes"] == ["CLL", "FL", "MCL"]
    assert best["tiles"]["size"] == 64 and best["augment"]["crop"] == 56
    for key in ("optimizer", "scheduler", "rng", "config", "architecture"):
        assert key in best

    out = tiled[1] / "learn" / "validate"
    result = validate(tiled[1] / "learn" / "train" / "checkpoints" / "best.pt", tiled[1] / "learn" / "tiles", "val",
                      out, layer="features.denseblock2")
    for name in ("tiles.csv", "confusion.json", "confusion.png", "augment.png", "kernels.png", "activations.png"):
        assert (out / name).stat().st_size > 0
    rows = (out / "tiles.csv").read_text().splitlines()
    assert len(rows) == result["tiles"] + 1 and rows[0].startswith("index,filename,case,truth,predicted,logit_CLL")
    assert sum(map(sum, result["confusion"])) == result["tiles"]
    _tile_accuracy_intervals_resample_cases(out / "tiles.csv", result)
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)  # far from the run: the checkpoint's path names its run folder, whose tiles it validates
    checkpoints = tiled[1] / "learn" / "train" / "checkpoints"
    assert main(["validate", "--checkpoint", str(checkpoints / "best.pt")]) == 0
    assert (out / "best-val" / "tiles.csv").read_text().splitlines() == rows and not (tmp_path / "runs").exists()
    assert main(["validate", "--checkpoint", str(checkpoints / "last.pt"), "--phase", "train"]) == 0
    assert (out / "best-val" / "tiles.csv").read_text().splitlines() == rows  # another checkpoint and phase: beside it
    train_cases = {row.split(",")[2] for row in (out / "last-train" / "tiles.csv").read_text().splitlines()[1:]}
    assert train_cases and train_cases.isdisjoint(row.split(",")[2] for row in rows[1:])


def _tile_accuracy_intervals_resample_cases(tiles_csv: Path, result: dict) -> None:
    """validate's intervals are the case bootstrap of its own tiles.csv (a tile a record), saved with the figures."""
    import csv

    import numpy as np

    from lymphoma.case_bootstrap import bootstrap_intervals
    from lymphoma.cohort_report import probability_record

    classes = result["classes"]
    with tiles_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    records = [probability_record(np.array([float(r[f"prob_{c}"]) for c in classes]), classes, label=r["truth"],
                                  case=r["case"]) for r in rows]
    assert [r["majority_class"] for r in records] == [r["predicted"] for r in rows]
    drawn = bootstrap_intervals(records, classes, "vote", 2000, 0.95)
    assert result["cases"] == len({r["case"] for r in rows}) > 1 and result["bootstrap"] == 2000
    for figure in ("accuracy", "balanced_accuracy"):
        low, high = result["interval"][figure]
        assert [low, high] == drawn[f"image_{figure}"] and low <= result[figure] <= high and low < high
    assert json.loads((tiles_csv.parent / "confusion.json").read_text())["interval"] == result["interval"]


def train_in_a_process(tiled: tuple[Path, Path], name: str, settings: list[str]
                       ) -> tuple[list[str], subprocess.Popen, Path]:
    """Lay out run ``name``'s tiles and start `lymphoma train` on it in a real process of its own process group:
    the command, the process and the run's checkpoints folder."""
    config_for(tiled, name, *settings)  # lay out the tiles
    source, runs = tiled
    command = [sys.executable, "-m", "jobs.cli", "train", f"data.source={source}", f"run.root={runs}",
               f"run.name={name}", *FAST, *settings]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return command, proc, runs / name / "train" / "checkpoints"


def killed_and_resumed(tiled: tuple[Path, Path], name: str, epochs: list[str]) -> None:
    """Train run ``name`` in a real process, kill -9 its process group once epoch 1 is checkpointed, then run
    the same command again to the end."""
    command, proc, checkpoints = train_in_a_process(tiled, name, epochs)
    last = checkpoints / "last.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(last)["epoch"] < 2  # killed before the end
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert load_checkpoint(last)["epoch"] == 2 and len(load_checkpoint(last)["history"]) == 3


def history_of(runs: Path, name: str) -> list[dict]:
    state = load_checkpoint(runs / name / "train" / "checkpoints" / "last.pt")
    return [{k: v for k, v in h.items() if k != "images_per_s"} for h in state["history"]]


@pytest.mark.parametrize("backend", ["dali", "torch", "batch"])
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiled, backend):
    """kill -9 in epoch 2 of 3, then resume: bit-identical to the uninterrupted run, with each augmentation
    backend, with 2 loader workers (they keep running between epochs: their random streams must not).

    Up to 3 attempts, each a fresh uninterrupted run and a fresh killed one. Now and then a fresh CPU process
    trains a few ulps away from the others on the same inputs and starting weights, before any kill (3 of about
    200 processes, 2 of the 15 that printed hashes or nothing, all beside a CI run; in the one caught with its
    gradients, the first step's gradients were equal): the losses part by 1e-8 in epoch 1 and 1e-3 by epoch 3.
    That lands in one attempt and not the next; a resume that does not restore the run differs in every attempt."""
    epochs = ["train.epochs=3", "train.max_steps_per_epoch=6", "train.deterministic=true",
              f"augment.backend={backend}", "train.num_workers=2"]
    runs, mismatches = tiled[1], []
    for attempt in range(3):
        straight, killed = f"straight-{backend}-{attempt}", f"killed-{backend}-{attempt}"
        run_train(config_for(tiled, straight, *epochs))
        killed_and_resumed(tiled, killed, epochs)
        resumed, uninterrupted = history_of(runs, killed), history_of(runs, straight)
        if resumed == uninterrupted:
            break
        mismatches.append([resumed, uninterrupted,
                           started_lines(runs, straight) + started_lines(runs, killed)])  # threads, loaders
    else:
        pytest.fail(f"every attempt's resumed run differs from its uninterrupted one: {mismatches}")
    assert final_digest(runs, killed) == final_digest(runs, straight)


def killed_inside_an_epoch(tiled: tuple[Path, Path], name: str, settings: list[str], steps_per_epoch: int) -> int:
    """Train run ``name`` in a real process, kill -9 its process group once ``partial.pt`` holds step 3 or later of
    epoch 2, and run the same command again to the end; the steps of epoch 2 done when it was killed."""
    command, proc, checkpoints = train_in_a_process(tiled, name, settings)
    partial = checkpoints / "partial.pt"
    deadline, steps = time.monotonic() + 300, 0
    while time.monotonic() < deadline and proc.poll() is None and steps < 3:
        mid = load_checkpoint(partial).get("mid_epoch", {}) if partial.exists() else {}
        steps = mid["steps"] if mid.get("epoch") == 1 else 0
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(partial)["mid_epoch"]
    assert killed_at["epoch"] == 1 and 3 <= killed_at["steps"] < steps_per_epoch, killed_at  # inside epoch 2 of 2
    assert killed_at["order"] == {"seed": 0, "sampling": "cases", "samples_per_epoch": 32 * steps_per_epoch}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not partial.exists()  # its epoch is in last.pt
    return killed_at["steps"]


@pytest.mark.parametrize("backend, processes, steps", [("torch", 1, 8), ("batch", 1, 8), ("batch", 2, 30)])
def test_a_run_killed_inside_an_epoch_goes_on_from_its_step_to_the_same_weights(tiled, backend, processes, steps):
    """An epoch longer than a SLURM time limit never ended: train.checkpoint_every_min (0 here: as often as it asks,
    after every step in one process, every 10th in two, which agree then) writes partial.pt inside epochs. kill -9 in
    the middle of epoch 2 of 2, rerun: it goes on from that step, not the epoch's start, and ends with the history
    and weights of the uninterrupted run (tile order, per-tile and per-batch augmentation draws, dropout, loss sums;
    with 2 DDP processes, each one's). Up to 3 attempts, as the test above."""
    settings = ["train.epochs=2", f"train.max_steps_per_epoch={steps}", "train.deterministic=true",
                f"augment.backend={backend}", f"train.num_workers={2 // processes}", "train.checkpoint_every_min=0",
                f"cluster.tasks_per_node={processes}", f"train.samples_per_epoch={2 * 16 * steps}"]  # steps each
    runs, mismatches = tiled[1], []
    for attempt in range(3):
        straight, killed = f"straight-mid-{backend}{processes}-{attempt}", f"killed-mid-{backend}{processes}-{attempt}"
        run_train(config_for(tiled, straight, *settings))
        done = killed_inside_an_epoch(tiled, killed, settings, steps)
        starts = started_lines(runs, killed)  # the killed run's, then the rerun's
        assert any(f"from epoch 2 of 2, step {done + 1} (partial.pt)" in line for line in starts), starts
        resumed, uninterrupted = history_of(runs, killed), history_of(runs, straight)
        if resumed == uninterrupted:
            break
        mismatches.append([resumed, uninterrupted])
    else:
        pytest.fail(f"every attempt's resumed run differs from its uninterrupted one: {mismatches}")
    assert final_digest(runs, killed) == final_digest(runs, straight)


def test_a_mid_epoch_checkpoint_is_passed_over_when_stale_damaged_or_of_another_process_count_or_order(
        tiled, local_ddp, tmp_path, caplog):
    """partial.pt continues the epoch after last.pt only where it was written by as many processes as resume it
    (each had its own place in the epoch) and drew the epoch's tiles in the same order (its place is a number of
    positions in that order: with another train.seed, sampling or samples_per_epoch it skipped tiles never trained
    and trained others twice); one of an epoch already in last.pt (killed between the two writes) or one that
    cannot be read is passed over for last.pt, never an error."""
    last = load_checkpoint(tiled[1] / "ddp" / "train" / "checkpoints" / "last.pt")  # 2 processes, epoch 1 of 1
    folder = tmp_path / "checkpoints"
    save_checkpoint(last, folder / "last.pt")
    ranks = [{"rng": rng, "total": torch.zeros(2, dtype=torch.float64), "augment": {}, "adversary": None}
             for rng in last["rng"]]
    order = epoch_order(0, "cases", 2048)
    mid = {"epoch": last["epoch"] + 1, "steps": 2, "tiles": 32, "seconds": 1.0, "ranks": ranks, "order": order}
    save_checkpoint({**last, "mid_epoch": mid}, folder / "partial.pt")
    state, path = resume_point(folder, 2, order)
    assert path == folder / "partial.pt" and state["mid_epoch"]["steps"] == 2
    assert resume_point(folder, 2, epoch_order(0, "cases", 2048))[1] == folder / "partial.pt"
    assert epoch_order(0, "tiles", 2048) == epoch_order(0, "tiles", None)  # samples_per_epoch: with cases only
    with caplog.at_level(logging.WARNING):
        assert resume_point(folder, 1, order)[1] == folder / "last.pt"
        assert "was written by 2 process(es) and this job has 1" in caplog.text
        for other, words in [(epoch_order(1, "cases", 2048), "train.seed=0, now 1"),
                             (epoch_order(0, "tiles", 2048), "train.sampling=cases, now tiles"),
                             (epoch_order(0, "cases", 4096), "train.samples_per_epoch=2048, now 4096")]:
            caplog.clear()
            assert resume_point(folder, 2, other)[1] == folder / "last.pt"
            assert f"drawn with other settings ({words}" in caplog.text, caplog.text
        save_checkpoint({**last, "mid_epoch": {**mid, "epoch": last["epoch"]}}, folder / "partial.pt")
        assert resume_point(folder, 2, order)[1] == folder / "last.pt"
        (folder / "partial.pt").write_bytes(b"not a checkpoint")
        assert resume_point(folder, 2, order)[1] == folder / "last.pt"
        assert "the epoch starts over from last.pt" in caplog.text


def test_a_signal_during_a_checkpoint_write_is_handled_after_it_and_the_file_is_whole(tmp_path):
    """SLURM's signal before a time limit (or a preemption) comes at any moment, and submitit's handler requeues and
    exits. Arriving while torch.save wrote, it cut the file short and the writer's error took the place of the
    exit (the task failed instead of being requeued, on the local cluster): the handler now runs after the write."""
    target, handled = tmp_path / "last.pt", []

    def handler(signum: int, frame: object) -> None:
        handled.append(target.is_file())
        raise SystemExit(-1)  # as submitit's does

    previous = signal.signal(signal.SIGUSR2, handler)
    state = {"model": torch.arange(64 * 2**20, dtype=torch.float32)}  # 256 MiB: a write of a good part of a second
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        timer.start()
        with pytest.raises(SystemExit):
            save_checkpoint(state, target)
    finally:
        timer.join()
        signal.signal(signal.SIGUSR2, previous)
    assert handled == [True]
    assert torch.equal(torch.load(target, weights_only=True)["model"], state["model"])


def test_tile_and_train_on_one_run_folder_exclude_each_other(tiled):
    """A `lymphoma tile` started under a running `lymphoma train` (a real process) is refused and leaves the
    shards alone; a training started while a tiling holds the tiles is refused too."""
    epochs = ["train.epochs=2", "train.max_steps_per_epoch=4"]
    run = config_for(tiled, "shared", *epochs)
    source, runs = tiled
    shards = {p: p.stat().st_mtime_ns for p in (runs / "shared" / "tiles").rglob("*.h5")}
    command = [sys.executable, "-m", "jobs.cli", "train", f"data.source={source}", f"run.root={runs}",
               "run.name=shared", *FAST, *epochs]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        line = ""
        while line != "" or proc.poll() is None:  # until the job is submitted (under the locks) or it ends
            line = proc.stdout.readline()
            if line.startswith("training job"):
                break
        assert line.startswith("training job"), line
        with pytest.raises(InputError, match=r"tiles in .*shared/tiles are in use \(a running `lymphoma train` reads"):
            run_tile(config_for(tiled, "shared", *epochs, "tiles.stride=32"), progress=False)
        assert proc.wait(timeout=600) == 0, proc.stdout.read()
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    with run.tiles_in_use(writing=True):
        with pytest.raises(InputError, match=r"`lymphoma tile` \(pid \d+\) is writing the tiles in .*; wait for it"):
            run_train(run)


def test_resume_refuses_a_checkpoint_trained_on_other_tiles_and_restart_keeps_the_old_one(tiled, caplog):
    caplog.set_level(logging.INFO)  # run_train, called as a library, logs (the CLI shows the records)
    run_train(config_for(tiled, "retile", "train.epochs=1", "train.max_steps_per_epoch=2"))
    last = tiled[1] / "retile" / "train" / "checkpoints" / "last.pt"
    first = load_checkpoint(last)["tiles_fingerprint"]
    run_tile(config_for(tiled, "retile", "tiles.stride=32"), progress=False)  # other tiles, same run folder
    more = config_for(tiled, "retile", "tiles.stride=32", "train.epochs=2", "train.max_steps_per_epoch=2")
    with pytest.raises(InputError, match=r"last.pt was trained on other tiles than .*retile/tiles holds now.*--restart"):
        run_train(more)
    assert load_checkpoint(last)["epoch"] == 0  # untouched
    run_train(more, restart=True)
    assert "restarting: the earlier training is kept in" in caplog.text
    kept = list((tiled[1] / "retile").glob("train.before-*/checkpoints/last.pt"))
    assert len(kept) == 1 and load_checkpoint(kept[0])["tiles_fingerprint"] == first
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and len(state["history"]) == 2 and state["tiles_fingerprint"] != first


def processes_mentioning(text: str) -> list[int]:
    """Pids of the live processes whose command line contains ``text`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal starts it, however pytest itself was started


def _sigint_ignored() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's `command &` starts it (no job control)


@pytest.mark.parametrize("stop, started", [(signal.SIGTERM, "plainly"), (signal.SIGINT, "plainly"),
                                           (signal.SIGTERM, "in the background")])
def test_stopping_the_command_stops_its_local_tasks(tiled, stop, started):
    """SIGTERM or SIGINT to `lymphoma train` alone (not its process group): it exits with 128 + the signal
    and a message, and no task process of its job outlives it; also when it was started with SIGINT ignored,
    which its task controllers would inherit (they stop their tasks on SIGINT)."""
    name = f"stopped-{stop.name.lower()}-{started.replace(' ', '-')}"
    config_for(tiled, name)
    source, runs = tiled
    command = [sys.executable, "-m", "jobs.cli", "train", f"data.source={source}", f"run.root={runs}",
               f"run.name={name}", *FAST, "train.epochs=500"]
    logs = str(runs / name / "train" / "logs")
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_sigint_default if started == "plainly" else _sigint_ignored) as proc:
        deadline = time.monotonic() + 120
        while not processes_mentioning(logs) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert processes_mentioning(logs), "the training task never started"
        time.sleep(1)
        proc.send_signal(stop)
        try:
            out, err = proc.communicate(timeout=60)
            deadline = time.monotonic() + 15
            while processes_mentioning(logs) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = processes_mentioning(logs)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err, left = "the command did not stop within 60 s\n" + err, processes_mentioning(logs)
        finally:
            for pid in processes_mentioning(logs):  # never leave a 500-epoch training behind for the next tests
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + stop, err
    assert "stopped" in err and "its local tasks were stopped too" in err
    assert left == []


def test_a_full_disk_under_the_checkpoints_is_one_error_and_a_rerun_with_room_trains(tiled, small_disk, capsys):
    """train/ on 4 MiB, a checkpoint of about 7: the task fails with one error naming the checkpoints' folder and
    the size needed (torch's own was 'unexpected pos', and its writer, left open, kept the disk full, so that the
    task could not record why it failed: the user saw a stray HDF5 warning instead); no temporary file is left,
    no shard left open; with room, a rerun trains."""
    from jobs.cli import main

    run = config_for(tiled, "full-disk")
    (run.dir / "train").symlink_to(small_disk)
    words = ["train", f"data.source={tiled[0]}", f"run.root={tiled[1]}", "run.name=full-disk", *FAST,
             "train.epochs=1", "train.max_steps_per_epoch=1", "cluster.poll_s=0.1"]
    assert main(words) == 1
    err = capsys.readouterr().err
    checkpoints = run.dir / "train" / "checkpoints"
    assert f"DiskFullError: no space left in {checkpoints} (" in err and "last.pt: about" in err, err
    task_logs = list((small_disk / "logs").rglob("*_log.*"))
    assert task_logs and not any("UnclosedFileWarning" in path.read_text() for path in task_logs)
    assert not list(small_disk.rglob("*.tmp-*"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(words) == 0
    assert load_checkpoint(checkpoints / "last.pt")["classes"] == ["CLL", "FL", "MCL"]


def test_a_command_killed_outright_leaves_no_task_behind(tiled):
    """kill -9 of `lymphoma train` (no handler of its own runs: the OOM killer's way, or a closed session's): its
    local task notices within seconds, says why in its log and stops, and submitit's controller (meant to outlive
    the session that started it) ends with it. Before, the training ran on, and a rerun of the same command
    trained beside it into the same checkpoints."""
    name = "killed-outright"
    config_for(tiled, name)
    source, runs = tiled
    command = [sys.executable, "-m", "jobs.cli", "train", f"data.source={source}", f"run.root={runs}",
               f"run.name={name}", *FAST, "train.epochs=500"]
    logs = runs / name / "train" / "logs"
    with subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          preexec_fn=_sigint_default) as proc:
        deadline = time.monotonic() + 120
        while len(processes_mentioning(str(logs))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(processes_mentioning(str(logs))) == 2, "the controller and its training task never started"
        time.sleep(1)
        proc.kill()
    deadline = time.monotonic() + 45
    while processes_mentioning(str(logs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_mentioning(str(logs))
    for pid in left:  # never leave a 500-epoch training behind for the next tests
        os.kill(pid, signal.SIGKILL)
    assert left == []
    told = [path for path in logs.rglob("*_log.out") if "the command that started this task" in path.read_text()]
    assert len(told) == 1 and "is gone: this task stops too" in told[0].read_text()


def test_bad_training_input_gets_clear_errors(tiled, tmp_path, caplog):
    with pytest.raises(InputError, match="stores hold 64-px tiles but tiles.size is 96"):
        run_train(config_for(tiled, "size", "tiles.size=96", "train.epochs=1"))
    with pytest.raises(InputError, match="augment.crop=80 is larger than tiles.size=64"):
        run_train(config_for(tiled, "crop", "augment.crop=80", "train.epochs=1"))
    with pytest.raises(InputError, match="augment.crop=80 is larger than the stored 64-px tiles"):  # another config's
        open_phase(tiled[1] / "base" / "tiles", "train", None, 80)
    run_train(config_for(tiled, "arch", "train.epochs=1", "train.max_steps_per_epoch=1"))
    run_train(config_for(tiled, "arch", "train.epochs=1", "train.max_steps_per_epoch=1", "train.lr=0.01"))
    assert any(r.levelname == "WARNING" and "with changed settings ['train.lr']; to train afresh with them, use "
               "another run.name" in r.getMessage() for r in caplog.records)
    assert not any("learning-rate schedule" in r.getMessage() for r in caplog.records)
    run_train(config_for(tiled, "arch", "train.epochs=2", "train.max_steps_per_epoch=1", "train.lr=0.01",
                         "train.scheduler=cosine"))  # a finished cosine schedule, stretched to 2 epochs
    assert any(r.levelname == "WARNING" and "(epoch 1 of 1 done) with train.epochs=2: the cosine learning-rate "
               "schedule is laid over 2 epochs" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="holds another architecture"):
        run_train(config_for(tiled, "arch", "train.epochs=2", "model.preset=densenet121"))
    with pytest.raises(InputError, match="not found"):
        validate(tmp_path / "none.pt", tiled[1] / "base" / "tiles", "val", tmp_path / "v")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt cannot be read: it is no PyTorch checkpoint: a file of 16 bytes "
                                         "that begins b'not a ch'; use another"):
        validate(tmp_path / "bad.pt", tiled[1] / "base" / "tiles", "val", tmp_path / "v")
    whole = (tiled[1] / "arch" / "train" / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])  # a copy cut short
    with pytest.raises(InputError, match=f"cut.pt cannot be read: it is damaged or cut short \\({len(whole) // 2:,} "):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save(torch.nn.Linear(2, 3), tmp_path / "pickled.pt")  # a whole module pickled, as other programs save
    with pytest.raises(InputError, match="pickled.pt cannot be read: it holds Python objects besides tensors"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="no 'test' phase"):
        run_train(config_for(tiled, "phase", "train.eval_phase=test", "train.epochs=1"))
    with pytest.raises(InputError, match="has no tile manifest"):
        run_train(open_run(None, [f"run.root={tmp_path}", "run.name=empty"]))


def test_a_class_absent_from_training_is_an_error(tiled, tmp_path):
    source = tmp_path / "two-classes"
    for label in ("CLL", "FL"):
        shutil.copytree(tiled[0] / label, source / label)
    cfg = open_run(None, [f"data.source={source}", f"run.root={tmp_path}", "run.name=absent", *FAST,
                             "train.epochs=1"])
    run_tile(cfg, progress=False)
    with pytest.raises(InputError, match=r"\['MCL'\] have no training tiles"):
        run_train(cfg)


def test_mpiexec_launches_two_training_ranks(tiled, local_ddp):
    config_for(tiled, "mpi")
    source, runs = tiled
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT", "SLURM"))}
    out = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-m", "jobs.cli", "train", "--here",
                          f"data.source={source}", f"run.root={runs}", "run.name=mpi", *FAST, *DDP_STEPS],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("best epoch 1") == 1  # rank 0 alone reports
    assert final_digest(runs, "mpi") == final_digest(runs, "ddp")  # the same as the local 2-process run


def _history(losses, balanced=None):
    balanced = balanced or [0.5] * len(losses)
    return [{"epoch": i, "val_loss": v, "val_balanced_accuracy": b} for i, (v, b) in enumerate(zip(losses, balanced))]


@pytest.mark.parametrize("losses, patience, stop", [([1.0, 0.9, 0.95, 0.97], 2, True), ([1.0, 0.9, 0.95], 2, False),
                                                     ([1.0, 0.9, 0.8], 1, False), ([0.5, 0.9], 1, True),
                                                     ([0.5, 0.9, 0.9], None, False)])
def test_early_stopping_counts_epochs_without_a_better_val_loss(losses, patience, stop):
    from lymphoma.selection import stop_early

    assert stop_early(_history(losses), patience, "loss") is stop


def test_selection_cannot_keep_a_one_class_model():
    from lymphoma.selection import best_index, explain, stop_early

    # epoch 1 predicts one class (balanced accuracy 1/3) with the lowest loss, about ln 3
    history = _history([1.10, 1.60, 1.30, 1.45], [1 / 3, 0.55, 0.70, 0.70])
    assert best_index(history, "loss") == 0
    assert best_index(history, "balanced_accuracy") == 2  # tie at 0.70: the lower loss
    assert best_index(history, "last") == 3
    assert best_index(history, "balanced_accuracy", min_epochs=4) == 3 and best_index(history[:2], "loss", 3) is None
    assert "highest val balanced accuracy 0.700" in explain(history, "balanced_accuracy", 1)
    assert not stop_early(history, 1, "last") and not stop_early(history[:2], 1, "loss", min_epochs=3)
    assert stop_early(history + _history([2.0], [0.4]), 2, "balanced_accuracy")


def test_the_epoch_bar_reads_the_histories_that_trainings_write(tmp_path):
    """The bar of `lymphoma train` and `cv` counts the epochs in each training's history.json: a training that
    stopped early counts as complete, one not started or caught mid-write as none, one with more epochs than now
    asked (the setting lowered before a rerun) as complete; a resumed training starts the bar where it stopped."""
    import io

    from jobs.progress import EpochProgress, WatchedTraining
    from lymphoma.settings import TrainSettings

    patient = TrainSettings(epochs=5, patience=1, select="balanced_accuracy", min_epochs=1)
    histories = {"running": _history([1.0, 0.9], [0.5, 0.6]), "stopped": _history([1.0, 0.9], [0.6, 0.5]),
                 "longer": _history([1.0] * 7), "cut": None, "absent": None}
    trainings = []
    for name, history in histories.items():
        path = tmp_path / name / "history.json"
        path.parent.mkdir()
        if history is not None:
            path.write_text(json.dumps(history))
        trainings.append(WatchedTraining(path, patient if name != "longer" else TrainSettings(epochs=5)))
    (tmp_path / "cut" / "history.json").write_text('[{"epoch": 0, "val_lo')
    stream = io.StringIO()
    bar = EpochProgress(trainings, "cv (5 folds)", stream=stream)
    assert (bar.bar.n, bar.bar.total) == (2 + 5 + 5, 25)
    (tmp_path / "absent" / "history.json").write_text(json.dumps(_history([1.0, 0.8, 0.7], [0.4, 0.5, 0.6])))
    bar.poll()
    assert bar.bar.n == 15
    (tmp_path / "running" / "history.json").write_text(json.dumps(_history([1.0, 0.9, 0.8], [0.5, 0.6, 0.7])))
    bar.poll()  # files are read at most every 2 s: too soon
    assert bar.bar.n == 15
    bar.close()
    assert bar.bar.n == 16 and "16/25" in stream.getvalue().splitlines()[-1]
    stream = io.StringIO()
    single = EpochProgress(trainings[:1], "train", stream=stream)
    single.close()
    assert "3/5" in stream.getvalue() and "val loss 0.800, balanced accuracy 0.700" in stream.getvalue()
    stream = io.StringIO()
    silent = EpochProgress(trainings, "train", enabled=False, stream=stream)
    silent.close()
    assert silent.bar.disable and stream.getvalue() == ""


def test_train_on_a_terminal_shows_its_epochs_from_where_it_resumes(tiled):
    """`lymphoma train` waits for a task in another process; on a terminal its bar counts that task's epochs, a
    rerun that resumes starting where the first stopped."""
    from conftest import on_a_terminal

    name = "epoch-bar"
    config_for(tiled, name)
    source, runs = tiled
    command = [sys.executable, "-m", "jobs.cli", "train", f"data.source={source}", f"run.root={runs}",
               f"run.name={name}", *FAST, "train.max_steps_per_epoch=2", "cluster.poll_s=0.1"]
    bars = {}
    for epochs in (2, 3):
        code, printed = on_a_terminal([*command, f"train.epochs={epochs}"], timeout_s=300)
        assert code == 0, printed
        bars[epochs] = [line for line in printed.replace("\r", "\n").splitlines() if line.startswith("train:")]
    assert bars[2] and "| 0/2 " in bars[2][0] and "| 2/2 " in bars[2][-1], bars[2]
    assert "| 2/3 " in bars[3][0] and "| 3/3 " in bars[3][-1] and "balanced accuracy" in bars[3][-1], bars[3]
    from jobs.cli import build_parser

    for name in ("train", "cv", "run"):  # every command that waits for training takes it, as scripts pass it to all
        assert build_parser().parse_args([name, "--no-progress"]).no_progress


def test_bf16_autocast_trains_on_the_cpu_with_float32_weights(tiled):
    """train.amp=true on the CPU: the convolutions compute in bf16 (1.75x a step on a CPU with avx512_bf16, 8x
    slower emulated on one without bf16 units, which the log then warns of), the weights, their gradients and the
    checkpoint stay float32, and the loss falls as in float32."""
    import torch

    from lymphoma.epochs import _autocast
    from lymphoma.precision import cpu_has_bf16

    conv = torch.nn.Conv2d(3, 4, 3)
    with _autocast(torch.device("cpu"), True):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16
    with _autocast(torch.device("cpu"), False):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.float32
    summary = run_train(config_for(tiled, "amp", "train.amp=true", "train.epochs=2", "train.max_steps_per_epoch=6",
                                   "train.lr=0.002", *PLAIN))[0]
    history = json.loads((tiled[1] / "amp" / "train" / "history.json").read_text())
    assert summary["epochs"] == 2 and history[-1]["train_loss"] < history[0]["train_loss"]
    state = load_checkpoint(tiled[1] / "amp" / "train" / "checkpoints" / "last.pt")
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    assert state["training_precision"] == "bf16"
    task_log = "".join(p.read_text() for p in (tiled[1] / "amp" / "train" / "logs").rglob("*_log.*"))
    assert ("train.amp=true: this CPU has no bf16 units" in task_log) == (not cpu_has_bf16())  # 8x slower there


def test_amp_auto_is_bf16_on_cpus_with_bf16_units_only(tiled):
    """train.amp=auto (the default config's): bf16 where this CPU computes it in hardware (avx512_bf16 or AMX, read
    from the CPU), float32 on GPUs and on other CPUs; the log and the checkpoint say which ran."""
    import torch

    from lymphoma.epochs import bf16_training
    from lymphoma.precision import cpu_has_bf16

    flags = set(open("/proc/cpuinfo").read().split())
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert bf16_training("auto", torch.device("cpu")) == cpu_has_bf16()
    assert not bf16_training("auto", torch.device("cuda")) and bf16_training(True, torch.device("cuda"))
    assert not bf16_training(False, torch.device("cpu"))
    run_train(config_for(tiled, "auto", "train.amp=auto", "train.epochs=1", "train.max_steps_per_epoch=2", *PLAIN))
    task_log = "".join(p.read_text() for p in (tiled[1] / "auto" / "train" / "logs").rglob("*_log.*"))
    state = load_checkpoint(tiled[1] / "auto" / "train" / "checkpoints" / "last.pt")
    ran = "bf16" if cpu_has_bf16() else "fp32"
    assert state["training_precision"] == ran
    assert f"{'bf16 autocast' if ran == 'bf16' else 'float32'} (train.amp=auto)" in task_log


def test_new_training_options_are_checked():
    from jobs.config import ConfigError, load_config, to_object

    for override, message in (("train.label_smoothing=1.0", "label_smoothing must be in"),
                              ("train.patience=0", "train.patience must be >= 1"),
                              ("train.amp=fast", "train.amp is 'fast'; allowed: true, false, auto"),
                              ("model.preset=densenet12", "model.preset is 'densenet12'; allowed: densenet-reduced, "
                                                          "densenet121, custom"),
                              ("predict.aggregate=median", "predict.aggregate is 'median'; allowed: vote, mean"),
                              ("cv.folds=1", "cv.folds must be >= 2"),
                              ("cv.inner_val_fraction=0", "never on the test fold"),
                              ("train.select=accuracy", "train.select is 'accuracy'; allowed: balanced_accuracy, loss, last"),
                              ("train.sampling=slides", "allowed: tiles, cases"),
                              ("train.min_epochs=0", "train.min_epochs must be >= 1"),
                              ("train.ema=1.5", "train.ema must be in"),
                              ("train.warmup_epochs=-1", "train.warmup_epochs >= 0"),
                              ("train.cache=disk", "train.cache is 'disk'; allowed: auto, device, memory, none"),
                              ("train.mix=cutout", "train.mix is 'cutout'; allowed: none, mixup, cutmix"),
                              ("train.mix_alpha=0", "train.mix_alpha must be > 0")):
        with pytest.raises(ConfigError, match=message):
            to_object(load_config(None, [override]))


def test_case_balanced_sampling_weighs_classes_and_cases_equally():
    import numpy as np

    from lymphoma.loaders import CaseBalancedSampler, case_balanced_weights

    labels = np.array([0] * 90 + [0] * 10 + [1] * 20 + [2] * 5)       # class 0: one case of 90 tiles, one of 10
    cases = np.array(["a"] * 90 + ["b"] * 10 + ["c"] * 20 + ["d"] * 5)
    w = case_balanced_weights(labels, cases)
    assert w.sum() == pytest.approx(1.0)
    for label in range(3):
        assert w[labels == label].sum() == pytest.approx(1 / 3)
    assert w[cases == "a"].sum() == pytest.approx(w[cases == "b"].sum()) == pytest.approx(1 / 6)
    ranks = [CaseBalancedSampler(labels, cases, 3000, rank, 2, seed=5) for rank in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    draws = [list(s) for s in ranks]
    assert len(draws[0]) == len(draws[1]) == 1500
    drawn = np.array(draws[0] + draws[1])
    assert abs(np.isin(drawn, np.flatnonzero(cases == "b")).mean() - 1 / 6) < 0.03  # the small case is not drowned
    assert draws[0] == list(ranks[0])  # the same epoch draws the same tiles
    ranks[0].set_epoch(4)
    assert draws[0] != list(ranks[0])


def test_ema_weights_are_what_training_keeps_and_resumes(tiled):
    """With train.ema, best.pt holds the averaged weights (not the last step's), and a resumed run continues
    the same average."""
    import torch

    epochs = ["train.epochs=2", "train.max_steps_per_epoch=4", "train.deterministic=true", "train.ema=0.9",
              "train.sampling=cases", "train.samples_per_epoch=64", "train.select=last", "train.scheduler=none",
              "train.warmup_epochs=0"]  # the same learning rate whatever train.epochs, so 1 + 1 epochs = 2
    run_train(config_for(tiled, "ema", *epochs))
    state = load_checkpoint(tiled[1] / "ema" / "train" / "checkpoints" / "last.pt")
    assert state["averaged"]["n_averaged"].item() == 8  # 2 epochs x 4 steps
    kept = {k: v for k, v in state["model"].items() if v.is_floating_point()}
    raw = state["train_model"]
    assert any(not torch.equal(kept[k], raw[k]) for k in kept)
    one = config_for(tiled, "ema-resumed", *epochs[1:], "train.epochs=1")
    run_train(one)
    run_train(config_for(tiled, "ema-resumed", *epochs))
    assert final_digest(tiled[1], "ema-resumed") == final_digest(tiled[1], "ema")


def _read_phase_as_rank(rank: int, tiles_dir: str, port: int, out: str) -> None:
    """One of two gloo processes: the cache mode the two agree on, and the phase read together, stain-normalised."""
    import hashlib

    import numpy as np
    import torch
    import torch.distributed as dist

    from lymphoma.stain import StainNormalizer, StainSettings, fit_target
    from lymphoma.tile_cache import agreed_cache, read_phase
    from lymphoma.training import open_phase

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    normalizer, calls = StainNormalizer(fit_target(StainSettings("reinhard"))), []

    def step(tile: np.ndarray) -> torch.Tensor:
        calls.append(1)
        return torch.from_numpy(normalizer(tile))

    mode = agreed_cache(("memory", "none")[rank], torch.device("cpu"))
    phase = open_phase(Path(tiles_dir), "train", None, 56)
    pixels = read_phase(phase, step, 0)
    phase.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "mode": mode, "steps": len(calls), "sha1": hashlib.sha1(pixels.numpy().tobytes()).hexdigest()}))
    dist.destroy_process_group()


def test_processes_of_a_job_share_the_reading_of_a_cached_phase(tiled, tmp_path):
    """Two gloo processes each stain-normalise half of the phase and pool the halves: both hold exactly what one
    process reading it alone holds, with half the work each; a process that cannot cache makes neither cache."""
    import hashlib
    import socket

    import torch.multiprocessing as mp

    from lymphoma.stain import StainNormalizer, StainSettings, fit_target
    from lymphoma.tile_cache import read_phase
    from lymphoma.training import open_phase

    tiles_dir = tiled[1] / "base" / "tiles"
    normalizer = StainNormalizer(fit_target(StainSettings("reinhard")))
    phase = open_phase(tiles_dir, "train", None, 56)
    alone = read_phase(phase, lambda t: torch.from_numpy(normalizer(t)), 0).numpy()
    phase.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_read_phase_as_rank, args=(str(tiles_dir), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["sha1"] for r in ranks} == {hashlib.sha1(alone.tobytes()).hexdigest()}
    assert [r["steps"] for r in ranks] == [-(-len(phase) // 2), len(phase) // 2]
    assert {r["mode"] for r in ranks} == {"none"}


@pytest.mark.parametrize("backend", ["batch", "dali"])
def test_tiles_cached_in_memory_train_exactly_as_tiles_read_by_loader_processes(tiled, backend):
    """train.cache=memory (what auto picks here for batch augmenters) gathers the same batches in the same order
    as loader processes reading the shards: same history and bit-identical weights; the loaders say where they
    read. Asking for the GPU cache on a CPU is an error naming the alternatives."""
    import torch

    from lymphoma.loaders import make_loader
    from lymphoma.phase_tiles import PhaseTiles
    from lymphoma.sharding import phase_shards
    from lymphoma.tile_cache import CachedLoader, choose_cache

    common = ["train.epochs=2", "train.max_steps_per_epoch=5", "train.deterministic=true", f"augment.backend={backend}",
              "train.num_workers=2"]
    digests, histories = {}, {}
    for cache in ("none", "memory"):
        name = f"cache-{cache}-{backend}"
        run_train(config_for(tiled, name, *common, f"train.cache={cache}"))
        digests[cache] = final_digest(tiled[1], name)
        histories[cache] = [{k: v for k, v in h.items() if k != "images_per_s"}
                            for h in json.loads((tiled[1] / name / "train" / "history.json").read_text())]
        task_logs = "".join(p.read_text() for p in (tiled[1] / name / "train" / "logs").rglob("*_log.*"))
        assert ("tiles read from memory" if cache == "memory" else "tiles read by loader processes") in task_logs
    assert digests["none"] == digests["memory"] and histories["none"] == histories["memory"]
    tiles = PhaseTiles(phase_shards(tiled[1] / "base" / "tiles", "train"))
    for train in (True, False):
        read = make_loader(tiles, None, 7, 0, 1, train, 3, 2, train, 40)
        cached = make_loader(tiles, None, 7, 0, 1, train, 3, 2, train, 40, cache="memory")
        assert isinstance(cached, CachedLoader) and len(cached) == len(read)
        for (a, la), (b, lb) in zip(read, cached, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    tiles.close()
    assert choose_cache("auto", tiles.nbytes, torch.device("cpu"), True) == "memory"
    assert choose_cache("auto", 10**15, torch.device("cpu"), True) == "none"
    with pytest.raises(InputError, match="train.cache=device needs a GPU.*use train.cache=memory or auto"):
        choose_cache("device", tiles.nbytes, torch.device("cpu"), True)
