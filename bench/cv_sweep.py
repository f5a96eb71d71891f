"""Many rows of the experiment table at once, on one machine with many cores (a GPU node: its cores tile and
stain-normalise, its GPU trains): each row is `lymphoma cv` of one config plus overrides, over the same fold
assignments; finished rows go into one table (cv_table.py's JSON) and one archive of their reports, rewritten
after every row, so a run stopped at its deadline still returns every finished row. Reruns resume.

    .venv/bin/python bench/cv_sweep.py bench/sweeps/levers.txt --concurrent 3 --parallelism 6 --out <folder>

A rows file holds one row a line: a name, then `key=value` overrides (`#` starts a comment).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cv_table import summarise

REPORT_FILES = ("cv/report.json", "cv/report.txt", "cv/predictions.csv", "folds.csv")


@dataclass
class Row:
    name: str
    overrides: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    outcome: dict = field(default_factory=dict)


def read_rows(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            rows.append(Row(words[0], words[1:]))
    if len({r.name for r in rows}) != len(rows):
        raise SystemExit(f"{path}: two rows share a name; each row needs its own")
    return rows


def start(row: Row, args: argparse.Namespace) -> None:
    """Start the row's `lymphoma cv`, its folds computing with an even share of the cores."""
    threads = max(1, (os.cpu_count() or 1) // (args.concurrent * args.parallelism))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "jobs.cli", "cv", "-c", args.config, f"run.root={args.root}",
               f"run.name={row.name}", f"cv.repeats={args.repeats}", f"cluster.parallelism={args.parallelism}",
               "cv.baseline=false", "predict.heatmaps=false", "predict.geojson=false", "train.num_workers=1",
               *row.overrides]
    log = open(args.root / f"{row.name}.log", "w")
    row.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    row.started = time.monotonic()
    print(f"started {row.name}: {' '.join(row.overrides) or '(the config as it is)'}", flush=True)


def finish(row: Row, rc: int) -> None:
    row.outcome = {"rc": rc, "seconds": round(time.monotonic() - row.started, 1), "overrides": row.overrides}
    print(f"{row.name}: rc {rc} after {row.outcome['seconds']:.0f} s", flush=True)


def write_results(rows: list[Row], args: argparse.Namespace) -> None:
    """The table of every finished row and the archive of their reports and logs, written atomically."""
    done = [r for r in rows if (args.root / r.name / "cv" / "report.json").is_file()]
    table = summarise([args.root / r.name for r in done], variants=("cv",), echo=False)
    results = {"rows": {r.name: r.outcome for r in rows if r.outcome}, "table": table}
    tmp = args.out / "sweep.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out / "sweep.json")
    with tarfile.open(args.out / "reports.tar.gz.tmp", "w:gz") as archive:
        for row in rows:
            for name in REPORT_FILES:
                if (args.root / row.name / name).is_file():
                    archive.add(args.root / row.name / name, f"{row.name}/{name}")
            if (args.root / f"{row.name}.log").is_file():
                archive.add(args.root / f"{row.name}.log", f"{row.name}/cv.log")
    (args.out / "reports.tar.gz.tmp").replace(args.out / "reports.tar.gz")


def stop(row: Row) -> None:
    if row.proc is not None and row.proc.poll() is None:
        os.killpg(row.proc.pid, signal.SIGTERM)
        try:
            row.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(row.proc.pid, signal.SIGKILL)
            row.proc.wait()
        finish(row, -signal.SIGTERM)


def sweep(rows: list[Row], args: argparse.Namespace) -> None:
    """Run the rows, ``--concurrent`` at a time, until all end or the deadline passes."""
    deadline = time.monotonic() + args.deadline
    waiting, running = list(rows), []
    try:
        while waiting or running:
            while waiting and len(running) < args.concurrent and time.monotonic() < deadline:
                running.append(waiting.pop(0))
                start(running[-1], args)
            for row in [r for r in running if r.proc.poll() is not None]:
                running.remove(row)
                finish(row, row.proc.returncode)
                write_results(rows, args)
            if time.monotonic() >= deadline:
                print(f"deadline: {', '.join(r.name for r in running + waiting) or 'none'} left unfinished", flush=True)
                break
            time.sleep(2)
    finally:
        for row in running:
            stop(row)
        write_results(rows, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="rows file: name key=value ... per line")
    parser.add_argument("--config", default="configs/lymphoma-lowres.yaml")
    parser.add_argument("--repeats", type=int, default=3, help="fold assignments per row (cv.repeats)")
    parser.add_argument("--concurrent", type=int, default=3, help="rows at once")
    parser.add_argument("--parallelism", type=int, default=6, help="fold tasks at once per row")
    parser.add_argument("--deadline", type=float, default=540, help="seconds; unfinished rows are stopped")
    parser.add_argument("--root", type=Path, default=Path("/tmp/cv-sweep"), help="run folders")
    parser.add_argument("--out", type=Path, required=True, help="sweep.json and reports.tar.gz")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the rows too (the sweep's finally), not just the sweep
    args.root.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sweep(read_rows(args.rows), args)


if __name__ == "__main__":
    main()
