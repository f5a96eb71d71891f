"""The `lymphoma` command: one sub-command per pipeline step."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hpc import ArrayJobError
from jobs.config import load_config, to_object
from lymphoma.errors import InputError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="YAML", help="experiment config merged over configs/defaults.yaml")
    parser.add_argument("--cluster", metavar="NAME",
                        help="local (default: this machine, subprocesses), debug (in process), slurm, "
                             "or a cluster profile: a name in configs/cluster/ or a YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. tiles.stride=64 tiles.compression=zlib:6")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lymphoma",
        description="Tile, train and predict lymphoma sub-types (CLL, FL, MCL) on H&E images, "
                    "on this machine or as SLURM array jobs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tile = sub.add_parser("tile", help="cut images into tiles: case-level split, sharded HDF5 stores, manifest",
                          description="Split the images by case, then write one HDF5 tile shard per array task "
                                      "and a manifest listing every shard with its counts. Rerunning resumes.")
    _add_config_args(tile)
    tile.add_argument("--no-progress", action="store_true", help="no progress bar")

    download = sub.add_parser("download", help="fetch the public IICBU 2008 lymphoma data set into class folders",
                              description="Download the public tarball (resumable), verify its SHA-1 and unpack "
                                          "it into one folder per class.")
    download.add_argument("--dest", help="where the class folders go (default: download.dest)")
    download.add_argument("--url", action="append", help="tarball address; repeat for mirrors (default: download.urls)")
    download.add_argument("--sha1", help="expected SHA-1 of the tarball, or 'none' to skip the check")
    _add_config_args(download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, args.cluster)
        if args.command == "tile":
            from jobs.tile import format_summary, run_tile

            result = run_tile(cfg, progress=not args.no_progress)
            print(format_summary(result))
        elif args.command == "download":
            from lymphoma.download import download_dataset

            settings = to_object(cfg).download
            sha1 = args.sha1 if args.sha1 is not None else settings.sha1
            dest = download_dataset(args.dest or settings.dest, args.url or settings.urls,
                                    None if sha1 in (None, "none") else sha1)
            print(f"data set ready in {dest}; use it with data.source={dest}")
    except (InputError, ArrayJobError) as err:
        print(f"lymphoma {args.command}: error: {err}", file=sys.stderr)
        if isinstance(err, ArrayJobError):
            print("finished tasks' outputs are kept: fix the cause and rerun the same command to redo only "
                  "the failed ones", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
