"""The executor factory and the array helper, with real subprocesses (local) and in process (debug)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from hpc import ArrayJobError, ExecutorSettings, make_executor, run_array


def test_local_array_reports_the_failed_task_with_its_logs_and_bounds_parallelism(tmp_path, tasks_importable):
    from hpc_tasks import record_span

    executor = make_executor(ExecutorSettings(kind="local", parallelism=2), tmp_path / "logs" / "%j", name="spans")
    finished, seen = [], []  # seen: the spans written at each look at the tasks (a progress bar's reading)
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, record_span, [(str(tmp_path), i) for i in range(6)], parallelism=2, poll_s=0.05,
                  on_done=lambda i, r: finished.append(i), on_poll=lambda: seen.append(len(list(tmp_path.glob("*.span")))))
    err = info.value
    assert [f.index for f in err.failures] == [3]
    assert "task 3" in str(err) and "ValueError: item 3 is bad on purpose" in str(err)
    assert err.failures[0].stderr.is_file() and "bad on purpose" in err.failures[0].stderr.read_text()
    assert err.results == [0, 1, 4, None, 16, 25] and sorted(finished) == list(range(6))
    assert seen == sorted(seen) and seen[0] < 6 and seen[-1] == 6
    spans = [tuple(map(float, (tmp_path / f"{i}.span").read_text().split()[:2])) for i in range(6)]
    pids = {(tmp_path / f"{i}.span").read_text().split()[2] for i in range(6)}
    assert len(pids) == 6 and str(os.getpid()) not in pids  # a process per task
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running, peak = 0, 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2


def test_waiting_for_one_job_looks_at_what_it_writes_while_it_runs(tmp_path, tasks_importable):
    """``wait_for`` (one job, such as a training) calls ``on_poll`` while the task runs, so that a bar can follow
    it, and still returns its result."""
    from hpc import submit, wait_for
    from hpc_tasks import record_span

    executor = make_executor(ExecutorSettings(kind="local"), tmp_path / "logs" / "%j", name="one")
    seen = []  # whether the task had written its span at each look
    job = submit(executor, record_span, (str(tmp_path), 2))
    assert wait_for(job, "one", on_poll=lambda: seen.append((tmp_path / "2.span").exists()), poll_s=0.05) == [4]
    assert len(seen) >= 3 and not seen[0]


def test_a_task_that_fills_the_disk_is_reported_with_its_own_error(small_disk, tasks_importable):
    """A task whose folder's disk is full cannot write its result file; submitit then only logs its error. The
    failure is that error and why it could not be written, not "no result, the job ended as FINISHED"."""
    from hpc_tasks import fill_the_disk_then_fail

    executor = make_executor(ExecutorSettings(kind="local"), small_disk / "logs" / "%j", name="full")
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, fill_the_disk_then_fail, [str(small_disk)], poll_s=0.05)
    message = info.value.failures[0].error
    assert "the task's own error, on purpose" in message and "No space left on device" in message, message
    assert "task 0" in str(info.value) and "on purpose" in str(info.value)


def test_gpus_asked_for_but_not_usable_are_an_error_not_hours_on_the_cpu(tmp_path):
    """cluster.gpus_per_node on a machine without them is refused before any task starts; a task the scheduler
    gave GPUs (SLURM_GPUS_ON_NODE) that torch cannot use stops naming why, where it trained on the CPU silently."""
    import subprocess
    import sys

    from hpc import SubmissionError
    from hpc.executors import visible_gpu_count

    if visible_gpu_count() or __import__("torch").cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(SubmissionError, match="cluster.gpus_per_node=1, but this machine has 0 GPU"):
        make_executor(ExecutorSettings(kind="local", gpus_per_node=1), tmp_path / "%j", name="gpu")
    probe = "from hpc.distributed import resolve; from hpc.task import task_device; print(task_device(resolve()))"
    for given, expected in (("2", "this task was given 2 GPU(s), but "), ("", "cpu")):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                              env={**env, **({"SLURM_GPUS_ON_NODE": given} if given else {})})
        assert expected in done.stdout + done.stderr, done.stderr
        assert (done.returncode != 0) == bool(given)


def test_debug_executor_runs_in_this_process(tmp_path, tasks_importable):
    from hpc_tasks import record_span

    executor = make_executor(ExecutorSettings(kind="debug"), tmp_path / "%j", name="dbg")
    assert run_array(executor, record_span, [(str(tmp_path), i) for i in (1, 2)]) == [1, 4]
    assert (tmp_path / "1.span").read_text().split()[2] == str(os.getpid())


def test_settings_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: local, debug, slurm"):
        ExecutorSettings(kind="kubernetes")


FORWARDS = """
import mmap, resource, sys, torch
from hpc.task import task_setup
from lymphoma.model import build_model
from lymphoma.settings import ModelSettings

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

with task_setup(1):
    model = build_model(ModelSettings().architecture(3)).eval()
    x = torch.rand(32, 3, 112, 112)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        start = faults()
        for _ in range(3):
            model(x)
        forwards = faults() - start
    fresh = mmap.mmap(-1, 64 << 20)  # memory never touched: writing one byte a page faults every page in
    start = faults()
    fresh[::4096] = bytes(len(fresh) // 4096)
    print(forwards, faults() - start)
"""


def test_a_task_reuses_freed_memory_instead_of_faulting_it_in_every_forward_pass():
    """Under ``task_setup`` three forward passes of 32 tiles fault (almost) no page in: the activations' blocks
    are kept for the next batch. Without it (``HPC_KEEP_FREED_MEMORY=0``), glibc's dynamic mmap threshold adapts
    to some of the blocks and not others: 56,000 to 95,000 faults on this CI's kind of machine, but none once
    on another, so that control is not asserted. The count is shown to be real: 64 MiB written afresh fault
    16,384 pages in."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "HPC_KEEP"))}
    done = subprocess.run([sys.executable, "-c", FORWARDS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    forwards, fresh = map(int, done.stdout.split()[-2:])
    if fresh < 4096:
        pytest.skip(f"this kernel does not count minor page faults (64 MiB written afresh: {fresh})")
    assert forwards < 300, forwards


def test_a_watched_command_is_alive_until_it_ends_and_never_by_a_reused_pid_or_as_a_zombie():
    """``hpc.orphans.alive``: a running process is; one killed but not yet reaped (a zombie) is not; nor a
    process named with another start time (its pid reused); nor one reaped."""
    import signal
    import subprocess
    import sys

    from hpc.orphans import alive, process_identity

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = process_identity(child.pid)
    pid, _, started = identity.partition(":")
    assert started.isdigit() and alive(identity)
    assert not alive(f"{pid}:{int(started) + 1}")  # the same pid, started at another time: another process
    os.kill(child.pid, signal.SIGKILL)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
    assert not alive(identity)
    child.wait()
    assert not alive(identity)


def test_local_tasks_run_without_a_time_limit_unless_one_is_set_and_then_name_it(tmp_path, tasks_importable):
    """submitit's local controller stops a task at its time limit: the old default of 60 minutes failed any longer
    prediction on a workstation. Unset, a local task has none to speak of (SLURM keeps 60 minutes); set, a task
    that reaches it fails with the limit and the setting to raise, not submitit's 'timed-out and not
    checkpointable'."""
    from hpc.executors import LOCAL_NO_LIMIT_MIN, SLURM_DEFAULT_LIMIT_MIN
    from hpc_tasks import sleep_for

    assert ExecutorSettings(kind="local").time_limit_min() == LOCAL_NO_LIMIT_MIN >= 365 * 24 * 60
    assert ExecutorSettings(kind="slurm").time_limit_min() == SLURM_DEFAULT_LIMIT_MIN == 60
    assert ExecutorSettings(kind="slurm", timeout_min=120).time_limit_min() == 120
    unlimited = make_executor(ExecutorSettings(kind="local"), tmp_path / "a" / "%j", name="unlimited")
    assert unlimited._executor.parameters["timeout_min"] == LOCAL_NO_LIMIT_MIN
    limited = make_executor(ExecutorSettings(kind="local", timeout_min=1), tmp_path / "b" / "%j", name="limited")
    limited._executor.update_parameters(signal_delay_s=57)  # the time-out signal 3 s after the start, not at 30 s
    with pytest.raises(ArrayJobError) as info:
        run_array(limited, sleep_for, [(str(tmp_path / "marker"), 20)], poll_s=0.1)
    assert "TimeoutError: the task reached its time limit of 1 min" in str(info.value)
    assert "raise cluster.timeout_min (null: none on this machine), then rerun" in str(info.value)


def test_a_cgroup_out_of_memory_kill_is_named_as_one_without_figures(tmp_path):
    """Where SLURM's cgroup killed the task (no such cluster here: the local one polls, tested in test_slurm.py),
    slurmstepd's words or the state OUT_OF_MEMORY name it, without figures it did not log; a task killed otherwise
    is not called one."""
    from hpc.killed import killed_for_memory

    log = tmp_path / "0_log.err"
    log.write_text("srun: error: n3: task 0: Out Of Memory\nslurmstepd: error: Detected 1 oom-kill event(s) in "
                   "StepId=4242.0. Some of your processes may have been killed by the cgroup out-of-memory handler.\n")
    message = killed_for_memory(log, "FAILED")
    assert message == ("MemoryError: SLURM killed the task for memory (it needed more than its job asked for; raise "
                       "cluster.mem_gb), then rerun: finished work is kept")
    log.write_text("srun: error: n3: task 0: Killed\n")
    assert killed_for_memory(log, "OUT_OF_MEMORY") == message and killed_for_memory(log, "CANCELLED by 0") is None
    assert killed_for_memory(tmp_path / "never-written.err", "FAILED") is None


def test_a_task_whose_worker_the_cgroup_killed_is_named_killed_for_memory_alike_in_arrays_and_jobs(tmp_path):
    """Under SLURM's cgroup the kernel kills the task's largest process, often a data-loader worker: the task then
    writes an error of its own ("DataLoader worker ... killed by signal") beside slurmstepd's oom-kill line. An array
    task and a rank of a multi-task job are named alike: killed for memory, with the setting to raise (the array's
    message used to be the worker's error alone). No cgroup-enforcing SLURM here: slurmstepd's words are written."""
    import submitit

    from hpc.array import _failure_message, _task_failure

    job = submitit.SlurmJob(tmp_path, "4242_0")
    job.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
    worker = "RuntimeError: DataLoader worker (pid 99) is killed by signal: Killed."
    job.paths.stderr.write_text(f"{worker}\nslurmstepd: error: Detected 1 oom-kill event(s) in StepId=4242.0. Some "
                                "of your processes may have been killed by the cgroup out-of-memory handler.\n")
    err = submitit.core.utils.FailedJobError(worker)
    named = ("MemoryError: SLURM killed the task for memory (it needed more than its job asked for; raise "
             "cluster.mem_gb), then rerun: finished work is kept")
    assert _failure_message(err, job, None, 30) == named and _task_failure(job, 0, err, None).error == named


def memory_cgroups() -> tuple[Path, str] | None:
    """Where this process may make a memory cgroup, and the name of its limit file: cgroup v1 or v2, as root."""
    v1, control = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cgroup.subtree_control")
    if os.geteuid() != 0:
        return None
    if (v1 / "memory.limit_in_bytes").is_file() and os.access(v1, os.W_OK):
        return v1, "memory.limit_in_bytes"
    if control.is_file() and "memory" in control.read_text().split():
        return control.parent, "memory.max"
    return None


@pytest.fixture()
def memory_cgroup():
    """A memory cgroup of 150 MiB: its ``cgroup.procs``, removed afterwards."""
    found = memory_cgroups()
    if found is None:
        pytest.skip("no memory cgroup can be made here (root and cgroup v1 or v2 with its memory controller needed)")
    root, limit = found
    group = root / f"lymphoma-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / limit).write_text(str(150 << 20))
    for swap, value in (("memory.memsw.limit_in_bytes", 150 << 20), ("memory.swap.max", 0)):  # no swap to escape to
        if (group / swap).is_file():
            (group / swap).write_text(str(value))
    yield group / "cgroup.procs"
    for _ in range(100):  # its one process is gone once killed; the kernel frees the group a moment later
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def test_a_local_task_the_kernel_kills_for_memory_is_named_so(memory_cgroup, tmp_path, tasks_importable):
    """A local task (the default executor) that the kernel's out-of-memory killer ends (a real one: the task joins
    a memory cgroup of 150 MiB and takes 400) is named as killed for memory with what to lower, where it was "no
    result, the job ended as FINISHED"; the task beside it finishes."""
    from hpc_tasks import hold_memory_in

    executor = make_executor(ExecutorSettings(kind="local", parallelism=2), tmp_path / "logs" / "%j", name="greedy")
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, hold_memory_in, [(str(tmp_path / "procs"), 0), (str(memory_cgroup), 400)],
                  parallelism=2, poll_s=0.1)
    assert [f.index for f in info.value.failures] == [1] and info.value.results == [0, None]
    assert info.value.failures[0].error.startswith(
        "MemoryError: the task's process was killed before it wrote a result or an error, while the kernel's "
        "out-of-memory killer ended 1 process(es) on this machine: it ran out of memory; run fewer tasks at once "
        "(cluster.parallelism)"), info.value.failures[0].error


def test_each_task_of_a_job_is_named_with_its_own_end(tmp_path, tasks_importable):
    """A two-task job (a DDP training) whose rank 1 is killed outright: rank 1 is named as killed, with its own
    logs, and rank 0 with the error it then met, where both were named by rank 0's logs as killed."""
    from hpc.array import submit, wait_for
    from hpc_tasks import lose_a_rank

    executor = make_executor(ExecutorSettings(kind="local", tasks_per_node=2), tmp_path / "logs" / "%j", name="pair")
    with pytest.raises(ArrayJobError) as info:
        wait_for(submit(executor, lose_a_rank, 0), "pair", poll_s=0.1)
    first, second = info.value.failures
    assert first.index == 0 and "ConnectionResetError: rank 0 lost its peer" in first.error
    assert second.index == 1 and second.error.startswith("the task's process was killed before it wrote a result")
    assert second.stderr.name.endswith("_1_log.err") and "2 of 2 task(s) of 'pair' failed" in str(info.value)
