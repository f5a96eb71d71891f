"""Entry points of the pipeline; the only place that wires ``lymphoma`` to ``hpc``.

OpenVINO before torch: in a process that imported torch first, OpenVINO's CPU inference left the core idle about
a quarter of the time (2 prediction tasks on 2 cores: 0.78 to 0.80 of the wall busy, against 0.93 to 0.96 with
openvino imported first; ``bench/bench_import_order.py``). `predict` and `features` set ``LYMPHOMA_OPENVINO_FIRST``
for their tasks when predict.engine=openvino (``openvino_first_in_tasks``); a task imports this package before any
of its modules imports torch, and so openvino first."""

import os

OPENVINO_FIRST = "LYMPHOMA_OPENVINO_FIRST"

if os.environ.get(OPENVINO_FIRST) == "1":
    try:
        import openvino  # noqa: F401
    except ImportError:  # the engine says what to install when it is built
        pass


def openvino_first_in_tasks(engine: str) -> None:
    """Have the tasks started from now on import openvino before torch when they run it (``engine``:
    predict.engine); executors pass this process's environment on (submitit's local processes, sbatch)."""
    if engine == "openvino":
        os.environ[OPENVINO_FIRST] = "1"
