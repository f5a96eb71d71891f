"""The `lymphoma` command: one sub-command per pipeline step."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hpc import ArrayJobError, SubmissionError
from hpc.logs import command_logging, end_logging
from jobs.run_folder import Run, open_run
from lymphoma import __version__
from lymphoma.errors import DiskFullError, InputError, is_disk_full

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value
# each command's module, whose ``command(args, run)`` runs it and returns the exit status
COMMANDS = {"tile": "tile", "train": "train", "validate": "validate", "predict": "predict", "run": "pipeline",
            "cv": "cv", "features": "features", "mil": "mil", "inspect": "inspect_slide", "download": "download",
            "config": "config", "export": "export", "report": "report"}
# the commands that run in the command's own process whatever --cluster says, and why that is enough
RUN_HERE = {"inspect": "it reads slide headers and thumbnails", "download": "it needs the internet, which compute "
            "nodes often lack", "report": "it reads the run folder and draws", "export": "it traces the model once"}
# the commands that keep a log file (<run folder or --out>/logs/<command>-<date>-<time>-<pid>.log)
LOGGED = {"tile", "train", "validate", "predict", "run", "cv", "features", "mil", "export"}
log = logging.getLogger(__name__)


def _command(sub: Any, name: str, summary: str, description: str, overrides: bool = True,
             progress: bool = False) -> argparse.ArgumentParser:
    """A sub-command with the config options every command takes (``-c``, ``--cluster``, and ``key=value``
    overrides unless its positional words are inputs)."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.add_argument("-c", "--config", metavar="YAML", help="experiment config merged over the defaults")
    here = f"; {name} itself runs in this process, not as a job ({RUN_HERE[name]})" if name in RUN_HERE else ""
    parser.add_argument("--cluster", metavar="NAME",
                        help="local (default: this machine, subprocesses), debug (in process), slurm, "
                             f"or a cluster profile: a name in configs/cluster/ or a YAML path{here}")
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="dotted overrides, e.g. tiles.stride=64 tiles.compression=zlib:6")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="count", default=0, help="debug messages too")
    talk.add_argument("-q", "--quiet", action="count", default=0,
                      help="warnings and errors only (the command's log file keeps everything)")
    return parser


def _add_pipeline_commands(sub: Any) -> None:
    _command(sub, "tile", "cut images into tiles: case-level split, sharded HDF5 stores, manifest",
             "Split the images by case, then write one HDF5 tile shard per array task and a manifest listing every "
             "shard with its counts. Rerunning resumes.", progress=True)
    train = _command(sub, "train", "train the DenseNet on the run's tiles (DDP; resumes from last.pt)",
                     "Train a DenseNet on the tile shards of the run folder, one process per task (gloo on CPU, "
                     "NCCL on GPUs). Running it again resumes.", progress=True)
    train.add_argument("--nodes", type=int, help="nodes (sets cluster.nodes)")
    train.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (sets cluster.gpus_per_node "
                                                          "and cluster.tasks_per_node)")
    train.add_argument("--processes", type=int, help="processes per node (sets cluster.tasks_per_node)")
    train.add_argument("--here", action="store_true",
                       help="run in this process as one rank, without submitting: for launchers that start the "
                            "processes themselves (torchrun, mpiexec, srun); ranks come from their variables")
    train.add_argument("--restart", action="store_true",
                       help="train afresh instead of resuming: the run's train/ folder is first renamed "
                            "train.before-<date-time>/ (kept, not deleted)")
    pipeline = _command(sub, "run", "the whole pipeline: tile, train, predict the held-out cases, report",
                        "Tile, train and predict the held-out (val, or test if split.test_fraction > 0) images of the "
                        "run, then print the image- and case-level report.", progress=True)
    pipeline.add_argument("--restart", action="store_true",
                          help="train afresh instead of resuming (after tiling other images or settings into the run): "
                               "the run's train/ folder is first renamed train.before-<date-time>/ (kept, not deleted)")
    cv = _command(sub, "cv", "cross-validation grouped by case: one array task per fold, pooled report",
                  "Deal the cases into cv.folds folds stratified by class. Each fold (one array task) tiles and trains on "
                  "the other cases, picks its checkpoint on an inner split of them, and predicts its own cases; then "
                  "image- and case-level accuracy per fold and pooled, with bootstrap intervals over cases, for "
                  "cv.repeats fold assignments; a reference logistic regression on colour and texture features in the "
                  "same folds with its permutation null; and <run>/ensemble.pt, the fold models as one checkpoint for "
                  "`lymphoma predict`. Rerunning resumes; with predict.tta=true or cv.checkpoint=last it reuses the "
                  "trained folds.", progress=True)
    cv.add_argument("--restart", action="store_true",
                    help="run afresh instead of resuming (after data.source, cv.folds, cv.seed or tile settings "
                         "changed): the earlier folds, reports and ensemble are first moved into cv.before-<date-time>/")


def _slide_inputs(parser: argparse.ArgumentParser, folders: str, out: str) -> None:
    """The slides a command reads (paths, wildcards, folders or a --list) and its --out folder."""
    parser.add_argument("inputs", nargs="*", metavar="IMAGE",
                        help=f"image files, quoted wildcards ('cohort/**/*.tif') or folders ({folders}); key=value "
                             "overrides too")
    parser.add_argument("--list", type=Path, help="TSV: path[<tab>label[<tab>case]] per line, # comments; or a "
                        ".csv with a header: path[,label][,case] (data.columns maps other names)")
    parser.add_argument("--basepath", type=Path, help="folder that relative paths in --list are under")
    parser.add_argument("--out", type=Path, help=f"output folder (default: <run folder>/{out})")
    parser.add_argument("--restart", action="store_true", help="start afresh: an earlier output folder is first "
                        "renamed <name>.before-<date-time> (kept, not deleted)")


def _add_model_commands(sub: Any) -> None:
    validate = _command(sub, "validate", "the tutorial's step 3: per-tile outputs, confusion matrix, kernels, "
                                         "activations of a checkpoint on a phase",
                        "Run a checkpoint over a phase's tiles (centre crop) and write tiles.csv, confusion.json/png, "
                        "augment.png, kernels.png and activations.png.")
    validate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a training run (its run folder, "
                                                               "<run>/train/checkpoints/, holds the tiles: no -c needed)")
    validate.add_argument("--phase", default="val", help="train, val or test (default val)")
    validate.add_argument("--layer", default="features.denseblock1", help="layer whose activations to show")
    validate.add_argument("--out", help="output folder (default: <run folder>/validate)")
    export = _command(sub, "export", "a checkpoint as ONNX and TorchScript, with its preprocessing recorded",
                      "Export a checkpoint's model (uint8 NHWC tiles in, logits out; centre crop and normalisation "
                      "inside) to ONNX and TorchScript, with preprocessing.json saying how to tile, stain-normalise "
                      "and read the outputs, and export.json with each export's agreement with PyTorch.")
    export.add_argument("--checkpoint", required=True, help="a checkpoint (best.pt, last.pt, ensemble.pt)")
    export.add_argument("--out", help="output folder (default: the checkpoint's path without .pt)")
    export.add_argument("--formats", default="onnx,torchscript", help="comma-separated: onnx, torchscript")
    predict = _command(sub, "predict", "tile-vote inference over images: per-slide outputs and a cohort report",
                       "Tile each image with the checkpoint's settings, run the tiles through the model in batches "
                       "and vote. One array task per chunk of slides; a rerun skips slides already done.",
                       overrides=False, progress=True)
    predict.add_argument("--checkpoint", required=True,
                         help="best.pt or last.pt of a training run, or the ensemble.pt of `lymphoma cv`")
    _slide_inputs(predict, "every image under them", "predict")
    predict.add_argument("--force", action="store_true", help="allow tile settings that differ from the checkpoint's")
    features = _command(sub, "features", "tile embeddings per slide (CLAM/TRIDENT HDF5) from a pretrained backbone or "
                                         "a trained model", "Tile each slide as tiling does, run the tiles through the "
                        "encoder without its head and write h5_files/<slide>.h5 (features [N, D], coords [N, 2]). One "
                        "array task per chunk of slides; a rerun skips slides already done.", overrides=False,
                        progress=True)
    features.add_argument("--checkpoint", help="a trained model as the encoder (default: model.backbone with "
                                               "model.weights, a pretrained one)")
    _slide_inputs(features, "every image under them; none: every image of data.source", "features")
    features.add_argument("--force", action="store_true", help="with --checkpoint: allow tile settings that differ from "
                          "the checkpoint's")
    mil = _command(sub, "mil", "attention-MIL on the embeddings of `lymphoma features`, in the folds of `lymphoma cv`",
             "Train a gated-attention MIL model (one bag per slide, or per case with mil.bag=case) on the tile "
             "embeddings in mil.features (default <run>/features) in every fold of cv.folds x cv.repeats (the folds "
             "of `lymphoma cv`), report image- and case-level accuracy with bootstrap intervals, save attention maps "
             "of the test slides and a model trained on every case (<run>/mil/); with --cluster slurm as one SLURM "
             "job.", progress=True)
    mil.add_argument("--predict", metavar="FEATURES", help="classify the slides embedded in this folder of `lymphoma "
                                                           "features` with <run>/mil/mil.pt instead")
    mil.add_argument("--out", type=Path, help="with --predict: the output folder (default: <run>/mil/predict/<name of "
                                              "the FEATURES folder>)")
    mil.add_argument("--restart", action="store_true", help="train afresh after mil.* or cv.* settings changed: the "
                     "earlier <run>/mil/ is first renamed mil.before-<date-time>/ (kept)")


def _add_tools(sub: Any) -> None:
    inspect = _command(sub, "inspect", "slides' levels, resolution, vendor, tissue and tile grid",
                       "Show what each slide file holds (levels, dimensions, microns per pixel, objective, vendor), "
                       "its tissue fraction, and write a thumbnail with the tile grid that tiles.* would cut. A slide "
                       "that cannot be read is named and the others still shown (exit status 1).", overrides=False)
    inspect.add_argument("inputs", nargs="+", metavar="SLIDE", help="whole-slide files (SVS, NDPI, pyramidal TIFF, "
                                                                   "...) or images; key=value overrides too")
    inspect.add_argument("--out", type=Path, help="the thumbnail (.png, .jpg, .tif) of one slide, or a folder for "
                                                  "them (default: <slide name>-grid.png here)")
    download = _command(sub, "download", "fetch the public IICBU 2008 lymphoma data set into class folders",
                        "Download the public tarball (resumable), verify its SHA-1 and unpack it into one folder per "
                        "class.")
    download.add_argument("--dest", help="where the class folders go (default: download.dest)")
    download.add_argument("--url", action="append", help="tarball address; repeat for mirrors (default: download.urls)")
    download.add_argument("--sha1", help="expected SHA-1 of the tarball, or 'none' to skip the check")
    report = _command(sub, "report", "the run folder on one self-contained HTML page (report.html)",
                      "Write <run folder>/report.html: config, split, tiles, training curves, prediction metrics "
                      "with confusion, ROC and reliability plots, every slide with its heat map, cross-validation "
                      "figures, validations, features and MIL, and links to the files; pictures are embedded, so the "
                      "page travels alone. `lymphoma run` and `lymphoma cv` write it too. Name the run folder as a path "
                      "(`lymphoma report runs/my-run`) or by its -c config or run.root/run.name.")
    report.add_argument("--predict", metavar="DIR", help="the prediction folder to show (default <run>/predict)")
    _command(sub, "config", "print the resolved config: every setting, its value and its meaning",
             "Merge the defaults, the experiment (-c), the cluster profile and the overrides, and print the result "
             "as YAML with every key's meaning.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lymphoma",
        description="Tile, train and predict lymphoma sub-types (CLL, FL, MCL) on H&E images, "
                    "on this machine or as SLURM array jobs.",
        epilog="Every command takes -c experiment.yaml, --cluster NAME (local, debug, slurm or a profile) and "
               "section.key=value overrides (e.g. tiles.stride=64 train.epochs=20; `lymphoma config` lists every "
               "key with its meaning); inspect, download, report and export run in this process whatever --cluster "
               "says. Exit status: 0 done; 1 failed tasks or inputs (each named, with its log); "
               "2 bad input or config; 130/143 stopped by Ctrl-C/SIGTERM (its local tasks too).")
    parser.add_argument("--version", action="version", version=f"lymphoma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pipeline_commands, _add_model_commands, _add_tools):
        add(sub)
    return parser


def _launch_overrides(args: argparse.Namespace) -> list[str]:
    """``--nodes``, ``--gpus-per-node`` and ``--processes`` as cluster overrides."""
    out = []
    if getattr(args, "nodes", None):
        out.append(f"cluster.nodes={args.nodes}")
    if getattr(args, "gpus_per_node", None):
        out += [f"cluster.gpus_per_node={args.gpus_per_node}", f"cluster.tasks_per_node={args.gpus_per_node}"]
    if getattr(args, "processes", None):
        out.append(f"cluster.tasks_per_node={args.processes}")
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, with words after the options taken as more inputs (predict) or overrides; none at all: the
    help, which lists the commands and what each does (exit status 2)."""
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    args, extra = parser.parse_known_args(argv)
    unknown = [w for w in extra if w.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("predict", "features", "inspect"):  # key=value words among the inputs are overrides
        words = args.inputs + extra
        args.overrides = [w for w in words if OVERRIDE.match(w) and not Path(w).exists()]
        args.inputs = [w for w in words if w not in args.overrides]
    elif extra:
        args.overrides = args.overrides + extra
    args.overrides = _run_folder_overrides(args) + args.overrides
    return args


def _run_folder_overrides(args: argparse.Namespace) -> list[str]:
    """``run.root``/``run.name`` of the run folder a command is pointed at: report's RUN_FOLDER word (taken out of
    its overrides), or validate's checkpoint's own run (``<run>/train/checkpoints/<x>.pt``) where neither -c nor
    a run.* override names one."""
    folder = None
    if args.command == "report":
        folders = [w for w in args.overrides if "=" not in w]  # a path, not a setting
        if len(folders) == 1:
            folder = Path(folders[0])
            args.overrides = [w for w in args.overrides if w != folders[0]]
    elif args.command == "validate" and args.config is None and not any(
            w.startswith(("run.root=", "run.name=")) for w in args.overrides):
        folder = Run.folder_of_checkpoint(Path(args.checkpoint))
    return [] if folder is None else [f"run.root={folder.absolute().parent}", f"run.name={folder.name}"]


def _disk_full(err: OSError, args: argparse.Namespace, output: Path | None) -> DiskFullError:
    """A full disk met while writing ``err.filename`` (where the error names none: in the command's ``output``
    folder), as one clear error naming the folder and the setting that moves the output elsewhere."""
    folder = Path(err.filename).parent if err.filename else (output or Path.cwd())
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    out = getattr(args, "out", None)
    elsewhere = "give --out a folder on a disk with room" if out else "set run.root to a disk with room"
    return DiskFullError(folder, None, shutil.disk_usage(folder).free, elsewhere=elsewhere)


class Stopped(SystemExit):
    """SIGTERM reached this command: unwinding stops its local tasks (hpc.array) before it exits."""


def _stop(signum: int, _frame: Any) -> None:
    raise Stopped(128 + signum)


def _ignore(_signum: int, _frame: Any) -> None:
    """SIGINT ignored as before, by a handler instead of SIG_IGN, which processes started from here inherit."""


def _log_folder(args: argparse.Namespace, run_dir: Path) -> Path | None:
    """The folder whose ``logs/`` keeps this command's log file: its ``--out`` where given, else the run folder."""
    return Path(getattr(args, "out", None) or run_dir) if args.command in LOGGED else None


def _log_file(logs: Path, command: str) -> Path:
    """A new log file for this command: ``<command>-<date>-<time>-<pid>.log``, with ``-2``, ``-3``... added where
    a command of this process already wrote that name in the same second (its log is never appended to)."""
    stem = f"{command}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    path, n = logs / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = logs / f"{stem}-{n}.log"
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, build the run once, and hand both to the command's module (``jobs.<module>.command``)."""
    args = parse(build_parser(), argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a script: still ignore
            signal.signal(signal.SIGINT, _ignore)  # Ctrl-C here, but local tasks must not inherit SIG_IGN: their
            #                                        controllers stop them on SIGINT (stop_local_tasks)
    verbosity = args.verbose - args.quiet
    command_logging(verbosity)
    folder = None
    try:
        run = open_run(args.config, args.overrides + _launch_overrides(args), args.cluster)
        folder = _log_folder(args, run.dir)
        log_file = command_logging(verbosity, folder and _log_file(folder / "logs", args.command), folder)
        log.debug("lymphoma %s: %s (log file %s)", __version__, " ".join(sys.argv[1:] if argv is None else argv),
                  log_file)
        if args.command in RUN_HERE and run.config.cluster.kind != "local":
            log.info("lymphoma %s runs in this process, not as a %s job: %s", args.command, run.config.cluster.kind,
                     RUN_HERE[args.command])
        module = importlib.import_module(f"jobs.{COMMANDS[args.command]}")
        return module.command(args, run)
    except OSError as err:
        if not is_disk_full(err):
            log.debug("unexpected error", exc_info=True)
            raise
        log.error("lymphoma %s: error: %s", args.command,
                  err if isinstance(err, DiskFullError) else _disk_full(err, args, folder))
        return 1
    except (KeyboardInterrupt, Stopped) as err:
        log.error("lymphoma %s: stopped (%s); its local tasks were stopped too; rerun the same command to resume",
                  args.command, "SIGTERM" if isinstance(err, Stopped) else "Ctrl-C")
        return err.code if isinstance(err, Stopped) else 130
    except (InputError, SubmissionError, ArrayJobError) as err:
        log.error("lymphoma %s: error: %s", args.command, err)
        if isinstance(err, ArrayJobError):
            log.error("finished tasks' outputs are kept: fix the cause and rerun the same command to redo only "
                      "the failed ones")
        return 1 if isinstance(err, ArrayJobError) else 2
    except Exception:
        log.debug("unexpected error", exc_info=True)
        raise
    finally:
        end_logging()


if __name__ == "__main__":
    sys.exit(main())
