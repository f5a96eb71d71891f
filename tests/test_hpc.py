"""The executor factory and the array helper, with real subprocesses (local) and in process (debug)."""

from __future__ import annotations

import os

import pytest

from hpc import ArrayJobError, ExecutorSettings, make_executor, run_array


def test_local_array_reports_the_failed_task_with_its_logs_and_bounds_parallelism(tmp_path, tasks_importable):
    from hpc_tasks import record_span

    executor = make_executor(ExecutorSettings(kind="local", parallelism=2), tmp_path / "logs" / "%j", name="spans")
    finished = []
    with pytest.raises(ArrayJobError) as info:
        run_array(executor, record_span, [(str(tmp_path), i) for i in range(6)], parallelism=2, poll_s=0.05,
                  on_done=lambda i, r: finished.append(i))
    err = info.value
    assert [f.index for f in err.failures] == [3]
    assert "task 3" in str(err) and "ValueError: item 3 is bad on purpose" in str(err)
    assert err.failures[0].stderr.is_file() and "bad on purpose" in err.failures[0].stderr.read_text()
    assert err.results == [0, 1, 4, None, 16, 25] and sorted(finished) == list(range(6))
    spans = [tuple(map(float, (tmp_path / f"{i}.span").read_text().split()[:2])) for i in range(6)]
    pids = {(tmp_path / f"{i}.span").read_text().split()[2] for i in range(6)}
    assert len(pids) == 6 and str(os.getpid()) not in pids  # a process per task
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running, peak = 0, 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2


def test_debug_executor_runs_in_this_process(tmp_path, tasks_importable):
    from hpc_tasks import record_span

    executor = make_executor(ExecutorSettings(kind="debug"), tmp_path / "%j", name="dbg")
    assert run_array(executor, record_span, [(str(tmp_path), i) for i in (1, 2)]) == [1, 4]
    assert (tmp_path / "1.span").read_text().split()[2] == str(os.getpid())


def test_settings_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: local, debug, slurm"):
        ExecutorSettings(kind="kubernetes")
