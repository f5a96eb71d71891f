"""The distributed-environment resolver on each source: torchrun variables, submitit, MPI, a single process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc import ExecutorSettings, make_executor
from hpc.distributed import DistEnv, DistributedEnvError, resolve

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}


def test_torchrun_variables():
    assert resolve(TORCHRUN) == DistEnv(3, 1, 8, "node7", 29400, "torchrun", 1)
    assert resolve({**TORCHRUN, "LOCAL_WORLD_SIZE": "4"}).local_world == 4


def test_half_set_torchrun_variables_name_the_missing_ones():
    partial = {k: v for k, v in TORCHRUN.items() if k not in ("MASTER_ADDR", "LOCAL_RANK")}
    with pytest.raises(DistributedEnvError, match=r"\['LOCAL_RANK', 'MASTER_ADDR'\] are not"):
        resolve(partial)


def test_no_source_is_a_single_process():
    env = resolve({"PATH": "/usr/bin"})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_submitit_local_job_with_two_tasks(tmp_path, tasks_importable):
    from hpc_tasks import resolve_in_task

    settings = ExecutorSettings(kind="local", tasks_per_node=2, timeout_min=5)
    executor = make_executor(settings, tmp_path / "%j", name="resolve")
    job = executor.submit(resolve_in_task, 0)
    results = sorted(job.results())
    assert [r[:3] for r in results] == [(0, 0, 2), (1, 1, 2)]
    assert results[0][3:] == results[1][3:] and results[0][5] == "submitit-local"


def test_mpiexec_ranks_come_from_mpi4py(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    code = ("import pathlib, sys; from hpc.distributed import resolve; e = resolve(); "
            "pathlib.Path(sys.argv[1], str(e.rank)).write_text(f'{e.rank} {e.local_rank} {e.world_size} "
            "{e.master_port} {e.source}')")  # one file per rank: the ranks' stdout can interleave
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith("SUBMITIT")}
    subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                   text=True, timeout=120, env=env, check=True)
    lines = [(tmp_path / str(rank)).read_text().split() for rank in (0, 1)]
    assert [line[:3] for line in lines] == [["0", "0", "2"], ["1", "1", "2"]]
    assert lines[0][3] == lines[1][3] and {line[4] for line in lines} == {"mpi"}
