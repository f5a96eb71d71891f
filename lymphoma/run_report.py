"""``report.html``: one self-contained page of a run folder that a person would rather look at than read.

Config, split, tiles, training curves, prediction metrics with confusion, ROC and reliability plots, a per-slide
table with heat maps, cross-validation figures, validations, embeddings and MIL, and links to the files; every
picture is embedded (data URIs), so the page can be mailed or moved on its own. Sections whose files a run does
not have are left out.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import urllib.parse
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

from lymphoma import __version__
from lymphoma.cohort_report import figure_text
from lymphoma.errors import InputError
from lymphoma.files import write_text_atomic

log = logging.getLogger(__name__)

MAX_SLIDE_PICTURES = 200  # slides whose heat maps are embedded; the table links the rest
THUMB_SIDE = 160  # pixels of an embedded heat map's longer side (the full picture is linked)
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.ok{color:#1a7f37}.bad{color:#c62828}
.warn{background:#fff4e5;border-left:4px solid #ef6c00;padding:.4em .8em}
figure{display:inline-block;margin:.4em 1em .4em 0;vertical-align:top;max-width:380px}figcaption{font-size:.85em;color:#555}
img{max-width:100%}.thumb{max-height:96px}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
nav a{margin-right:1em}"""


def _picture(path: Path, alt: str, css: str = "", max_side: Optional[int] = None) -> str:
    """An embedded picture (a data URI; a JPEG of at most ``max_side`` pixels when given), nothing when the file is
    missing, and a note naming it (with a warning) when it is not a readable picture."""
    from PIL import Image

    if not path.is_file():
        return ""
    try:
        raw, kind = path.read_bytes(), "png"
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # decoded here, so that a damaged file is never embedded as a broken picture
            if max_side is not None:  # a thumbnail of tissue: JPEG is a tenth of the PNG's size
                image = image.convert("RGB")
                image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
                raw, kind = buffer.getvalue(), "jpeg"
    except (OSError, ValueError, SyntaxError) as error:  # PIL: truncated, corrupt, not a picture
        log.warning(f"report: {path} is not a readable picture ({error}); the page names it instead")
        return f"<span class=bad>unreadable picture: {html.escape(path.name)}</span>"
    data = base64.b64encode(raw).decode()
    return f'<img src="data:image/{kind};base64,{data}" alt="{html.escape(alt)}"{f" class={css!r}" if css else ""}>'


def _figure(path: Path, caption: str) -> str:
    picture = _picture(path, caption)
    return f"<figure>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>" if picture else ""


def _link(run_dir: Path, path: Path, text: Optional[str] = None) -> str:
    target = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
    href = urllib.parse.quote(target.as_posix())  # a file name's '#', '%' or '?' is part of the path, not the URL's
    return f'<a href="{html.escape(href)}">{html.escape(text or str(target))}</a>'


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """A table whose first ``left`` columns are text (left-aligned) and the rest figures."""
    def cell(tag: str, i: int, value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return f"<{tag}{' class=l' if i < left else ''}>{text}</{tag}>"
    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class UnreadableFile(ValueError):
    """A file of the run folder that the page cannot read: damaged, cut short, or not in its format."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise UnreadableFile(f"{path} cannot be read ({error})") from error


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise UnreadableFile(f"{path} is not valid JSON ({error}): cut short or edited by hand") from error


def _read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))


def _config(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return ""
    return (f"<h2 id=config>Config</h2><p>{_link(run_dir, path)}: every default, file and override, resolved.</p>"
            f"<details><summary>show</summary><pre>{html.escape(_read_text(path))}</pre></details>")


def _split(run_dir: Path) -> str:
    path = run_dir / "split.csv"
    if not path.is_file():
        return ""
    rows = _read_csv(path)
    images = Counter((r["phase"], r["label"]) for r in rows)
    cases = Counter((r["phase"], r["label"]) for r in {(r["phase"], r["label"], r["case"]): r for r in rows}.values())
    labels = sorted({r["label"] for r in rows})
    phases = [p for p in ("train", "val", "test") if any(k[0] == p for k in images)]
    table = _table(["phase"] + [f"{c} images (cases)" for c in labels],
                   [[p] + [f"{images[(p, c)]} ({cases[(p, c)]})" for c in labels] for p in phases])
    return f"<h2 id=split>Split by case</h2><p>{_link(run_dir, path)}: no case on two sides.</p>{table}"


def _tiles(run_dir: Path) -> str:
    path = run_dir / "tiles" / "manifest.json"
    if not path.is_file():
        return ""
    manifest = _read_json(path)
    classes = manifest["classes"]
    rows = [[phase, len(e["shards"]), e["n_images"], e["n_tiles"]] + [e["tiles_per_class"][c] for c in classes]
            for phase, e in manifest["phases"].items()]
    skipped = manifest.get("skipped", [])
    skipped_rows = [[html.escape(Path(s["path"]).name), html.escape(s["reason"])] for s in skipped[:50]]
    return (f"<h2 id=tiles>Tiles</h2><p>{_link(run_dir, path)}</p>"
            + _table(["phase", "shards", "images", "tiles"] + [f"{c} tiles" for c in classes], rows)
            + (f"<p>{len(skipped)} input(s) skipped:</p>" + _table(["file", "reason"], skipped_rows, left=2)
               if skipped else ""))


def _curves_png(history: list[dict[str, Any]]) -> bytes:
    """Training curves: losses and validation accuracy per epoch (matplotlib, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    losses.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    losses.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    accuracy.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    accuracy.plot(epochs, [h.get("val_balanced_accuracy", float("nan")) for h in history], marker="o",
                  label="val balanced accuracy")
    from matplotlib.ticker import MaxNLocator

    for axes, name in ((losses, "loss"), (accuracy, "accuracy")):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _training(run_dir: Path) -> str:
    path = run_dir / "train" / "history.json"
    if not path.is_file():
        return ""
    history = _read_json(path)
    if not history:
        return ""
    data = base64.b64encode(_curves_png(history)).decode()
    best = min(history, key=lambda h: h["val_loss"])
    rows = [[h["epoch"] + 1, h["train_loss"], h["val_loss"], h["val_accuracy"], h.get("val_balanced_accuracy", "")]
            for h in history]
    return (f"<h2 id=training>Training</h2><p>{len(history)} epoch(s); lowest val loss {best['val_loss']:.4f} at "
            f"epoch {best['epoch'] + 1}. {_link(run_dir, path)}, {_link(run_dir, run_dir / 'train' / 'checkpoints')}"
            f", TensorBoard: {_link(run_dir, run_dir / 'train' / 'tensorboard')}</p>"
            f'<img src="data:image/png;base64,{data}" alt="training curves">'
            "<details><summary>per epoch</summary>"
            + _table(["epoch", "train loss", "val loss", "val accuracy", "val balanced"], rows, left=0)
            + "</details>")


def _metrics_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for level in ("image", "case"):
        m = metrics.get(level)
        if m:
            rows.append([level, m.get("n", "")] + [figure_text(m, key, missing="")
                                                   for key in ("accuracy", "balanced_accuracy", "macro_auc", "ece")])
    return rows


def _plots(folder: Path) -> str:
    names = [("confusion", "confusion matrix"), ("roc", "ROC curves, one-vs-rest"), ("reliability", "reliability")]
    return "".join(_figure(folder / f"{stem}_{level}.png", f"{caption} ({level} level)")
                   for level in ("image", "case") for stem, caption in names)


def _slide_rows(run_dir: Path, folder: Path, rows: list[dict[str, str]]) -> str:
    slides = folder / "slides"
    out = []
    for i, row in enumerate(rows):
        key, ok = row["slide"], row["status"] == "ok"
        truth, predicted = row.get("truth", ""), row.get("predicted", "")
        mark = "" if not truth or not ok else (" class=ok" if truth == predicted else " class=bad")
        embed = i < MAX_SLIDE_PICTURES
        picture = _picture(slides / f"{key}.png", f"tile classes of {key}", "thumb", THUMB_SIDE) if embed else ""
        maps = _picture(slides / f"{key}-probabilities.png", f"probability maps of {key}", "thumb",
                        3 * THUMB_SIDE) if embed else ""
        files = " ".join(_link(run_dir, slides / f"{key}{suffix}", suffix.lstrip("."))
                         for suffix in (".json", ".npz", ".png", ".geojson", ".h5") if (slides / f"{key}{suffix}").is_file())
        out.append(f"<tr><td class=l>{html.escape(key)}</td><td class=l>{html.escape(truth)}</td>"
                   f"<td class=l{mark}>{html.escape(predicted if ok else 'failed: ' + row.get('error', ''))}</td>"
                   f"<td>{html.escape(row.get('confidence', ''))}</td><td>{html.escape(row.get('n_tiles', ''))}</td>"
                   f"<td class=l>{picture}{maps}</td><td class=l>{files}</td></tr>")
    return ("<table><tr><th class=l>slide</th><th class=l>truth</th><th class=l>predicted</th><th>confidence</th>"
            "<th>tiles</th><th class=l>tile classes / probabilities</th><th class=l>files</th></tr>"
            + "".join(out) + "</table>")


def _prediction(run_dir: Path, folder: Path) -> str:
    metrics_path, summary = folder / "metrics.json", folder / "summary.csv"
    if not metrics_path.is_file():
        return ""
    metrics = _read_json(metrics_path)
    rows = _read_csv(summary) if summary.is_file() else []
    shown = "" if len(rows) <= MAX_SLIDE_PICTURES else f" (pictures of the first {MAX_SLIDE_PICTURES})"
    return (f"<h2 id=prediction>Prediction</h2><p>{metrics.get('predicted', '?')} of {metrics.get('slides', '?')} "
            f"slide(s) predicted, {metrics.get('failed', 0)} failed; {metrics.get('aggregate', 'vote')} of tiles. "
            f"{_link(run_dir, metrics_path)}, {_link(run_dir, summary)}"
            + (f", {_link(run_dir, folder / 'cases.csv')} (one row per case)" if (folder / "cases.csv").is_file() else "")
            + (f" In brackets: {metrics['confidence']:.0%} intervals from {metrics['bootstrap']} resamples of the cases."
               if "confidence" in metrics else "") + "</p>"
            + "".join(f"<p class=warn>Warning: {html.escape(w)}</p>" for w in metrics.get("warnings", []))
            + _table(["level", "n", "accuracy", "balanced", "macro AUC", "ECE"], _metrics_rows(metrics))
            + _plots(folder) + f"<h3>Slides{shown}</h3>" + _slide_rows(run_dir, folder, rows))


def _cv_report(run_dir: Path, stage: str, title: str, extra: str = "") -> str:
    """The report of ``lymphoma cv`` or ``lymphoma mil`` (``<stage>/report.txt``), its files and plots."""
    folder = run_dir / stage
    text = folder / "report.txt"
    if not text.is_file():
        return ""
    return (f"<h2 id={stage}>{title}</h2><p>{_link(run_dir, folder / 'report.json')}, "
            f"{_link(run_dir, folder / 'predictions.csv')}{extra}</p><pre>{html.escape(_read_text(text))}</pre>"
            + _plots(folder))


def _crossval(run_dir: Path) -> str:
    return _cv_report(run_dir, "cv", "Cross-validation")


def _validation(run_dir: Path) -> str:
    """Each ``lymphoma validate`` of the run (``validate/<checkpoint>-<phase>/``, or ``validate/`` itself, where
    versions before 64a52fc wrote): its tile figures and pictures."""
    found = sorted((run_dir / "validate").glob("*/confusion.json")) + sorted((run_dir / "validate").glob("confusion.json"))
    if not found:
        return ""
    parts = []
    for path in found:
        summary, folder = _read_json(path), path.parent
        parts.append(f"<h3>{html.escape(folder.name)}</h3><p>{html.escape(Path(summary['checkpoint']).name)} (epoch "
                     f"{summary['epoch'] + 1}) on the {html.escape(summary['phase'])} tiles: {summary['tiles']} tiles of "
                     f"{summary['cases']} cases, tile accuracy {figure_text(summary, 'accuracy')}, balanced "
                     f"{figure_text(summary, 'balanced_accuracy')}. {_link(run_dir, folder / 'tiles.csv')}</p>"
                     + "".join(_figure(folder / f"{stem}.png", caption) for stem, caption in (
                         ("confusion", "confusion matrix (tiles)"), ("kernels", "first-layer kernels"),
                         ("activations", "activations"), ("augment", "augmentation"))))
    return "<h2 id=validation>Validation</h2>" + "".join(parts)


def _features(run_dir: Path) -> str:
    """The embeddings of ``lymphoma features`` in the run (``features/``) or in this folder (its ``--out``)."""
    folder = next((f for f in (run_dir, run_dir / "features") if (f / "features.csv").is_file()), None)
    if folder is None:
        return ""
    rows = _read_csv(folder / "features.csv")
    ok = [r for r in rows if r["status"] == "ok"]
    encoder = _read_json(folder / "encoder.json").get("encoder", "?") if (folder / "encoder.json").is_file() else "?"
    failed = [[r["key"], r.get("error", "")] for r in rows if r["status"] != "ok"]
    return (f"<h2 id=features>Features</h2><p>{len(ok)} of {len(rows)} slide(s) embedded "
            f"({sum(int(r['n_tiles'] or 0) for r in ok)} tiles, {ok[0]['feature_dim'] if ok else '?'} dimensions) by "
            f"{html.escape(str(encoder))}; {len(failed)} failed. {_link(run_dir, folder / 'features.csv')}, "
            f"{_link(run_dir, folder / 'h5_files')} (features, coords per slide)</p>"
            + (_table(["slide", "error"], failed, left=2) if failed else ""))


def _mil(run_dir: Path) -> str:
    mil = run_dir / "mil"  # no mil.pt where each fold had its own encoder: nothing to link then
    model = f", model {_link(run_dir, mil / 'mil.pt')}" if (mil / "mil.pt").is_file() else ""
    return _cv_report(run_dir, "mil", "Multiple-instance learning", f"{model}, attention maps "
                      f"{_link(run_dir, mil / 'attention')}")


def _section(anchor: str, title: str, build: Callable[..., str], *args: Any) -> str:
    """One section, or where its files cannot be read, its heading and what is wrong (and a warning): one damaged
    file never costs the page."""
    try:
        return build(*args)
    except UnreadableFile as error:
        problem = str(error)
    except (KeyError, TypeError, IndexError, AttributeError) as error:  # a file of another version or hand-edited
        problem = f"a file of this section lacks what the page needs ({type(error).__name__}: {error})"
    log.warning(f"report: {title}: {problem}; the page shows the rest")
    return f"<h2 id={anchor}>{html.escape(title)}</h2><p class=warn>Not shown: {html.escape(problem)}</p>"


def write_run_report(run_dir: Path, predict_dir: Optional[Path] = None) -> Path:
    """Write ``<run_dir>/report.html`` from what the run folder holds (prediction from ``predict_dir``, default
    ``<run_dir>/predict``; a prediction folder is its own); returns its path. A damaged file is named on the page, in
    place of what it held; a folder that holds none of those is an InputError, and no page is written there."""
    run_dir = Path(run_dir).absolute()
    predict_dir = Path(predict_dir or run_dir / "predict").absolute()
    parts = [("config", "Config", _config, (run_dir,)), ("split", "Split", _split, (run_dir,)),
             ("tiles", "Tiles", _tiles, (run_dir,)), ("training", "Training", _training, (run_dir,)),
             ("prediction", "Prediction", _prediction, (run_dir, predict_dir)),
             ("validation", "Validation", _validation, (run_dir,)), ("cv", "Cross-validation", _crossval, (run_dir,)),
             ("features", "Features", _features, (run_dir,)), ("mil", "MIL", _mil, (run_dir,))]
    sections = [_section(anchor, title, build, *args) for anchor, title, build, args in parts]
    if not any(sections):  # a folder of something else: no page written into it
        raise InputError(f"{run_dir} holds no run and no prediction (no config.yaml, split.csv, tiles/, train/, "
                         f"{predict_dir.name}/metrics.json, cross-validation or features); give a run folder (`lymphoma report "
                         "runs/<name>`) or the --out folder of a `lymphoma predict`")
    kind = "Prediction" if predict_dir == run_dir else "Run"
    nav = " ".join(f'<a href="#{anchor}">{title}</a>' for (anchor, title, _, _), body in zip(parts, sections) if body)
    logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>lymphoma {kind.lower()} "
            f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body><h1>{kind} {html.escape(run_dir.name)}</h1>"
            f"<p>{html.escape(str(run_dir))}; written {datetime.now():%Y-%m-%d %H:%M} by lymphoma {__version__}."
            + (" Logs: " + ", ".join(_link(run_dir, p, p.name) for p in logs[-5:]) if logs else "") + "</p>"
            f"<nav>{nav}</nav>" + "".join(sections) + "</body></html>\n")
    path = run_dir / "report.html"
    write_text_atomic(path, page)
    return path
