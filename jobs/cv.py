"""`lymphoma cv`: cross-validation grouped by case, one array task per fold (tile, train, predict its test
cases), then a pooled report with bootstrap intervals over cases."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from hpc import ArrayJobError, refuse_beside_open_job, run_array
from hpc.task import thread_share
from jobs.baseline import run_baseline, run_baseline_task
from jobs.config import Config, ConfigError
from jobs.fold import FoldJob, FoldTask, fold_trainings, grid_points, variant_suffix
from jobs.progress import EpochProgress
from jobs.run_folder import Run
from lymphoma.backbones import require_model
from lymphoma.cohort_report import write_report
from lymphoma.crossval import across_repeats, cv_report, fold_phases, format_cv_report, grouped_folds
from lymphoma.ensemble import write_ensemble
from lymphoma.errors import InputError
from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.inputs import ImageRecord
from lymphoma.levels import image_class
from lymphoma.prediction import read_record
from lymphoma.run_report import write_run_report
from lymphoma.selection import at_chance as chance_level
from lymphoma.selection import best_index, explain
from lymphoma.settings import CVSettings
from lymphoma.split import assign_phases

log = logging.getLogger(__name__)


def fold_assignments(records: list[ImageRecord], cv: CVSettings) -> list[list[list[str]]]:
    """The test cases of every fold of every repeat (repeat r deals the cases with seed cv.seed + r)."""
    return [grouped_folds(records, cv.folds, cv.seed + r) for r in range(cv.repeats)]


def plan_folds(run: Run, records: list[ImageRecord], classes: list[str]) -> list[FoldTask]:
    """Every fold's task of every repeat (``repeat-<r>/fold-<k>``), after checking that no case is on two
    sides of any fold and that every grid point is a valid config."""
    cv = run.config.cv
    for point in grid_points(dict(cv.grid)):  # before any task starts
        run.with_values(point)
    check_inner_val_trains(run.config)
    threads = thread_share(min(run.config.cluster.parallelism, cv.folds * cv.repeats))
    tasks = []
    for r, folds in enumerate(fold_assignments(records, cv)):
        for k, test_cases in enumerate(folds):
            by_phase = assign_phases(records, fold_phases(records, test_cases, cv.inner_val_fraction, cv.seed + r))
            tasks.append(FoldTask(run.at(run.dir / f"repeat-{r}" / f"fold-{k}"), k, r,
                                  tuple(by_phase.get("train", ())), tuple(by_phase.get("val", ())),
                                  tuple(by_phase["test"]), tuple(classes), threads))
    return tasks


def check_inner_val_trains(cfg: Config) -> None:
    """With cv.inner_val_trains the inner val's cases train, so it must choose nothing: neither the epoch nor a
    grid point."""
    if cfg.cv.inner_val_trains and (cfg.cv.grid or (cfg.train.select != "last" and cfg.cv.checkpoint != "last")):
        raise ConfigError("cv.inner_val_trains=true trains on the inner val's cases, so they cannot choose: set "
                          "train.select=last (or cv.checkpoint=last) and no cv.grid, or cv.inner_val_trains=false "
                          f"(now train.select={cfg.train.select}, cv.checkpoint={cfg.cv.checkpoint}, "
                          f"cv.grid={dict(cfg.cv.grid) or 'none'})")


def write_folds_csv(path: Path, tasks: list[FoldTask]) -> None:
    """``repeat,fold,phase,case,label,path``: where every image went in every fold."""
    write_csv_atomic(path, ["repeat", "fold", "phase", "case", "label", "path"],
                     ([t.repeat, t.fold, phase, r.case, r.label, r.path] for t in tasks
                      for phase, records in (("train", t.train), ("val", t.val), ("test", t.test)) for r in records))


def refuse_other_folds(path: Path, tasks: list[FoldTask]) -> None:
    """An InputError where the ``folds.csv`` of an earlier run dealt a fold (a repeat and fold both have) otherwise
    than ``tasks`` do (other images, or cases in another phase: data.source, cv.folds, cv.seed or
    cv.inner_val_fraction changed since): its fold model learnt from cases this fold would test. More repeats than
    before extend the run."""
    if not path.is_file():
        return
    before: dict[tuple[str, str], set[tuple[str, ...]]] = defaultdict(set)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            before[row["repeat"], row["fold"]].add((row["phase"], row["case"], row["label"], row["path"]))
    for t in tasks:
        old = before.get((str(t.repeat), str(t.fold)))
        new = {(phase, r.case, r.label, r.path) for phase, records in (("train", t.train), ("val", t.val),
                                                                         ("test", t.test)) for r in records}
        if old is None or old == new:
            continue
        was, now = {row[-1] for row in old}, {row[-1] for row in new}
        moved = len({row[-1] for row in old ^ new} & was & now)
        raise InputError(f"{path.parent}: repeat {t.repeat} fold {t.fold} was dealt otherwise by an earlier run "
                         f"({path.name}: {len(now - was)} image(s) new to it, {len(was - now)} gone, {moved} in "
                         "another phase or case): data.source, cv.folds, cv.seed or cv.inner_val_fraction changed "
                         "since, and its fold model learnt from cases it would now test. `lymphoma cv --restart` sets "
                         "the earlier folds aside (kept) and runs afresh; or give another run.name")


def set_folds_aside(run: Run) -> None:
    """`lymphoma cv --restart`: the earlier folds and what was made of them (folds.csv, repeat-*/, the reports cv*/,
    ensemble*.pt) moved into ``<run>/cv.before-<date-time>/``, kept; never while a SLURM job of them runs."""
    if run.config.cluster.kind == "slurm":  # before the ledger moves aside with the folder the job writes
        refuse_beside_open_job(run.dir / "cv" / "slurm-job.json", f"cv-{run.config.run.name}")
    made = [p for p in run.dir.iterdir() if re.fullmatch(r"folds\.csv|repeat-\d+|cv(-[\w-]+)?|ensemble(-[\w-]+)?\.pt", p.name)]
    if made:
        aside = run.dir / f"cv.before-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for path in made:
            path.rename(aside / path.name)
        log.info(f"restarting: the earlier folds are kept in {aside}")


def run_folds(run: Run, tasks: list[FoldTask], progress: bool = True
              ) -> tuple[list[list[dict[str, Any]]], Optional[ArrayJobError]]:
    """Run every fold as an array task, with a bar over the epochs of all folds on a terminal if ``progress``; each
    fold's prediction records (those written), and the failure if any."""
    cfg = run.config
    sizes = ", ".join(str(len({r.case for r in t.test})) for t in tasks[:cfg.cv.folds])
    inner = ("which train too and watch training (cv.inner_val_trains)" if cfg.cv.inner_val_trains
             else "which pick its checkpoint")
    log.info(f"{cfg.cv.repeats} repeat(s) of {cfg.cv.folds} folds ({sizes} test cases); each trains on its train "
             f"cases, {cfg.cv.inner_val_fraction:.0%} of them held as inner val, {inner}; logs in "
             f"{run.logs('cv').parent}")
    failure = None
    bar = EpochProgress([t for task in tasks for t in fold_trainings(task)], f"cv ({len(tasks)} folds)",
                        enabled=progress and cfg.cluster.kind != "debug")  # debug: the folds run in this process
    try:
        run_array(run.executor("cv"), FoldJob(), tasks, parallelism=cfg.cluster.parallelism, poll_s=cfg.cluster.poll_s,
                  on_poll=bar.poll, ledger=run.dir / "cv" / "slurm-job.json")  # on SLURM: never a second array
    except ArrayJobError as err:
        failure = err
    finally:
        bar.close()
    failed = {f.index for f in failure.failures} if failure else set()  # their records are another run's, if any
    records = [[] if i in failed else [r for r in (read_record(t.predict_dir / "slides", s) for s in t.slides())
                                       if r is not None] for i, t in enumerate(tasks)]
    if failure is not None and not any(records):
        raise failure
    return records, failure


def run_cv(run: Run, progress: bool = True, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) every fold of every repeat (``progress``: a bar over their epochs on a terminal), the
    baseline in the same folds, the shipped ensemble, and write the report into ``<run>/cv`` (``cv-last``,
    ``cv-tta`` for the other prediction variants); ``restart``: the earlier folds set aside first."""
    start = time.perf_counter()
    cfg = run.config
    out = run.dir / f"cv{variant_suffix(cfg.cv.checkpoint, cfg.predict.tta)}"
    require_model(cfg.model)  # a backbone's mistakes named now, not by every fold's task
    cfg.check_trainable()
    with run.session("cv"):
        inputs = run.inputs()
        tasks = plan_folds(run, inputs.records, inputs.classes)
        if restart:
            set_folds_aside(run)
        refuse_other_folds(run.dir / "folds.csv", tasks)
        write_folds_csv(run.dir / "folds.csv", tasks)
        records, failure = run_folds(run, tasks, progress)
        report = assemble_report(cfg, tasks, records, inputs.classes)
        report["failed_folds"] = [f.index for f in failure.failures] if failure else []
        report["seconds"] = stage_seconds(tasks)
        if cfg.cv.baseline:
            begin = time.perf_counter()
            report["baseline"] = baseline(run, inputs.records, inputs.classes, report,
                                          test_cases_by_repeat(tasks, cfg.cv.repeats))
            report["seconds"]["baseline"] = time.perf_counter() - begin
        report["ensemble"] = ship_ensemble(tasks, run.dir, cfg.cv.checkpoint)
        report["minutes"] = (time.perf_counter() - start) / 60
        _write_outputs(out, report, tasks, records, inputs.classes, cfg.predict.aggregate)
    log.info(format_cv_report(report))
    page = write_run_report(run.dir)
    log.info(f"report: {out / 'report.json'}, {out / 'report.txt'}, {out / 'predictions.csv'}, {page}; "
             f"{report['minutes']:.1f} min")
    if failure is not None:
        raise failure
    return report


def baseline(run: Run, records: list[ImageRecord], classes: list[str], cnn: dict[str, Any],
             assignments: list[list[list[str]]]) -> dict[str, Any]:
    """The reference baseline in the CNN's folds (``jobs.baseline``): in this process, or on SLURM as one job (its
    features read every image of the cohort: no work for the login node the command runs on)."""
    args = (run.config, records, classes, run.dir / "baseline", cnn, assignments)
    if run.config.cluster.kind != "slurm":
        return run_baseline(*args)
    return run.one_job("baseline", run.dir / "baseline", run_baseline_task, *args)


def test_cases_by_repeat(tasks: list[FoldTask], repeats: int) -> list[list[list[str]]]:
    """Each repeat's folds as lists of test cases, read off the planned tasks (so the baseline runs in exactly
    the folds the CNN did)."""
    return [[sorted({r.case for r in t.test}) for t in tasks if t.repeat == r] for r in range(repeats)]


def assemble_report(cfg: Config, tasks: list[FoldTask], records: list[list[dict[str, Any]]],
                    classes: list[str]) -> dict[str, Any]:
    """The first repeat's report at the top level, every repeat's in ``repeats``, their mean and sd in
    ``across_repeats``, and which epoch every fold kept and why."""
    per_repeat = []
    for r in range(cfg.cv.repeats):
        mine = [fold for t, fold in zip(tasks, records) if t.repeat == r]
        per_repeat.append(cv_report(mine, classes, cfg.cv.bootstrap, cfg.cv.confidence, cfg.cv.seed + r)
                          if any(mine) else None)
    done = [rep for rep in per_repeat if rep is not None]
    report = {**done[0], "repeats": [{**rep, "seed": cfg.cv.seed + r} if rep else None
                                     for r, rep in enumerate(per_repeat)],
              "across_repeats": across_repeats(done), "tta": cfg.predict.tta, "checkpoint": cfg.cv.checkpoint}
    report["kept"] = [kept_epoch(t, cfg) for t in tasks]
    return report


def stage_seconds(tasks: list[FoldTask]) -> dict[str, float]:
    """Task seconds spent tiling, training and predicting, summed over the folds that ran in this command
    (a rerun that resumes finished folds counts only what it redid)."""
    total = {"tile": 0.0, "train": 0.0, "predict": 0.0}
    for task in tasks:
        path = task.predict_dir / "seconds.json"
        if path.is_file():
            for stage, value in json.loads(path.read_text()).items():
                total[stage] = total.get(stage, 0.0) + float(value)
    return total


def kept_epoch(task: FoldTask, cfg: Config) -> dict[str, Any]:
    """Which epoch a fold predicted with, and why."""
    path = Path(task.fold_dir) / "train" / "history.json"
    history = json.loads(path.read_text()) if path.is_file() else []
    if task.checkpoint == "last" and history:
        index, why = len(history) - 1, f"epoch {len(history)}: the last (cv.checkpoint=last)"
    else:
        index, why = best_index(history, cfg.train.select, cfg.train.first_candidate), explain(
            history, cfg.train.select, cfg.train.first_candidate)
    return {"repeat": task.repeat, "fold": task.fold, "epochs": len(history),
            "epoch": history[index]["epoch"] + 1 if index is not None else None, "why": why}


def ship_ensemble(tasks: list[FoldTask], run_dir: Path, checkpoint: str) -> dict[str, Any]:
    """``<run>/ensemble.pt`` (``ensemble-last.pt``): the first repeat's fold models as one checkpoint that
    `lymphoma predict` averages. A fold model whose inner-val balanced accuracy is at or below chance
    (1/classes, what a model that predicts one class for everything scores) is left out; with none left, or a
    fold without a checkpoint, none is written."""
    paths = [Path(t.fold_dir) / "train" / "checkpoints" / f"{checkpoint}.pt" for t in tasks if t.repeat == 0]
    if not all(p.is_file() for p in paths):
        log.info("no ensemble written: a fold of the first repeat has no checkpoint")
        return {"path": None, "members": [], "left_out": [], "why": "a fold of the first repeat has no checkpoint"}
    members, left_out = [], []
    for path in paths:
        (left_out if at_chance(path) else members).append(str(path))
    if not members:
        log.info("no ensemble written: every fold model is at or below chance on its inner val")
        return {"path": None, "members": [], "left_out": left_out,
                "why": "every fold model is at or below chance on its inner val"}
    out = run_dir / ("ensemble.pt" if checkpoint == "best" else f"ensemble-{checkpoint}.pt")
    write_ensemble([Path(m) for m in members], out)
    log.info(f"ensemble of {len(members)} fold model(s): {out}" + (f" ({len(left_out)} left out: at or below chance "
                                                                     "on inner val)" if left_out else ""))
    return {"path": str(out), "members": members, "left_out": left_out}


def at_chance(path: Path) -> bool:
    """Whether the checkpoint's epoch scored at most chance balanced accuracy on its inner val (1/classes: a
    model that predicts one class for everything scores exactly that)."""
    from lymphoma.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    entry = next((h for h in state.get("history", []) if h["epoch"] == state["epoch"]), {})
    return chance_level(float(entry.get("val_balanced_accuracy", 1.0)), len(state["classes"]))


def _write_outputs(out: Path, report: dict[str, Any], tasks: list[FoldTask], records_by_fold: list[list[dict[str, Any]]],
                   classes: list[str], aggregate: str) -> None:
    """report.json/.txt, predictions.csv (every repeat's) and the first repeat's summary and confusions."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.txt", format_cv_report(report) + "\n")
    rows = [[t.repeat, t.fold, r["key"], r.get("case") or "", r.get("label") or "", r["status"],
             image_class(r, "vote") if r["status"] == "ok" else "", image_class(r, "mean") if r["status"] == "ok" else "",
             f"{r['confidence']:.4f}" if r["status"] == "ok" else "", r.get("error", "")]
            for t, fold in zip(tasks, records_by_fold) for r in fold]
    write_csv_atomic(out / "predictions.csv", ["repeat", "fold", "image", "case", "truth", "status", "vote_class",
                                                "mean_prob_class", "confidence", "error"], rows)
    write_report([r for t, fold in zip(tasks, records_by_fold) if t.repeat == 0 for r in fold], classes, out, aggregate)


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma cv``."""
    run_cv(run, progress=not args.no_progress, restart=args.restart)
    return 0
