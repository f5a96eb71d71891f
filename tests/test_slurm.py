"""On a real SLURM cluster (hpc/local_cluster/start.sh): the tiling array, failures and cancellation."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import submitit

from conftest import read_shards
from hpc import ArrayJobError, ExecutorSettings, make_executor, run_array
from hpc_tasks import hold_memory, record_span, sleep_for
from jobs.tile import run_tile
from lymphoma.sharding import load_manifest, phase_shards

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster", "tasks_importable")]
SMALL = ["cluster.cpus_per_task=1", "cluster.mem_gb=3",  # tasks peak near 1.1 GB (sacct MaxRSS)
         "cluster.timeout_min=10", "cluster.poll_s=0.2"]


@pytest.fixture(autouse=True)
def fast_failures(monkeypatch):
    """submitit waits 15 s for a result file that will never come; 2 s is enough on one machine."""
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 2)


def sacct_tasks(job_name: str) -> list[tuple[str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--name", job_name, "-o", "JobID,State"],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.split()]


def settled_tasks(job_name: str, expected: int, limit_s: float = 90) -> list[tuple[str, str]]:
    """The job's ``expected`` tasks once none is pending or running: accounting (slurmdbd) records a task a
    moment after the task wrote its result, which is when the caller went on."""
    deadline = time.monotonic() + limit_s
    while True:
        tasks = sacct_tasks(job_name)
        settled = len(tasks) >= expected and not {s for _, s in tasks} & {"PENDING", "RUNNING", "COMPLETING"}
        if settled or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def test_tiling_array_has_one_task_per_shard_and_matches_the_local_run(make_dataset, make_config):
    source = make_dataset(2, 3)
    name = f"on-slurm-{uuid.uuid4().hex[:8]}"  # job names are unique across runs of the suite
    slurm = run_tile(make_config(source, f"run.name={name}", *SMALL, cluster="slurm"), progress=False)
    local = run_tile(make_config(source, "run.name=on-local"), progress=False)
    n_shards = len(slurm.summaries)
    tasks = settled_tasks(f"tile-{name}", n_shards)
    assert len(tasks) == n_shards and {state for _, state in tasks} == {"COMPLETED"}
    assert len({job_id.split("_")[0] for job_id, _ in tasks}) == 1  # one array job
    assert sorted(int(job_id.split("_")[1]) for job_id, _ in tasks) == list(range(n_shards))
    assert load_manifest(slurm.manifest)["phases"].keys() == load_manifest(local.manifest)["phases"].keys()
    for phase in load_manifest(local.manifest)["phases"]:
        a, b = read_shards(phase_shards(slurm.manifest, phase)), read_shards(phase_shards(local.manifest, phase))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_failing_task_is_named_with_its_log_and_the_others_finish(tmp_path):
    settings = ExecutorSettings(kind="slurm", parallelism=3, timeout_min=5, mem_gb=0.5)
    executor = make_executor(settings, tmp_path / "logs" / "%j", name="fails")
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, record_span, [(str(tmp_path), i) for i in range(5)], parallelism=3, poll_s=0.2,
                  timeout_s=180)
    err = info.value
    assert [f.index for f in err.failures] == [3] and err.results == [0, 1, 4, None, 16]
    assert "ValueError: item 3 is bad on purpose" in str(err)
    assert err.failures[0].stderr.is_file() and "bad on purpose" in err.failures[0].stderr.read_text()
    assert f"task 3 (job {err.failures[0].job_id})" in str(err) and err.failures[0].job_id.endswith("_3")
    assert "of 'fails' failed" in str(err)


def most_at_once(folder) -> int:
    """The most tasks whose spans (``record_span``'s files) overlapped."""
    from pathlib import Path

    spans = [tuple(map(float, p.read_text().split()[:2])) for p in Path(folder).glob("*.span")]
    return max(sum(start <= t < end for start, end in spans) for t, _ in spans)


@pytest.mark.parametrize("parallelism", [4, 2])
def test_more_tasks_than_the_clusters_array_size_go_as_several_arrays_that_keep_the_parallelism(tmp_path,
                                                                                                 parallelism):
    """The local cluster takes 10 tasks in one array (MaxArraySize; 1001 on clusters by default), where sbatch
    refused 25 ("Invalid job array specification"): 3 arrays of 9, 8 and 8, results in the items' order, the
    failing item named by its index, the ledger remembering all three; never more than ``parallelism`` tasks at
    once (2 among 3 arrays: the third waits for the first)."""
    import json

    from hpc.array_limit import max_array_size

    assert max_array_size() == 10
    settings = ExecutorSettings(kind="slurm", parallelism=parallelism, timeout_min=5, mem_gb=0.5)
    name = f"split-{uuid.uuid4().hex[:8]}"  # job names are unique across runs of the suite
    executor = make_executor(settings, tmp_path / "logs" / "%j", name=name)
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, record_span, [(str(tmp_path), i) for i in range(25)], parallelism=parallelism,
                  poll_s=0.2, timeout_s=300, ledger=tmp_path / "slurm-job.json")
    err = info.value
    assert [f.index for f in err.failures] == [3] and "ValueError: item 3 is bad on purpose" in str(err)
    assert err.results == [i * i if i != 3 else None for i in range(25)]
    arrays = json.loads((tmp_path / "slurm-job.json").read_text())["job_ids"]
    tasks = settled_tasks(name, 25)
    assert len(arrays) == 3 and sorted({job.split("_")[0] for job, _ in tasks}) == sorted(arrays)
    assert sorted(sum(job.startswith(f"{array}_") for job, _ in tasks) for array in arrays) == [8, 8, 9]
    assert 1 < most_at_once(tmp_path) <= parallelism


def test_a_cap_on_queued_jobs_is_named_with_its_fix_and_leaves_no_array_behind(tmp_path):
    """The local cluster enforces limits as clusters do; its QOS "small" lets 12 jobs or array tasks be queued. 25
    tasks go as arrays of 9 and 8 (MaxArraySize 10), and sbatch refuses the second: the error quotes it and names
    the cap and what to do (it used to advise memory and partitions), and the first array is cancelled, not left
    to run with no ledger remembering it. An unknown QOS or account is named with its setting."""
    from hpc import SubmissionError, submit

    name = f"capped-{uuid.uuid4().hex[:8]}"
    settings = ExecutorSettings(kind="slurm", parallelism=2, timeout_min=5, mem_gb=0.5, qos="small")
    with pytest.raises(SubmissionError) as info:
        run_array(make_executor(settings, tmp_path / "logs" / "%j", name=name), record_span,
                  [(str(tmp_path), i) for i in range(25)], parallelism=2, poll_s=0.2, timeout_s=120,
                  ledger=tmp_path / "slurm-job.json")
    assert "refused the job: sbatch: error: QOSMaxSubmitJobPerUserLimit" in str(info.value)
    assert "fix: the cluster caps how many jobs you may have queued, and each array task counts as one" in \
        str(info.value) and not (tmp_path / "slurm-job.json").exists()
    states = set(subprocess.run(["squeue", "-h", "--name", name, "-t", "all", "-o", "%T"], capture_output=True,
                                text=True, check=True).stdout.split())  # sacct leaves out arrays never eligible
    assert "CANCELLED" in states and states <= {"CANCELLED", "COMPLETED"}, states
    for key, fix in (("qos", "set cluster.qos to a QOS you may use"), ("account", "set cluster.account to an account")):
        settings = ExecutorSettings(kind="slurm", timeout_min=5, mem_gb=0.5, **{key: "nosuch"})
        with pytest.raises(SubmissionError, match=re.escape(fix)):
            submit(make_executor(settings, tmp_path / "logs" / "%j", name=name), record_span, (str(tmp_path), 0))


def test_a_task_killed_for_memory_is_named_so_with_the_setting_to_raise(tiled, tmp_path):
    """The local cluster kills a step over its job's memory, as clusters do: the task is named as killed for
    memory with cluster.mem_gb and a value to give, not as srun's "task 0: Killed"; the task within its memory
    finishes. A training job (one task) alike."""
    from conftest import config_for
    from jobs.train import run_train

    settings = ExecutorSettings(kind="slurm", parallelism=2, timeout_min=5, mem_gb=0.25)
    executor = make_executor(settings, tmp_path / "logs" / "%j", name="greedy")
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, hold_memory, [(0, 0), (1000, 5)], parallelism=2, poll_s=0.2, timeout_s=180)
    assert [f.index for f in info.value.failures] == [1] and info.value.results == [0, None]
    message = info.value.failures[0].error
    assert message.startswith("MemoryError: SLURM killed the task for memory (it had reached ") and \
        "GB of the 0.25 GB its job asked for; ask for more, cluster.mem_gb=" in message, message
    with pytest.raises(ArrayJobError) as info:
        run_train(config_for(tiled, f"greedy-{uuid.uuid4().hex[:6]}", *SMALL, "cluster.mem_gb=0.3",
                             "train.epochs=1", "train.max_steps_per_epoch=2", cluster="slurm"))
    assert "MemoryError: SLURM killed the task for memory" in str(info.value) and "Killed" not in str(info.value)


def test_a_controller_that_stops_answering_is_said_and_the_wait_goes_on(tmp_path, caplog):
    """The SLURM controller stopped while a task runs (a restart, a maintenance), then started again: the command
    says once that it does not answer and once that it answers again, where it waited in silence, and the task,
    which ran on on its node, returns its result. While the controller is silent the wait looks at it every 30 s:
    each look blocks for the 18 s squeue takes to give up, and looks back to back would stop the wait between."""
    import os
    import signal
    from pathlib import Path

    pid_file = Path(os.environ.get("STATE_DIR", "/tmp/lymphoma-slurm")) / "slurmctld.pid"
    executor = make_executor(ExecutorSettings(kind="slurm", timeout_min=5, mem_gb=0.5), tmp_path / "logs" / "%j",
                             name="outage")
    started = tmp_path / "started"

    def outage() -> None:
        for _ in range(600):
            if started.exists():
                break
            time.sleep(0.1)
        os.kill(int(pid_file.read_text()), signal.SIGTERM)  # it saves its state and stops
        window.append(time.monotonic())
        try:
            time.sleep(45)  # squeue looks every 10 s, and takes 18 s to give up on a controller that is down
        finally:
            window.append(time.monotonic())
            subprocess.run(["/usr/sbin/slurmctld"], check=True)  # recovers its jobs from the saved state
            while subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
                time.sleep(0.2)

    window: list[float] = []
    polls: list[float] = []
    stopper = threading.Thread(target=outage)
    stopper.start()
    try:
        assert run_array(executor, sleep_for, [(str(started), 75)], poll_s=0.2, timeout_s=240,
                         on_poll=lambda: polls.append(time.monotonic())) == [None]
    finally:
        stopper.join()
    during = [window[0], *(t for t in polls if window[0] <= t <= window[1]), window[1]]
    stood_still = sum(b - a for a, b in zip(during, during[1:]) if b - a > 1)  # one look of 18 s, not back to back
    assert 15 < stood_still < 27, f"the wait stood still for {stood_still:.0f} s of the controller's 45"
    said = [r.getMessage() for r in caplog.records if "SLURM controller" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("the SLURM controller does not answer (") and \
        said[1] == "the SLURM controller answers again; waiting for the jobs goes on", said


def test_cancelled_job_surfaces_as_a_clear_state_not_a_hang(tmp_path):
    settings = ExecutorSettings(kind="slurm", timeout_min=5, mem_gb=0.5)
    name = f"cancelled-{uuid.uuid4().hex[:8]}"
    executor = make_executor(settings, tmp_path / "logs" / "%j", name=name)
    started = tmp_path / "started"

    def cancel_when_running() -> None:
        for _ in range(600):
            if started.exists():
                subprocess.run(["scancel", "--name", name], check=True)
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    begin = time.monotonic()
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, sleep_for, [(str(started), 300)], poll_s=0.2, timeout_s=120)
    canceller.join()
    assert time.monotonic() - begin < 100
    assert "CANCELLED" in str(info.value) and "TimeoutError" not in str(info.value)


def test_ddp_on_slurm_matches_the_local_run_as_1x2_and_2x1(tiled, local_ddp):
    from conftest import DDP_STEPS, config_for
    from jobs.train import run_train

    steps, local = [*DDP_STEPS, *SMALL], local_ddp
    for name, layout in (("slurm-1x2", ["cluster.tasks_per_node=2"]), ("slurm-2x1", ["cluster.nodes=2"])):
        results = run_train(config_for(tiled, f"{name}-{uuid.uuid4().hex[:6]}", *steps, *layout, cluster="slurm"))
        assert sorted(r["rank"] for r in results) == [0, 1]
        assert {r["weights_sha1"] for r in results} == {local[0]["weights_sha1"]}


def training_job_id(name: str, deadline: float) -> str:
    """The id of run ``name``'s training job, once the controller knows it (accounting knows it later)."""
    job_id = ""
    while not job_id and time.monotonic() < deadline:
        job_id = subprocess.run(["squeue", "-h", "--name", f"train-{name}", "-o", "%i"], capture_output=True,
                                text=True, check=True).stdout.strip()
        time.sleep(0 if job_id else 0.2)
    return job_id


def test_a_preempted_training_job_requeues_and_goes_on_from_inside_its_epoch(tiled):
    """SLURM's signal (a preemption, or the one before a time limit) in the middle of epoch 1: the job is requeued
    and goes on from the step of its mid-epoch checkpoint (train.checkpoint_every_min, 0 here: every step)."""
    from conftest import config_for
    from jobs.train import run_train
    from lymphoma.checkpoint import load_checkpoint

    name = f"requeue-{uuid.uuid4().hex[:6]}"
    cfg = config_for(tiled, name, "train.epochs=3", "train.max_steps_per_epoch=12", "train.checkpoint_every_min=0",
                     *SMALL, cluster="slurm")
    checkpoints = tiled[1] / name / "train" / "checkpoints"
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("results", run_train(cfg)))
    runner.start()
    deadline, steps = time.monotonic() + 300, 0
    while time.monotonic() < deadline and steps < 3:
        partial = checkpoints / "partial.pt"
        steps = load_checkpoint(partial)["mid_epoch"]["steps"] if partial.exists() else 0
        time.sleep(0.05)
    job_id = training_job_id(name, deadline)
    assert job_id and not (checkpoints / "last.pt").exists(), "the job should still be in its first epoch"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends before a time-out
    runner.join(timeout=600)
    assert not runner.is_alive() and "results" in outcome
    state = load_checkpoint(checkpoints / "last.pt")
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == list(range(3))
    records = subprocess.run(["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert any("REQUEUED" in r or "PREEMPTED" in r for r in records), records
    logs = "".join(p.read_text() for p in (tiled[1] / name / "train" / "logs").rglob("*_log.*"))
    assert re.search(r"from epoch 1 of 3, step (\d+) \(partial\.pt", logs), logs[-3000:]
    assert int(re.search(r"from epoch 1 of 3, step (\d+)", logs).group(1)) > steps  # not the epoch's start


def train_until_cancelled(cfg, outcome: dict[str, Exception]) -> None:
    """``run_train(cfg)`` (in a thread), its error kept in ``outcome``."""
    from jobs.train import run_train

    try:
        run_train(cfg)
    except ArrayJobError as err:
        outcome["error"] = err


# minutes of steps under a limit of 3 min: submitit asks SLURM for its signal 90 s before the limit, which SLURM sends
# up to 60 s early: under 2 min it could come before Python had started (the task then died of it, seen once in CI)
LONG_EPOCH = ["train.epochs=1", "train.samples_per_epoch=400000", "cluster.timeout_min=3"]


def test_a_training_saves_inside_its_epoch_before_the_time_limit(tiled):
    """A job whose time limit (3 min) is nearer than the margin saves partial.pt after its first steps though
    train.checkpoint_every_min (1000) is far off: a requeue then goes on from there."""
    from conftest import config_for
    from lymphoma.checkpoint import load_checkpoint

    name = f"limit-{uuid.uuid4().hex[:6]}"
    cfg = config_for(tiled, name, *LONG_EPOCH, "train.checkpoint_every_min=1000", *SMALL[:2], "cluster.poll_s=0.2",
                     cluster="slurm")
    partial = tiled[1] / name / "train" / "checkpoints" / "partial.pt"
    runner = threading.Thread(target=train_until_cancelled, args=(cfg, {}), daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not partial.exists():
        time.sleep(0.2)
    subprocess.run(["scancel", "--name", f"train-{name}"], check=False)
    runner.join(timeout=120)
    assert partial.exists(), "no mid-epoch checkpoint before the time limit"
    mid = load_checkpoint(partial)["mid_epoch"]
    assert mid["epoch"] == 0 and mid["steps"] >= 1


def test_a_training_at_its_time_limit_without_a_checkpoint_fails_saying_so_instead_of_requeueing(tiled):
    """An epoch longer than the time limit, with mid-epoch checkpoints off: requeued, the job would start the
    epoch over every time; it ends at the first limit with the settings that fix it."""
    from conftest import config_for

    name = f"nockpt-{uuid.uuid4().hex[:6]}"
    cfg = config_for(tiled, name, *LONG_EPOCH, "train.checkpoint_every_min=null", *SMALL[:2], "cluster.poll_s=0.2",
                     cluster="slurm")
    outcome: dict[str, Exception] = {}
    runner = threading.Thread(target=train_until_cancelled, args=(cfg, outcome), daemon=True)
    runner.start()
    runner.join(timeout=240)  # the signal comes 30 to 90 s after the start
    subprocess.run(["scancel", "--name", f"train-{name}"], check=False)  # a requeued job: not left behind
    runner.join(timeout=60)
    failed = str(outcome.get("error"))
    assert "without writing a checkpoint" in failed and "train.checkpoint_every_min" in failed, failed
    job_id = re.search(r"job (\d+)", failed).group(1)
    records = subprocess.run(["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert not any("REQUEUED" in r for r in records), records


def test_a_prediction_task_at_its_time_limit_is_requeued_and_predicts_only_what_is_left(tiled, tmp_path):
    """SLURM's signal before a time limit (or a preemption) requeues a prediction task rather than failing it, and
    the requeued task skips the slides it finished: the command ends with every slide predicted, none twice."""
    import os
    import sys
    from dataclasses import asdict

    from lymphoma.checkpoint import save_checkpoint
    from lymphoma.model import build_model
    from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings

    source, runs = tiled
    architecture, name = ModelSettings().architecture(3), f"requeue-{uuid.uuid4().hex[:6]}"
    save_checkpoint({"model": build_model(architecture).state_dict(), "architecture": architecture,
                     "classes": ["CLL", "FL", "MCL"], "epoch": 0, "tiles": asdict(TileSettings(size=64, stride=16)),
                     "augment": asdict(AugmentSettings(crop=56))}, tmp_path / "model.pt")  # ~2 s a slide with TTA
    slides, images = tmp_path / "out" / "slides", sorted(source.rglob("*.png"))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "predict", "--checkpoint", str(tmp_path / "model.pt"),
                             str(source), "--out", str(tmp_path / "out"), "--cluster", "slurm", f"run.root={runs}",
                             f"run.name={name}", *SMALL, "predict.tta=true", "predict.slides_per_task=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, job_id = time.monotonic() + 300, ""
    while time.monotonic() < deadline and proc.poll() is None and not (slides.is_dir() and list(slides.glob("*.json"))):
        time.sleep(0.05)
    job_id = subprocess.run(["squeue", "-h", "--name", f"predict-{name}", "-o", "%i"], capture_output=True, text=True,
                            check=True).stdout.strip()
    done = {p: p.stat().st_mtime_ns for p in slides.glob("*.json")}
    try:
        assert job_id and 0 < len(done) < len(images), (job_id, done, proc.poll())
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends before a time limit
        printed = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0 and f"{len(images)} of {len(images)} slide(s) predicted" in printed, printed
    assert "0 failed" in printed and {p: p.stat().st_mtime_ns for p in done} == done  # none predicted twice
    states = subprocess.run(["sacct", "-j", job_id.split("_")[0], "-D", "-X", "-n", "-P", "-o", "JobID,State"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert any("REQUEUED" in s or "PREEMPTED" in s for s in states), states


def _rerun_refused_while_left_running(command: list[str], job_name: str, folder, reruns=((),)) -> None:
    """Start ``command`` (which submits SLURM job ``job_name``, writing ``folder``), kill it with -9 once the job
    runs, and run it again (once per extra arguments in ``reruns``): each rerun is refused with the job's id, its
    state and what to do (exit 2), and no second job is submitted. Once the job has left the queue, nothing is."""
    import os
    import signal
    import sys

    from hpc import refuse_beside_open_job
    from hpc.ledger import remembered

    command = [sys.executable, "-m", "jobs.cli", *command]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_id, deadline = "", time.monotonic() + 120
    while not job_id and time.monotonic() < deadline:
        job_id = subprocess.run(["squeue", "-h", "--name", job_name, "-t", "RUNNING", "-o", "%i"],
                                capture_output=True, text=True, check=True).stdout.split("_")[0].strip()
        time.sleep(0 if job_id else 0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        assert job_id, f"the job {job_name} never ran"
        for extra in reruns:
            again = subprocess.run(command + list(extra), capture_output=True, text=True, timeout=120)
            assert again.returncode == 2, again.stderr
            assert re.search(f"SLURM job {job_id}( [0-9]+)* \\({job_name}\\), submitted earlier for "
                             f"{re.escape(str(folder))}, is still (PENDING|RUNNING)", again.stderr) and \
                f"scancel {job_id}" in again.stderr, again.stderr  # an array between two tasks is PENDING
        squeued = subprocess.run(["squeue", "-h", "--name", job_name, "-o", "%i"], capture_output=True, text=True,
                                 check=True).stdout.split()
        arrays = remembered(folder / "slurm-job.json")  # more than 10 tasks: several arrays (hpc.array_limit)
        assert job_id in arrays and {j.split("_")[0] for j in squeued} <= set(arrays)  # no second job
    finally:
        subprocess.run(["scancel", "--name", job_name], check=False)  # a second job too, were there one
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip() and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    refuse_beside_open_job(folder / "slurm-job.json", job_name)  # gone: nothing to refuse


def test_a_rerun_never_submits_a_training_beside_one_an_earlier_command_left_running(tiled):
    """SLURM jobs outlive their command (by design). `lymphoma train --cluster slurm` killed with -9 while its job
    runs, then run again: refused, even with --restart (which would move the folder the job writes aside); never
    a second job writing the same checkpoints."""
    from conftest import FAST, config_for

    name = f"left-running-{uuid.uuid4().hex[:6]}"
    config_for(tiled, name)
    source, runs = tiled
    _rerun_refused_while_left_running(["train", "--cluster", "slurm", f"data.source={source}", f"run.root={runs}",
                                       f"run.name={name}", *FAST, *SMALL, "train.epochs=500"],
                                      f"train-{name}", runs / name / "train", reruns=((), ("--restart",)))
    assert not list((runs / name).glob("train.before-*"))  # --restart moved nothing aside


@pytest.mark.parametrize("stage", ["tile", "predict", "features"])
def test_a_rerun_never_submits_an_array_beside_one_an_earlier_command_left_running(stage, tiled, tmp_path):
    """The same for the arrays: `lymphoma tile`, `predict` and `features` killed with -9 while their array runs
    (one task at a time), then run again: refused, never a second array writing the same shards or files."""
    from dataclasses import asdict

    from conftest import FAST
    from lymphoma.checkpoint import save_checkpoint
    from lymphoma.model import build_model
    from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings

    source, runs = tiled
    name = f"{stage}-left-{uuid.uuid4().hex[:6]}"
    common = ["--cluster", "slurm", f"run.root={runs}", f"run.name={name}", *FAST, *SMALL, "cluster.parallelism=1"]
    if stage == "tile":
        command, folder = ["tile", *common, f"data.source={source}", "tiles.images_per_shard=1"], runs / name / "tiles"
    else:
        architecture = ModelSettings().architecture(3)
        save_checkpoint({"model": build_model(architecture).state_dict(), "architecture": architecture,
                         "classes": ["CLL", "FL", "MCL"], "epoch": 0, "tiles": asdict(TileSettings(size=64, stride=64)),
                         "augment": asdict(AugmentSettings(crop=56))}, tmp_path / "model.pt")
        folder = tmp_path / "out"
        command = [stage, "--checkpoint", str(tmp_path / "model.pt"), str(source / "**" / "*.png"), "--out",
                   str(folder), *common, "predict.slides_per_task=1"]
    _rerun_refused_while_left_running(command, f"{stage}-{name}", folder)


def test_the_whole_pipeline_on_slurm(make_dataset, tmp_path):
    """`lymphoma run --cluster slurm`: a tiling array, a training job and a prediction array, all real jobs."""
    import json

    from conftest import FAST
    from jobs.pipeline import run_pipeline
    from jobs.run_folder import open_run

    name = f"e2e-{uuid.uuid4().hex[:6]}"
    cfg = open_run(None, [f"data.source={make_dataset(2, 2)}", f"run.root={tmp_path}", f"run.name={name}", *FAST,
                             *SMALL, "split.val_fraction=0.5", "train.epochs=1", "train.max_steps_per_epoch=2",
                             "tiles.images_per_shard=3", "predict.slides_per_task=2"], "slurm")
    result = run_pipeline(cfg, progress=False)
    for stage, expected in (("tile", len(result["tile"].summaries)), ("train", 1), ("predict", 3)):
        tasks = settled_tasks(f"{stage}-{name}", expected)
        assert len(tasks) == expected and {state for _, state in tasks} == {"COMPLETED"}, (stage, tasks)
    metrics = json.loads((tmp_path / name / "predict" / "metrics.json").read_text())
    assert metrics["predicted"] == metrics["slides"] == 6 and metrics["failed"] == 0

    from jobs.cli import main  # validation, the tutorial's step 3, is a job too: a cohort's phase is no login node's work

    best = tmp_path / name / "train" / "checkpoints" / "best.pt"
    assert main(["validate", "--cluster", "slurm", "--checkpoint", str(best), "--phase", "test"]) == 2  # no job
    assert main(["validate", "--cluster", "slurm", "--checkpoint", str(best)]) == 0
    assert [state for _, state in settled_tasks(f"validate-{name}", 1)] == ["COMPLETED"]
    out = tmp_path / name / "validate" / "best-val"
    assert (out / "tiles.csv").is_file() and (out / "confusion.png").is_file() and list((out / "logs").rglob("*_log.out"))


def test_cross_validation_runs_one_array_task_per_fold_on_slurm(make_dataset, tmp_path):
    """`lymphoma cv --cluster slurm`: the folds are the tasks of one SLURM array, each predicting its cases; the
    reference baseline, which reads every image, one job of its own (not the login node's work)."""
    from conftest import FAST
    from jobs.cv import run_cv
    from jobs.run_folder import open_run

    name = f"cv-{uuid.uuid4().hex[:6]}"
    cfg = open_run(None, [f"data.source={make_dataset(4, 1)}", f"run.root={tmp_path}", f"run.name={name}", *FAST,
                             *SMALL, "cv.folds=2", "cv.inner_val_fraction=0.3", "cv.bootstrap=100",
                             "train.epochs=1", "train.max_steps_per_epoch=2", "predict.heatmaps=false"], "slurm")
    report = run_cv(cfg)
    tasks = settled_tasks(f"cv-{name}", 2)
    assert sorted(job.split("_")[1] for job, _ in tasks) == ["0", "1"]  # one array job, tasks 0 and 1
    assert {state for _, state in tasks} == {"COMPLETED"}
    assert report["n_images"] == 12 and report["n_cases"] == 12 and report["failed_folds"] == []
    assert [state for _, state in settled_tasks(f"baseline-{name}", 1)] == ["COMPLETED"]
    assert len(report["baseline"]["repeats"]) == 1 and (tmp_path / name / "baseline" / "features.npz").is_file()


def test_features_run_as_a_slurm_array_one_task_per_chunk_of_slides(make_dataset, tmp_path):
    """`lymphoma features --cluster slurm`: chunks of slides are the tasks of one array; every file arrives."""
    from jobs.features import features_slides, run_features
    from jobs.run_folder import open_run

    name = f"feat-{uuid.uuid4().hex[:6]}"
    run = open_run(None, [f"data.source={make_dataset(2, 1)}", f"run.root={tmp_path}", f"run.name={name}", *SMALL,
                          "model.backbone=timm:resnet10t", "predict.slides_per_task=2"], "slurm")
    out_dir, records, failure = run_features(run, None, features_slides(run, [], None, None))
    assert failure is None and [r["status"] for r in records] == ["ok"] * 6
    tasks = settled_tasks(f"features-{name}", 3)
    assert sorted(job.split("_")[1] for job, _ in tasks) == ["0", "1", "2"] and {s for _, s in tasks} == {"COMPLETED"}
    assert len(list((out_dir / "h5_files").glob("*.h5"))) == 6


def test_mil_trains_as_a_slurm_job_not_on_the_login_node(make_dataset, tmp_path):
    """`lymphoma mil --cluster slurm`: one SLURM job trains the cross-validated MIL model and writes its report and
    model (ten fold assignments took half an hour: no work for the login node); the command waits and reports."""
    import json

    from conftest import tiny_timm_file
    from jobs.cli import main

    source, weights = make_dataset(cases_per_class=4, images_per_case=1), tmp_path / "resnet10t.safetensors"
    tiny_timm_file(weights, "resnet10t", num_classes=1000)
    name = f"mil-{uuid.uuid4().hex[:6]}"
    common = [f"data.source={source}", f"run.root={tmp_path}", f"run.name={name}"]
    assert main(["features", "model.backbone=timm:resnet10t", f"model.weights={weights}", *common,
                 "cluster.kind=debug"]) == 0
    assert main(["mil", "--cluster", "slurm", *common, *SMALL, "cv.folds=2", "mil.epochs=2", "cv.bootstrap=100"]) == 0
    tasks = settled_tasks(f"mil-{name}", 1)
    assert [state for _, state in tasks] == ["COMPLETED"], tasks
    out = tmp_path / name / "mil"
    assert json.loads((out / "report.json").read_text())["n_images"] == 12 and (out / "mil.pt").is_file()
    assert list((out / "logs").rglob("*_log.out"))


def test_the_readmes_slurm_recipe_works_as_written_and_a_refusal_quotes_sbatch(tmp_path):
    """README: start the local cluster, then `lymphoma tile -c configs/lymphoma-lowres.yaml --cluster slurm` with the
    generic profile (16 GB a task) on the real data; a request no node can meet is one error quoting sbatch, rc 2."""
    import json
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "jobs.cli", "tile", "-c", "configs/lymphoma-lowres.yaml", "--cluster", "slurm",
               f"run.root={tmp_path}"]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "lymphoma-lowres" / "tiles" / "manifest.json").read_text())
    assert sum(p["n_images"] for p in manifest["phases"].values()) == 307
    refused = subprocess.run([*command, "cluster.mem_gb=1000", "run.name=too-big"], cwd=repo, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    assert "refused the job" in refused.stderr and "Memory specification can not be satisfied" in refused.stderr
    assert "cluster.mem_gb" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "too-big" / "tiles" / "manifest.json").exists()


def test_a_controller_that_does_not_answer_and_a_machine_without_slurm_are_named_as_such(tmp_path):
    """Not a refusal: sbatch that cannot reach the controller (its port closed) is told apart from a request the
    cluster cannot meet, and a machine without sbatch gets an error instead of submitit's traceback; rc 2 both."""
    import os
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    dead = tmp_path / "dead-port.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=6999", conf))
    command = [sys.executable, "-m", "jobs.cli", "tile", "-c", "configs/lymphoma-lowres.yaml", "--cluster", "slurm",
               f"run.root={tmp_path}"]
    down = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLURM_CONF": str(dead)})
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert "sbatch cannot reach the SLURM controller" in down.stderr and "Unable to contact slurm controller" in down.stderr
    assert "scontrol ping" in down.stderr and "refused the job" not in down.stderr
    bare = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert "sbatch and srun are not on this machine's PATH" in bare.stderr and "--cluster local" in bare.stderr


def test_a_job_slurm_will_never_start_is_cancelled_naming_the_setting_to_change(tiled):
    """A time limit above its partition's (the local cluster's `short` allows 1 minute): SLURM accepts the job and
    leaves it pending for ever ('PartitionTimeLimit'), and the command waited with it, silent. Now the array
    (`lymphoma tile`) and the one job (`lymphoma train`) are cancelled within seconds, exit status 2, with the
    reason and cluster.timeout_min named; nothing is left in the queue, and nothing was written."""
    from conftest import FAST

    source, runs = tiled
    for stage in ("tile", "train"):
        name = f"never-{stage}-{uuid.uuid4().hex[:6]}"
        if stage == "train":
            shutil.copytree(runs / "base" / "tiles", runs / name / "tiles")
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "jobs.cli", stage, "--cluster", "slurm", "--no-progress",
                               f"data.source={source}", f"run.root={runs}", f"run.name={name}", *FAST, *SMALL,
                               "cluster.partition=short", "cluster.timeout_min=5"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert time.monotonic() - started < 120
        assert "SLURM will never start job" in done.stderr and "'PartitionTimeLimit'" in done.stderr, done.stderr
        assert "lower cluster.timeout_min" in done.stderr and "were cancelled" in done.stderr
        queued = subprocess.run(["squeue", "-h", "-n", f"{stage}-{name}", "-o", "%i %T"], capture_output=True,
                                text=True, check=True).stdout
        assert queued.strip() == "", queued
        assert not list((runs / name).rglob("*.h5" if stage == "tile" else "*.pt"))
    # held (sbatch --hold): a reason only someone's action clears is said once, and the command waits on for it
    name = f"held-{uuid.uuid4().hex[:6]}"
    with subprocess.Popen([sys.executable, "-m", "jobs.cli", "tile", "--cluster", "slurm", "--no-progress",
                           f"data.source={source}", f"run.root={runs}", f"run.name={name}", *FAST, *SMALL,
                           "cluster.extra_sbatch={hold: true}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as held:
        time.sleep(30)  # submitted, then two looks at its reason, 10 s apart
        listed = subprocess.run(["squeue", "-h", "-n", f"tile-{name}", "-o", "%A %r"], capture_output=True,
                                text=True, check=True).stdout.split()
        queued, ids = set(listed[1::2]), set(listed[::2])
        subprocess.run(["scontrol", "release", *ids], check=True)
        out, err = held.communicate(timeout=300)
    assert queued == {"JobHeldUser"}, listed
    assert held.returncode == 0, err
    assert err.count("is pending for 'JobHeldUser': it is held (`scontrol release <id>` lets it start)") == 1, err
