"""`lymphoma mil`: attention-MIL on the embeddings of `lymphoma features`, cross-validated in exactly the folds
of `lymphoma cv` (same cases per fold for the same cv.folds and cv.seed), one bag per slide or per case; then a
model on every case for new slides (``mil.pt``)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from hpc.task import task_setup
from jobs.run_folder import Run, folder_lock, prepare_out_dir
from lymphoma.checkpoint import load_state, save_checkpoint
from lymphoma.cohort_report import metrics_lines, probability_record, seen_cases_notes, write_report
from lymphoma.crossval import across_repeats, cv_report, format_cv_report, grouped_folds
from lymphoma.errors import InputError
from lymphoma.features import encoder_cases_seen, read_features
from lymphoma.files import write_csv_atomic, write_text_atomic
from lymphoma.inputs import ImageRecord
from lymphoma.mil import Bag, predict_bag, train_mil
from lymphoma.prediction_inputs import MIL_PREDICT_MARKER

log = logging.getLogger(__name__)


def embedded_slides(features_dir: Path) -> list[dict[str, str]]:
    """The slides ``lymphoma features`` embedded into ``features_dir`` (the rows of its ``features.csv``)."""
    listing = features_dir / "features.csv"
    if not listing.is_file():
        raise InputError(f"{features_dir}: no features.csv, so no embeddings of `lymphoma features` there; give the "
                         "--out folder of a finished `lymphoma features`")
    with listing.open(newline="", encoding="utf-8") as handle:
        return [r for r in csv.DictReader(handle) if r["status"] == "ok"]


def read_cohort(features_dir: Path) -> list[dict[str, str]]:
    """The embedded slides with a class and a case, from ``features.csv``."""
    rows = [r for r in embedded_slides(features_dir) if r["label"] and r["case"]]
    if not rows:
        raise InputError(f"{features_dir / 'features.csv'}: no embedded slide with a class and a case to learn from")
    return rows


def make_bags(rows: list[dict[str, str]], classes: list[str], bag: str) -> tuple[list[Bag], dict[str, Any]]:
    """One bag per slide, or per case (its slides' tiles together), and the encoder they come from (backbone,
    fingerprint, tile size): every file must come from one encoder."""
    slides, encoders = {}, set()
    for row in rows:
        if row["label"] not in classes:
            raise InputError(f"{row['file']}: class {row['label']!r} is not one of data.classes {classes}")
        features, _, attrs = read_features(row["file"])
        encoders.add((str(attrs.get("backbone")), str(attrs.get("fingerprint")), int(attrs.get("tile_size", 0))))
        slides[row["key"]] = (features, classes.index(row["label"]), row["case"])
    if len(encoders) > 1:
        raise InputError(f"the feature files come from {len(encoders)} encoders or settings ({sorted(encoders)[:2]}); "
                         "extract every slide with one encoder into one folder")
    groups: dict[str, list[str]] = defaultdict(list)
    for key, (_, _, case) in slides.items():
        groups[key if bag == "slide" else case].append(key)
    bags = [Bag(name, np.concatenate([slides[k][0] for k in keys]), slides[keys[0]][1],
                np.concatenate([[k] * len(slides[k][0]) for k in keys])) for name, keys in sorted(groups.items())]
    backbone, fingerprint, tile_size = encoders.pop()
    return bags, {"backbone": backbone, "fingerprint": fingerprint, "tile_size": tile_size}


def fold_records(bags: list[Bag], case_of: dict[str, str], rows_by_key: dict[str, dict[str, str]],
                 test_cases: set[str], classes: list[str], settings: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train on the bags outside ``test_cases``, predict those inside: one record per slide (a case bag's
    prediction goes to each of its slides, as the case-level figure counts it), and each slide's attention."""
    train = [b for b in bags if case_of[b.key] not in test_cases]
    model = train_mil(train, len(classes), settings)
    records, attention = [], {}
    for bag in (b for b in bags if case_of[b.key] in test_cases):
        probs, weights = predict_bag(model, bag.features)
        for key in dict.fromkeys(bag.slides.tolist()):
            row = rows_by_key[key]
            attention[key] = weights[bag.slides == key]
            records.append(probability_record(probs, classes, key=key, path=row["path"], label=row["label"],
                                              case=row["case"], bag=bag.key))
    return records, attention


def feature_folders(features_dir: Path, repeats: int, folds: int) -> dict[tuple[int, int], Path]:
    """Where each fold's embeddings are: one folder for every fold (one encoder), or per fold
    ``repeat-<r>/fold-<k>/features`` of a `lymphoma cv` run (each fold's own tile model as its encoder, trained
    without that fold's test cases)."""
    if (features_dir / "features.csv").is_file():
        return {(r, k): features_dir for r in range(repeats) for k in range(folds)}
    own = {(r, k): features_dir / f"repeat-{r}" / f"fold-{k}" / "features" for r in range(repeats) for k in range(folds)}
    missing = [str(path) for path in own.values() if not (path / "features.csv").is_file()]
    if len(missing) == len(own):
        raise InputError(f"{features_dir / 'features.csv'} not found: run `lymphoma features` first (or set "
                         "mil.features to its --out, or to a `lymphoma cv` run whose folds hold features/)")
    if missing:
        raise InputError(f"per-fold embeddings missing in {', '.join(missing[:3])}: run `lymphoma features "
                         "--checkpoint <fold>/train/checkpoints/best.pt --out <fold>/features` for every fold")
    return own


def mil_features_dir(run: Run) -> Path:
    """Where the embeddings of ``lymphoma mil`` are: ``mil.features``, else ``<run>/features``."""
    return Path(run.config.mil.features) if run.config.mil.features else run.dir / "features"


def mil_identity(run: Run) -> dict[str, Any]:
    """What makes the models of ``lymphoma mil`` (kept in its report.json): the mil settings but heatmaps, the folds
    (cv.folds, cv.seed, cv.repeats) and the encoder of the embeddings (its encoder.json, where one encoder made them)."""
    cfg = run.config
    encoder = mil_features_dir(run) / "encoder.json"
    identity = {**{f"mil.{k}": v for k, v in vars(cfg.mil).items() if k != "heatmaps"}, "cv.folds": cfg.cv.folds,
                "cv.seed": cfg.cv.seed, "cv.repeats": cfg.cv.repeats,
                "encoder": json.loads(encoder.read_text()).get("identity") if encoder.is_file() else None}
    return json.loads(json.dumps(identity, default=str))  # as report.json gives it back


def refuse_other_mil(run: Run) -> None:
    """An InputError where ``<run>/mil`` holds the models and report of other settings (or of an earlier version,
    which recorded none): this run would replace them. ``lymphoma mil --restart`` sets them aside."""
    path = run.dir / "mil" / "report.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text()).get("identity") or {}
    except (ValueError, OSError):  # cut short: its settings are unknown
        before = {}
    now = mil_identity(run)
    differ = [key for key in now if before.get(key) != now[key]]
    if differ:
        named = [f"{key} ({before.get(key)} there, {now[key]} now)" if key != "encoder" else
                 "the encoder of the embeddings" for key in differ[:4]]
        shown = f"they differ in: {', '.join(named)}" if before else "made by an earlier version, which recorded none"
        raise InputError(f"{path.parent} holds a MIL model and report of other settings ({shown}), "
                         "which this run would replace: `lymphoma mil --restart` sets them aside in mil.before-<date-"
                         "time>/ (kept) and trains afresh; or give another run.name")


def run_mil(run: Run, progress: bool = False) -> dict[str, Any]:
    """Cross-validate the MIL model in the folds of `lymphoma cv`, report as `lymphoma cv` does, save attention and
    (with one encoder) a model trained on every case; ``progress``: a bar of the models trained, on a terminal."""
    start = time.perf_counter()
    cfg, settings = run.config, run.config.mil
    features_dir = mil_features_dir(run)
    folders = feature_folders(features_dir, cfg.cv.repeats, cfg.cv.folds)
    cohorts = {folder: read_cohort(folder) for folder in set(folders.values())}
    first = next(iter(cohorts.values()))
    classes = list(cfg.data.classes or sorted({r["label"] for r in first}))
    made = {folder: make_bags(rows, classes, settings.bag) for folder, rows in cohorts.items()}
    bags_of = {folder: bags for folder, (bags, _) in made.items()}
    records = [ImageRecord(r["path"], r["label"], r["case"]) for r in first]
    out = run.dir / "mil"
    reports, predictions, unreadable, drawn = [], [], [], 0
    seen_of, leaked = {folder: encoder_cases_seen(folder) for folder in cohorts}, set()
    bar = tqdm(total=cfg.cv.repeats * cfg.cv.folds + (len(cohorts) == 1), unit="model", desc="mil",
               disable=None if progress else True)  # None: on a terminal only
    for r in range(cfg.cv.repeats):
        by_fold = []
        for k, test_cases in enumerate(grouped_folds(records, cfg.cv.folds, cfg.cv.seed + r)):
            leaked |= (seen_of[folders[r, k]] or set()) & set(test_cases)
            rows_by_key = {row["key"]: row for row in cohorts[folders[r, k]]}
            bags = bags_of[folders[r, k]]
            case_of = {b.key: rows_by_key[str(b.slides[0])]["case"] for b in bags}
            fold, attention = fold_records(bags, case_of, rows_by_key, set(test_cases), classes, settings)
            by_fold.append(fold)
            bar.update()
            predictions += [[r, k, rec["key"], rec["case"], rec["label"], rec["majority_class"],
                             f"{rec['confidence']:.4f}"] for rec in fold]
            if r == 0:
                unreadable += save_attention_maps(out / "attention", attention, rows_by_key, settings.heatmaps)
                drawn += len(attention)
        reports.append({**cv_report(by_fold, classes, cfg.cv.bootstrap, cfg.cv.confidence, cfg.cv.seed + r),
                        "seed": cfg.cv.seed + r})
    warn_unreadable(unreadable, drawn, out / "attention")
    report = {**reports[0], "repeats": reports, "across_repeats": across_repeats(reports), "bag": settings.bag,
              "features": str(features_dir), "encoders": "one per fold" if len(cohorts) > 1 else "one",
              "encoder_saw_test_cases": None if None in seen_of.values() else sorted(leaked),
              "n_bags": len(next(iter(bags_of.values()))), "minutes": (time.perf_counter() - start) / 60,
              "identity": mil_identity(run)}
    out.mkdir(parents=True, exist_ok=True)
    if len(cohorts) == 1:
        bags = next(iter(bags_of.values()))
        final = train_mil(bags, len(classes), settings)
        bar.update()
        learnt = {r["case"] for r in first} | (next(iter(seen_of.values())) or set())  # and the encoder's
        save_checkpoint({"model": final.state_dict(), "in_dim": int(bags[0].features.shape[1]), "classes": classes,
                         "settings": vars(settings), "features": str(features_dir), "cases_seen": sorted(learnt),
                         "encoder": next(iter(made.values()))[1]}, out / "mil.pt")  # atomic: never half a file
    bar.close()
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.txt", format_mil_report(report) + "\n")
    write_csv_atomic(out / "predictions.csv", ["repeat", "fold", "image", "case", "truth", "predicted", "confidence"],
                     predictions)
    return report


def run_mil_task(run: Run) -> dict[str, Any]:
    """The SLURM job's entry point: the MIL cross-validation with the task's threads (``hpc.task``)."""
    with task_setup():
        return run_mil(run)


def mil_on_slurm(run: Run) -> dict[str, Any]:
    """`lymphoma mil --cluster slurm`: the MIL cross-validation as one job on a compute node (ten fold assignments
    take half an hour: not work for the login node the command runs on), waited for; logs in ``<run>/mil/logs``."""
    return run.one_job("mil", run.dir / "mil", run_mil_task, run)


def save_attention_maps(folder: Path, attention: dict[str, np.ndarray], rows_by_key: dict[str, dict[str, str]],
                        pictures: bool = True) -> list[str]:
    """``<key>.npz`` (coords, attention) and, with ``pictures``, ``<key>.png``: the attention over the slide's
    thumbnail. MIL needs only the embeddings: a slide not readable here (the features made on another machine, the
    slide moved or damaged since) gets its npz without a picture; returns those slides' errors."""
    from lymphoma.plots import save_attention
    from lymphoma.settings import TileSettings
    from lymphoma.tile_sources import open_tiles

    folder.mkdir(parents=True, exist_ok=True)
    unreadable: list[str] = []
    for key, weights in attention.items():
        _, coords, attrs = read_features(rows_by_key[key]["file"])
        np.savez_compressed(folder / f"{key}.npz", coords=coords, attention=weights)
        if pictures and "tiles" in attrs:
            try:
                source = open_tiles(rows_by_key[key]["path"], TileSettings(**json.loads(attrs["tiles"])))
            except (InputError, OSError) as err:
                unreadable.append(str(err))
                continue
            save_attention(source.overview, coords, weights, source.coord_scale, source.extent, source.step,
                           folder / f"{key}.png")
    return unreadable


def warn_unreadable(unreadable: list[str], total: int, folder: Path) -> None:
    """One warning for the attention pictures that ``save_attention_maps`` could not draw."""
    if unreadable:
        log.warning(f"{len(unreadable)} of {total} attention picture(s) not drawn: their slides are not readable "
                    f"here (first: {unreadable[0]}); every slide's coords and attention are in {folder}/<slide>.npz")


def leak_warning(report: dict[str, Any]) -> Optional[str]:
    """Where the encoder learnt from test cases: that the figures are not held out, and what to do instead."""
    leaked = report.get("encoder_saw_test_cases") or []
    if not leaked:
        return None
    return (f"the encoder learnt from (or chose its epoch on) {len(leaked)} of the {report['n_cases']} cases these "
            f"folds test ({', '.join(leaked[:5])}{' ...' if len(leaked) > 5 else ''}): the figures are not held out. "
            "Embed with a pretrained backbone (model.backbone, model.weights), or give each fold its own encoder "
            "(mil.features: a `lymphoma cv` run whose folds hold features/ made by their own models, with the same "
            "cv.folds and cv.seed)")


def format_mil_report(report: dict[str, Any], warn: bool = True) -> str:
    """The pooled figures with intervals and the repeats, as `lymphoma cv` prints them; first (``warn``), where the
    encoder learnt from test cases, that they are not held out."""
    warning = leak_warning(report) if warn else None
    return "\n".join([*([f"WARNING: {warning}"] if warning else []),
                      f"attention-MIL, one bag per {report['bag']} ({report['n_bags']} bags), embeddings from "
                      f"{report['features']} ({'one encoder' if report['encoders'] == 'one' else 'each fold its own encoder'})",
                      format_cv_report(report)])


def predict_mil(run: Run, features_dir: Path, out: Path | None = None) -> tuple[Path, Optional[dict[str, Any]]]:
    """Classify the slides (or cases) embedded in ``features_dir`` with ``<run>/mil/mil.pt``: ``predictions.csv``
    (class and probabilities per bag) and each slide's attention, in ``out`` (default ``<run>/mil/predict/<name of
    features_dir>``); where slides have a class, the cohort report too (``write_report``: its metrics are returned).
    The files must come from the encoder and tiling the model was trained on."""
    from lymphoma.mil import GatedAttentionMIL
    from lymphoma.settings import MILSettings

    path = run.dir / "mil" / "mil.pt"
    if not path.is_file():
        raise InputError(f"{path} not found: run `lymphoma mil` (with one encoder for every fold) first")
    state = load_state(path, what="MIL model", fix="train it again with `lymphoma mil`")
    settings, classes = MILSettings(**state["settings"]), list(state["classes"])
    rows = embedded_slides(features_dir)
    if not rows:
        raise InputError(f"{features_dir / 'features.csv'}: no slide was embedded there (every one failed); nothing "
                         "to classify")
    # new slides may have no class (bags need one: it is not used) or no case (each slide its own)
    rows_by_key = {r["key"]: {**r, "label": r["label"] or classes[0], "case": r["case"] or r["key"]} for r in rows}
    bags, encoder = make_bags(list(rows_by_key.values()), classes, settings.bag)
    if encoder["fingerprint"] != state["encoder"]["fingerprint"]:
        raise InputError(f"{features_dir}: embedded by {encoder['backbone']} (tile size {encoder['tile_size']}) with "
                         f"other settings than the MIL model was trained on ({state['encoder']['backbone']}, tile size "
                         f"{state['encoder']['tile_size']}); extract with the same encoder and settings")
    model = GatedAttentionMIL(int(state["in_dim"]), len(classes), settings.hidden, settings.attention, settings.dropout)
    model.load_state_dict(state["model"])
    model.eval()
    out = prediction_folder(out or run.dir / "mil" / "predict" / features_dir.resolve().name, features_dir)
    lines, attention, probs_of = [], {}, {}
    for bag in bags:
        probs, weights = predict_bag(model, bag.features)
        for key in dict.fromkeys(bag.slides.tolist()):
            attention[key], probs_of[key] = weights[bag.slides == key], probs
            lines.append([bag.key, key, rows_by_key[key]["path"], classes[int(probs.argmax())],
                          *[f"{p:.4f}" for p in probs]])
    with folder_lock(out, "mil"):  # two predictions into one folder would mix their attention maps
        write_csv_atomic(out / "predictions.csv", ["bag", "slide", "path", "predicted",
                                                   *[f"prob_{c}" for c in classes]], lines)
        unreadable = save_attention_maps(out / "attention", attention, rows_by_key, settings.heatmaps)
        metrics = report_known(out, rows, probs_of, classes, state.get("cases_seen"), run)
    warn_unreadable(unreadable, len(attention), out / "attention")
    return out, metrics


def report_known(out: Path, rows: list[dict[str, str]], probs_of: dict[str, np.ndarray], classes: list[str],
                 cases_seen: Optional[list[str]], run: Run) -> Optional[dict[str, Any]]:
    """The cohort report of the slides with a class (each slide's class its bag's), as `lymphoma predict` writes
    it, with a warning where the MIL model or its encoder learnt from their cases; None where no slide has one."""
    records = [probability_record(probs_of[r["key"]], classes, key=r["key"], path=r["path"], label=r["label"],
                                  case=r["case"] or r["key"], n_tiles=r["n_tiles"]) for r in rows]
    if not any(r["label"] for r in records):
        return None
    notes = seen_cases_notes(records, cases_seen, judge="the report of `lymphoma mil`, in the folds of `lymphoma cv`")
    return write_report(records, classes, out, "vote", notes, intervals=(run.config.cv.bootstrap,
                                                                        run.config.cv.confidence))


def prediction_folder(out: Path, features_dir: Path) -> Path:
    """``out``, new or holding the predictions of the same ``features_dir`` (named in its ``features.txt``):
    those of another cohort are never replaced or mixed with these."""
    out = prepare_out_dir(out.absolute(), MIL_PREDICT_MARKER, "`lymphoma mil --predict`")
    source, named = out / "features.txt", str(features_dir.resolve())
    earlier = source.read_text(encoding="utf-8").strip() if source.is_file() else named
    if earlier != named:
        raise InputError(f"{out} holds the MIL predictions of {earlier}; give --out another folder for those of "
                         f"{named}")
    write_text_atomic(source, named + "\n")
    return out


def command(args: argparse.Namespace, run: Run) -> int:
    """``lymphoma mil`` (``--predict DIR``: classify the embedded slides of DIR with the saved model)."""
    if args.out and not args.predict:
        raise InputError("--out goes with --predict (a trained MIL model and its report go to <run>/mil/)")
    if args.predict:
        out, metrics = predict_mil(run, Path(args.predict), args.out)
        if metrics is not None:
            for note in metrics.get("warnings", []):
                log.warning(f"lymphoma mil: {note}")
            log.info("\n".join(metrics_lines(metrics) + [f"report: {out / 'metrics.json'}, {out / 'summary.csv'}"]))
        log.info(f"predictions: {out / 'predictions.csv'}; attention maps: {out / 'attention'}")
        return 0
    with run.create().lock("mil"):  # two trainings would leave one's model beside the other's report
        if args.restart:
            run.set_aside(run.dir / "mil", "MIL model and report")
        refuse_other_mil(run)
        report = mil_on_slurm(run) if run.config.cluster.kind == "slurm" else run_mil(run, not args.no_progress)
    if (warning := leak_warning(report)) is not None:
        log.warning(f"lymphoma mil: {warning}")
    log.info(format_mil_report(report, warn=False))
    log.info(f"report: {run.dir / 'mil' / 'report.json'}; attention maps: {run.dir / 'mil' / 'attention'}; model for "
             f"new slides: {run.dir / 'mil' / 'mil.pt'}; {report['minutes']:.1f} min")
    return 0
