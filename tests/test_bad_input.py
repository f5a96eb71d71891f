"""Bad input gets a clear error naming the file and the fix; one bad image never sinks the job."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from jobs.cli import main
from jobs.config import ConfigError, load_config, to_object
from jobs.tile import format_summary, run_tile
from lymphoma.errors import ImageError, InputError
from lymphoma.images import _fast_png_decoder, _spng_rgb, _wuffs_rgb, read_rgb
from lymphoma.inputs import discover
from lymphoma.sharding import load_manifest, phase_shards


@pytest.fixture()
def bad_images(make_dataset):
    """A real data subset with one of each kind of bad image added to the CLL folder."""
    root = make_dataset(2, 2)
    good = sorted((root / "CLL").iterdir())[0]
    data = good.read_bytes()
    rgb = np.asarray(Image.open(good))
    folder = root / "CLL"
    (folder / "corrupt_001.png").write_bytes(b"this is not an image" * 50)
    (folder / "truncated_001.png").write_bytes(data[: len(data) // 3])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # one byte of the pixel stream: Wuffs and libspng decode it without a word
    (folder / "flipped_001.png").write_bytes(bytes(flipped))
    Image.fromarray(rgb).convert("L").save(folder / "gray_001.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:20, :20, 3] = 0  # a transparent corner: what lies under it is the user's call
    Image.fromarray(rgba).save(folder / "rgba_001.tif")
    tifffile.imwrite(folder / "float_001.tif", rgb.astype(np.float32) / 255, photometric="rgb")  # as analysis
    (folder / "damaged_001.tif").write_bytes(b"II*\0" + (8).to_bytes(4, "little") + bytes(192))  # no image in it
    Image.fromarray(rgb[:60, :80]).save(folder / "tiny_001.png")
    Image.fromarray(np.full_like(rgb, 235)).save(folder / "blank_001.png")  # a pale, empty scan
    black = np.random.default_rng(0).integers(0, 7, rgb.shape, dtype=np.uint8)  # a failed scan: dark noise
    Image.fromarray(black).save(folder / "black_001.png")
    return root


EXPECTED = {
    "corrupt_001.png": "not a readable image",
    "truncated_001.png": "truncated or corrupt",
    "flipped_001.png": "fails its CRC",
    "gray_001.png": "is grayscale",
    "rgba_001.tif": "has transparent pixels",
    "float_001.tif": "is a TIFF of floating-point samples (float32, 3 per pixel)",
    "damaged_001.tif": "not a readable image (corrupt",
    "tiny_001.png": "smaller than a 128-pixel tile",
    "blank_001.png": "has no tissue: every pixel is background",
    "black_001.png": "has no tissue: it is one flat colour (RGB 3, 3, 3; every pixel within 8 levels of it)",
}


def test_each_bad_image_has_its_own_error(bad_images):
    for name, message in EXPECTED.items():
        if name in ("tiny_001.png", "blank_001.png", "black_001.png"):  # judged by tiling, not by decoding
            continue
        with pytest.raises(ImageError, match=re.escape(message)) as info:
            read_rgb(bad_images / "CLL" / name)
        assert name in str(info.value)


def test_every_png_of_the_data_set_decodes_to_the_pixels_pil_gives(data_root, tmp_path):
    """8-bit RGB PNGs are decoded by Wuffs (or libspng where pywuffs is missing), others by PIL: the same arrays
    whichever decodes them."""
    paths = sorted((data_root / "lowres").glob("*/*.png"))
    assert len(paths) == 307 and _fast_png_decoder() is _wuffs_rgb
    for path in paths:
        with Image.open(path) as img:
            pixels = np.asarray(img)
        data = path.read_bytes()
        for decoded in (read_rgb(path), _wuffs_rgb(data), _spng_rgb(data)):
            assert decoded.dtype == np.uint8 and np.array_equal(decoded, pixels)
    with pytest.raises(ValueError, match="truncated"):  # Wuffs' own error, had the CRCs not been checked first
        _wuffs_rgb(paths[0].read_bytes()[:50_000])
    rgb = read_rgb(paths[0])
    (tmp_path / "trailing.png").write_bytes(paths[0].read_bytes() + b"bytes after IEND" * 4)  # some writers do
    assert np.array_equal(read_rgb(tmp_path / "trailing.png"), rgb)
    Image.fromarray(rgb).quantize(64).save(tmp_path / "palette.png")  # PIL opens it as P: its colours, exactly
    with Image.open(tmp_path / "palette.png") as img:
        assert img.mode == "P" and np.array_equal(read_rgb(tmp_path / "palette.png"), np.asarray(img.convert("RGB")))
    for suffix in ("png", "tif"):  # RGB saved with an opaque alpha channel, as many tools save it: the RGB
        Image.fromarray(rgb).convert("RGBA").save(tmp_path / f"opaque.{suffix}")
        assert np.array_equal(read_rgb(tmp_path / f"opaque.{suffix}"), rgb)
    wide = (rgb.astype(np.uint16) * 257).astype(">u2")  # 16-bit RGB, which Wuffs is not asked to decode
    _write_png16(tmp_path / "deep.png", wide)
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "RGB" and np.array_equal(read_rgb(tmp_path / "deep.png"), np.asarray(img))


def _write_png16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL writes none)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = rgb16.shape[:2]
    rows = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_bad_images_are_skipped_listed_and_the_rest_is_tiled(bad_images, make_config):
    result = run_tile(make_config(bad_images, "tiles.images_per_shard=20"), progress=False)
    manifest = load_manifest(result.manifest)
    skipped = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == set(EXPECTED)
    for name, message in EXPECTED.items():
        assert message in skipped[name]
    assert sum(p["n_images"] for p in manifest["phases"].values()) == 12
    assert result.n_skipped == len(EXPECTED)
    summary = format_summary(result)  # on the terminal: the reasons, not only their number
    assert f"{len(EXPECTED)} image(s) skipped, listed in the manifest: 2 x not a readable image (corrupt" in summary
    assert f"; and {len(EXPECTED) - 4} other reason(s)" in summary and summary.count(" x ") == 3  # two share one


def test_a_class_without_images_is_named_when_tiling_not_after_it(make_dataset, make_config, caplog):
    """data.classes names MCL but the source has no MCL folder: the tiles are written (they may be for prediction
    only), with a warning now that training would refuse the class, instead of that error after a cohort's tiling."""
    source = make_dataset(cases_per_class=1, images_per_case=1)
    shutil.rmtree(source / "MCL")
    result = run_tile(make_config(source, "split.val_fraction=0"), progress=False)
    assert sum(s.n_images for s in result.summaries) == 2
    assert f"class(es) ['MCL'] of data.classes have no image in {source}: training would refuse them" in caplog.text


def test_a_bomb_is_skipped_and_a_non_ascii_name_just_works_in_its_shard(make_dataset, make_config):
    """One shard holds good images, a header that declares 30000 x 30000 pixels and a file named in UTF-8: the
    bomb is skipped with its reason, the others are tiled, names round-trip; a raised limit admits big images."""
    from conftest import decompression_bomb
    from lymphoma.phase_tiles import PhaseTiles

    root = make_dataset(1, 2)
    folder = root / "FL"
    shutil.copyfile(sorted(folder.glob("*.png"))[0], folder / "café patient ü 7_001.png")
    decompression_bomb(folder / "bomb_001.png")
    result = run_tile(make_config(root, "split.val_fraction=0", "tiles.images_per_shard=50"), progress=False)
    manifest = load_manifest(result.manifest)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert list(skipped) == ["bomb_001.png"]
    assert "declares 30000 x 30000 = 900,000,000 pixels, more than tiles.max_pixels" in skipped["bomb_001.png"]
    assert manifest["phases"]["train"]["n_images"] == 7
    tiles = PhaseTiles(phase_shards(result.manifest, "train"))
    assert "café patient ü 7_001.png" in set(tiles.filenames) and "café patient ü 7" in set(tiles.cases)
    import tables
    with tables.open_file(phase_shards(result.manifest, "train")[0]) as h5:
        assert "café patient ü 7_001.png" in {row["filename"].decode() for row in h5.root.images}
    raised = run_tile(make_config(root, "split.val_fraction=0", "tiles.max_pixels=1000000000", "run.name=big"),
                      progress=False)  # admitted by the raised limit, then found to hold no pixel data
    assert "cannot be decoded" in load_manifest(raised.manifest)["skipped"][0]["reason"]


def test_strict_mode_fails_naming_the_file(bad_images, tmp_path, capsys):
    code = main(["tile", "--no-progress", f"data.source={bad_images}", f"run.root={tmp_path}", "tiles.strict=true",
                 "tiles.images_per_shard=20"])
    err = capsys.readouterr().err
    assert code == 1
    assert "of 2 task(s) of 'tile-default' failed" in err and "ImageError" in err and "_001.png: " in err
    assert "_log.err" in err and not (tmp_path / "default" / "tiles" / "manifest.json").exists()


def test_a_failing_debug_task_reports_its_traceback_and_never_waits_at_a_debugger_prompt(bad_images, tmp_path):
    """--cluster debug: a task that raises writes its traceback to stderr and its log and the command exits 1,
    with stdin an open pipe (a post-mortem (Pdb) prompt would wait on it for good)."""
    command = [sys.executable, "-m", "jobs.cli", "tile", "--no-progress", "--cluster", "debug",
               f"data.source={bad_images}", f"run.root={tmp_path}", "tiles.strict=true"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the debug task waits at a prompt: " + process.communicate()[0][-300:])
    assert process.returncode == 1 and "(Pdb)" not in out
    assert "Traceback (most recent call last)" in err and "ImageError" in err
    logs = "".join(p.read_text() for p in (tmp_path / "default" / "logs" / "tile").rglob("*_log.err"))
    assert "Traceback (most recent call last)" in logs and "ImageError" in logs


def test_a_bad_compression_is_refused_before_any_task_is_submitted(make_dataset, tmp_path, capsys):
    source = make_dataset(cases_per_class=1, images_per_case=1)
    assert main(["tile", f"data.source={source}", f"run.root={tmp_path}", "tiles.compression=foo:9"]) == 2
    err = capsys.readouterr().err
    assert "tiles.compression 'foo:9': unknown library 'foo'; allowed: none, zlib[:level]" in err
    assert err.count("unknown library") == 1 and not (tmp_path / "default" / "logs").exists()


def test_a_stride_larger_than_the_tile_is_refused_saying_how_much_would_be_lost(make_dataset, tmp_path, capsys):
    source = make_dataset(cases_per_class=1, images_per_case=1)
    assert main(["tile", f"data.source={source}", f"run.root={tmp_path}", "tiles.size=64", "tiles.stride=128"]) == 2
    err = capsys.readouterr().err
    assert "tiles.stride (128) is larger than tiles.size (64): 75% of every image would lie between tiles" in err
    assert "set tiles.stride <= tiles.size" in err and not (tmp_path / "default" / "tiles").exists()


def test_config_errors_name_the_file_and_key(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tiles:\n  size: 128\n stride: [\n")
    with pytest.raises(ConfigError, match=f"(?s){bad_yaml}: not valid YAML.*line 3"):
        load_config(bad_yaml)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 3\n  lr: 0.001\n  epochs: 5\n")  # PyYAML alone keeps 5 silently
    with pytest.raises(ConfigError, match=f"{twice}: not valid YAML: key 'epochs' given twice \\(lines 2 and 4\\)"):
        load_config(twice)
    for section, value in (("cluster", "slurm"), ("data", "[1, 2]")):  # a section written as a value
        flat = tmp_path / f"flat-{section}.yaml"
        flat.write_text(f"{section}: {value}\n")
        with pytest.raises(ConfigError, match=f"{flat}: section '{section}' must be a mapping of its keys"):
            load_config(flat)
    with pytest.raises(ConfigError, match=r"overrides: section 'train' must be a mapping of its keys, e.g. train\.<key>="):
        load_config(None, ["train=5"])
    profile = tmp_path / "profile.yaml"  # a cluster profile's keys without their section
    profile.write_text("kind: slurm\npartition: gpu\n")
    with pytest.raises(ConfigError, match=f"{profile}: 'kind' is not a section but a key of cluster: write it inside"):
        load_config(None, [], str(profile))
    with pytest.raises(ConfigError, match=r"'epochs' is not a section but a key of train and mil: .* e.g. train\.epochs=3"):
        load_config(None, ["epochs=3"])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("tiles:\n  tile_size: 128\n")
    with pytest.raises(ConfigError, match=f"{unknown}: unknown key 'tiles.tile_size'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="command-line overrides: bad value for 'tiles.size'.*'big'"):
        load_config(None, ["tiles.size=big"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["tiles.size"])
    with pytest.raises(ConfigError, match="cluster.kind is 'cloud'; allowed: local, debug, slurm"):
        to_object(load_config(None, ["cluster.kind=cloud"]))
    with pytest.raises(ConfigError, match="config file .*missing.yaml not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder; give a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="--cluster 'cloud'.*slurm"):
        load_config(None, [], "cloud")


@pytest.mark.parametrize("override, message", [
    ("train.lr=-0.001", "train.lr must be > 0 (e.g. 1e-3), got -0.001"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("train.momentum=1.5", "train.momentum must be in [0, 1)"),
    ("train.eval_phase=tset", "train.eval_phase must be one of train, val, test, got 'tset'"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch must be >= 1 or null"),
    ("mil.lr=0", "mil.lr must be > 0"),
    ("augment.crop=0", "augment.crop must be >= 1 pixel"),
    ("augment.vflip=2", "augment.vflip must be a probability in [0, 1]"),
    ("model.drop_rate=1", "model.drop_rate must be in [0, 1)"),
    ("split.val_fraction=0.6", "split.val_fraction + split.test_fraction must be below 1"),
    ("cluster.timeout_min=0", "cluster.timeout_min must be >= 1"),
    ("cluster.mem_gb=-4", "cluster.mem_gb > 0 or null"),
    ("run.name=../elsewhere", "run.name '../elsewhere' must name one folder under run.root"),
    ("run.name=a/b", "run.name 'a/b' must name one folder under run.root"),
    ("run.name=..", "run.name '..' must name one folder"),
])
def test_settings_out_of_their_range_are_refused_naming_the_key(override, message):
    extra = ["split.test_fraction=0.4"] if override.startswith("split.") else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_object(load_config(None, [override, *extra]))


def test_a_crop_larger_than_the_tiles_is_refused_before_tiling_by_the_commands_that_train(make_dataset, tmp_path,
                                                                                          capsys):
    """tiles.size=64 with the default augment.crop=112: `run`, `cv` and `train` refuse before a tile is cut (it used
    to fail in training, after tiling); `tile` alone tiles, warning that these tiles cannot train with its config."""
    words = [f"data.source={make_dataset(2, 1)}", f"run.root={tmp_path}", "split.val_fraction=0.5", "tiles.size=64",
             "tiles.stride=64", "train.epochs=1"]
    message = "augment.crop=112 is larger than tiles.size=64: training crops its inputs from the stored tiles"
    for command in ("run", "cv", "train"):
        assert main([command, *words, f"run.name={command}"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / command / "tiles").exists() and not (tmp_path / command / "repeat-0").exists()
    assert main(["tile", "--no-progress", *words, "run.name=tile"]) == 0
    assert f"{message}; lower augment.crop or raise tiles.size; these tiles cannot train" in capsys.readouterr().err
    assert (tmp_path / "tile" / "tiles" / "manifest.json").is_file()


def test_config_command_prints_every_setting_with_its_default_and_meaning(capsys):
    """The settings dataclasses are the one source of defaults: `lymphoma config` shows each key, its value
    (with the experiment and overrides applied) and its meaning, and what it prints loads back unchanged."""
    import dataclasses

    import yaml

    from jobs.config import CONFIG_DIR, Config
    from lymphoma.settings import TileSettings, TrainSettings

    assert main(["config", "-c", str(CONFIG_DIR / "lymphoma-lowres.yaml"), "train.lr=0.0003"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert list(printed) == [f.name for f in dataclasses.fields(Config)]
    for section in dataclasses.fields(Config):
        assert set(printed[section.name]) == {f.name for f in dataclasses.fields(section.default_factory)}
    assert printed["train"]["lr"] == 0.0003 and printed["run"]["name"] == "lymphoma-lowres"
    assert printed["tiles"] == {**dataclasses.asdict(TileSettings()), **printed["tiles"]}
    assert printed["train"]["epochs"] == TrainSettings().epochs
    assert "  stride: 64  # step between tiles; size - stride is the overlap" in text
    assert "  select: last  # last (a fixed schedule" in text and "\ntrain:  # Training: optimiser" in text
    loaded = to_object(load_config(None, [f"{s}.{k}={json.dumps(v)}" for s in ("tiles", "train")
                                          for k, v in printed[s].items()]))
    assert dataclasses.asdict(loaded.train) == printed["train"]


def test_unwritable_run_folder_and_missing_source_through_the_cli(make_dataset, tmp_path):
    source = make_dataset(1, 1)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "tile", f"data.source={source}", f"run.root={blocker}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"cannot write to the run folder {blocker}" in run.stderr and "set run.root" in run.stderr
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "tile", f"data.source={tmp_path / 'nope'}",
                          f"run.root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "nope does not exist" in run.stderr
    assert "Traceback" not in run.stderr


def test_version_and_the_top_level_help_name_overrides_and_exit_codes():
    version = subprocess.run([sys.executable, "-m", "jobs.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip().startswith("lymphoma 0.")
    help_text = " ".join(subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True,
                                        text=True).stdout.split())
    assert "section.key=value overrides" in help_text and "Exit status: 0 done; 1 failed" in help_text
    assert "2 bad input or config" in help_text
    bare = subprocess.run([sys.executable, "-m", "jobs.cli"], capture_output=True, text=True)  # no command: the
    assert bare.returncode == 2 and "cut images into tiles" in bare.stderr and "tile-vote inference" in bare.stderr
    assert "the following arguments are required" not in bare.stderr  # help, with what each command does


def test_manifests_and_lists_saved_by_excel_are_read_and_other_encodings_named(make_dataset, tmp_path, capsys):
    from lymphoma.prediction_inputs import expand_inputs

    images = sorted(make_dataset(cases_per_class=1, images_per_case=2).rglob("*.png"))
    lines = ["path,label,case"] + [f"{p},{p.parent.name},{p.stem.rsplit('_', 1)[0]}" for p in images]
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a byte-order mark and CRLF line ends
    excel.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    records = discover(str(excel), ["CLL", "FL", "MCL"]).records
    assert sorted(r.path for r in records) == [str(p) for p in images] and {r.label for r in records} == {
        "CLL", "FL", "MCL"}
    semicolons = tmp_path / "semicolons.csv"  # Excel's CSV where the decimal mark is a comma (most of Europe)
    odd = images[0].rename(images[0].with_name("biopsy, left_1.png"))  # a comma in a field it leaves unquoted
    lines = ["path;label;case"] + [f"{p};{p.parent.name};{p.stem.rsplit('_', 1)[0]}" for p in [odd, *images[1:]]]
    semicolons.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    records = discover(str(semicolons), ["CLL", "FL", "MCL"]).records
    assert [(r.path, r.label, r.case) for r in records] == [(str(p), p.parent.name, p.stem.rsplit("_", 1)[0])
                                                            for p in sorted([odd, *images[1:]])]
    slides = expand_inputs([], semicolons, None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))
    assert sorted((s.path, s.label, s.case) for s in slides) == [(r.path, r.label, r.case) for r in records]
    images[0] = odd.rename(images[0])
    workbook = tmp_path / "slides.xlsx"  # the workbook itself, given instead of a CSV saved from it
    write_xlsx(workbook, [["path", "label"], [str(images[1]), "FL"]])
    for run in (lambda: discover(str(workbook), ["CLL", "FL", "MCL"]),
                lambda: expand_inputs([], workbook, None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))):
        with pytest.raises(InputError, match=r"slides.xlsx: a spreadsheet workbook \(.xlsx, .xls, .ods\), not a text "
                                             r"file; save the sheet as CSV \(Excel: File > Save As > "):
            run()
    for run in (lambda: discover(str(images[0]), ["CLL", "FL", "MCL"]),  # an image given where its list goes
                lambda: expand_inputs([], images[0], None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))):
        with pytest.raises(InputError, match=f"{re.escape(str(images[0]))} is an image or slide file where a list of "
                                             "them was expected: data.source takes a folder of class folders or a CSV"):
            run()
    latin = tmp_path / "latin.csv"  # Excel's plain "CSV" on a Western European Windows: Latin-1
    latin.write_bytes(f"path,label,case\n{images[0]},CLL,Müller\n".encode("latin-1"))
    assert main(["tile", "--no-progress", f"data.source={latin}", f"run.root={tmp_path}", "run.name=latin"]) == 2
    assert "latin.csv: not UTF-8 text (byte 0xfc at offset" in capsys.readouterr().err
    listing = tmp_path / "slides.tsv"
    listing.write_bytes(b"\xef\xbb\xbfpath\tlabel\r\n" + f"{images[0]}\tCLL\r\n".encode())
    slides = expand_inputs([], listing, None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))
    assert [(s.path, s.label) for s in slides] == [(str(images[0].resolve()), "CLL")]  # the header known, BOM and all
    odd = images[1].rename(images[1].with_name('biopsy "left", 2.png'))  # Excel's tab-delimited text quotes it
    listing.write_text(f'path\tlabel\n"{str(odd).replace(chr(34), 2 * chr(34))}"\t{odd.parent.name}\n')
    slides = expand_inputs([], listing, None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))
    assert [(s.path, s.label) for s in slides] == [(str(odd.resolve()), odd.parent.name)]


def write_xlsx(path: Path, rows: list[list[str]]) -> None:
    """A minimal Office Open XML workbook of one sheet of inline strings, as Excel and LibreOffice open it."""
    import zipfile
    from xml.sax.saxutils import escape

    cells = "".join(f'<row r="{i + 1}">' + "".join(f'<c r="{chr(65 + j)}{i + 1}" t="inlineStr"><is><t>{escape(v)}</t></is>'
                                                   f"</c>" for j, v in enumerate(row)) + "</row>"
                    for i, row in enumerate(rows))
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    parts = {
        "[Content_Types].xml": '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType='
        '"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName='
        '"/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.'
        'worksheet+xml"/></Types>',
        "_rels/.rels": f'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship '
        f'Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets><sheet name="Sheet1" sheetId="1" '
        'r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
        f'relationships"><Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{main}"><sheetData>{cells}</sheetData></worksheet>'}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts.items():
            archive.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + text)


def test_lists_and_manifests_made_on_windows_name_their_files_with_backslashes(make_dataset):
    """`CLL\\p07\\slide.png`, as Excel on Windows writes a list for a cluster's share: read with slashes, in a --list
    (under --basepath) and in a training manifest (beside it); a file whose own name holds a backslash is kept."""
    from lymphoma.prediction_inputs import expand_inputs

    root = make_dataset(cases_per_class=1, images_per_case=2)
    images = sorted(root.rglob("*.png"))
    odd = images[0].with_name("scan\\1_001.png")  # a POSIX name with a backslash in it
    images[0] = images[0].rename(odd)
    windows = [str(p.relative_to(root)) if p == odd else str(p.relative_to(root)).replace("/", "\\") for p in images]
    (root / "slides.tsv").write_text("".join(f"{w}\t{p.parent.name}\n" for w, p in zip(windows, images)))
    slides = expand_inputs([], root / "slides.tsv", root, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))
    assert sorted(s.path for s in slides) == sorted(str(p.resolve()) for p in images)
    (root / "manifest.csv").write_text("path,label\n" + "".join(f"{w},{p.parent.name}\n" for w, p in zip(windows, images)))
    records = discover(str(root / "manifest.csv"), ["CLL", "FL", "MCL"]).records
    assert sorted(r.path for r in records) == sorted(str(p.resolve()) for p in images)


def test_a_csv_list_of_slides_is_read_by_its_header_as_a_training_manifest_is(make_dataset, tmp_path, monkeypatch):
    """`--list x.csv`: columns by the header's names (in any order, others ignored, data.columns mapping yours),
    quoted fields, Excel's BOM and CRLF; relative paths under --basepath. A comma-separated list named .tsv, or a CSV
    without a path column, is an error saying what to do, not one failed slide per line."""
    from lymphoma.prediction_inputs import expand_inputs

    root = make_dataset(cases_per_class=1, images_per_case=2)
    images = sorted(root.rglob("*.png"))
    images[0] = images[0].rename(images[0].with_name("biopsy, left.png"))
    pattern, classes = re.compile(r"^(?P<case>.+)$"), ["CLL", "FL", "MCL"]
    lines = ["case,notes,path,label"] + [f'p{i},"seen, twice",{p.relative_to(root)},{p.parent.name}' for i, p in
                                         enumerate(images)]
    lines[1] = f'p0,,"{images[0].relative_to(root)}",{images[0].parent.name}'
    excel = tmp_path / "slides.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    slides = expand_inputs([], excel, root, classes, pattern)
    assert [(s.path, s.label, s.case) for s in slides] == [(str(p.resolve()), p.parent.name, f"p{i}")
                                                           for i, p in enumerate(images)]
    beside = root / "slides.csv"  # its paths relative to its own folder, and no --basepath: said at once
    shutil.copyfile(excel, beside)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"--list {beside}: its relative paths \(CLL/.*, \.\.\.\) are not in the "
                                         rf"current folder {tmp_path} but lie beside the list: add --basepath {root}$"):
        expand_inputs([], beside, None, classes, pattern)
    mapped = tmp_path / "mapped.csv"
    mapped.write_text("cls,image\n" + "".join(f'{p.parent.name},"{p}"\n' for p in images))
    slides = expand_inputs([], mapped, None, classes, pattern, columns={"path": "image", "label": "cls"})
    assert [(s.path, s.label) for s in slides] == [(str(p.resolve()), p.parent.name) for p in images]
    manifest_columns = {"path": "lowres_path", "label": "cls", "case": "case_id"}  # the main config's, for its manifest
    slides = expand_inputs([], excel, root, classes, pattern, columns=manifest_columns)  # path,label,case: still read
    assert [(s.path, s.label, s.case) for s in slides] == [(str(p.resolve()), p.parent.name, f"p{i}")
                                                           for i, p in enumerate(images)]
    with pytest.raises(InputError, match=r"mapped.csv: no 'path' column; the header has \['cls', 'image'\]\. Name "
                                         r"the columns path\[,label\]\[,case\] in its first line, or map yours: "
                                         r"data.columns.path=<column>"):
        expand_inputs([], mapped, None, classes, pattern)
    commas = tmp_path / "slides.tsv"
    commas.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images[1:]))
    with pytest.raises(InputError, match=r"slides.tsv: its header 'path,label' is comma-separated; name the file "
                                         r"slides.csv to read it as CSV, or separate the columns by tabs"):
        expand_inputs([], commas, None, classes, pattern)
    twice = tmp_path / "twice.csv"  # one file, two truths: refused, naming both lines; a wildcard's match takes its truth
    twice.write_text(f"path,label\n{images[1]},CLL\n{images[1]},FL\n")
    with pytest.raises(InputError, match=rf"{images[1]} is given twice with another class or case \(line 2: CLL, -; "
                                         rf"line 3: FL, -\); keep the one that is right"):
        expand_inputs([f"{root}/**/*.png"], twice, None, classes, pattern)
    twice.write_text(f"path,case\n{images[1]},p7\n")
    slides = expand_inputs([f"{root}/**/*.png"], twice, None, classes, pattern)
    assert [s.case for s in slides if s.path == str(images[1].resolve())] == ["p7"] and len(slides) == len(images)
    twice.write_text("path,label\n")
    with pytest.raises(InputError, match=rf"--list {twice} names no slide; give its paths one per line"):
        expand_inputs([], twice, None, classes, pattern)


def test_a_folder_given_to_predict_reads_bmp_webp_and_jpeg_2000_and_names_a_czi_it_cannot(make_dataset, tmp_path):
    """Lossless BMP, WebP and JPEG 2000 copies of an image decode to its pixels and a folder or wildcard finds them
    (they were left out without a word, though each file named alone was read); a CZI slide in it is a slide of its
    own that fails saying how to convert it, not a file silently left out."""
    from lymphoma.prediction_inputs import expand_inputs

    source = sorted(make_dataset(cases_per_class=1, images_per_case=1).rglob("*.png"))[0]
    rgb, folder = read_rgb(source), tmp_path / "cohort"
    folder.mkdir()
    for suffix, options in ((".bmp", {}), (".webp", {"lossless": True}), (".jp2", {"irreversible": False})):
        Image.fromarray(rgb).save(folder / f"a{suffix[1:]}{suffix}", **options)
        assert np.array_equal(read_rgb(folder / f"a{suffix[1:]}{suffix}"), rgb)
    (folder / "slide.czi").write_bytes(b"ZISRAWFILE" + bytes(90))
    (folder / "notes.txt").write_text("not an image")
    found = expand_inputs([str(folder)], None, None, ["CLL", "FL", "MCL"], re.compile(r"^(?P<case>.+)$"))
    assert sorted(Path(s.path).name for s in found) == ["abmp.bmp", "ajp2.jp2", "awebp.webp", "slide.czi"]
    with pytest.raises(ImageError, match="is a Zeiss CZI slide.*convert it to OME-TIFF"):
        read_rgb(folder / "slide.czi")
    (folder / "CLL").mkdir()  # training's class folders: the CZI skipped with the same advice, the others used
    for file in folder.glob("*.*"):
        file.rename(folder / "CLL" / file.name)
    inputs = discover(folder, None, r"^(?P<case>.+)$", {}, False, None)
    assert sorted(Path(r.path).name for r in inputs.records) == ["abmp.bmp", "ajp2.jp2", "awebp.webp"]
    assert {Path(s.path).name: s.reason.split(";")[0] for s in inputs.skipped} == {
        "slide.czi": "is a Zeiss CZI slide, a format not read here (nor by OpenSlide)",
        "notes.txt": "not a supported image type"}


def test_class_folders_spelt_in_lower_case_are_named_as_the_classes_they_mean(make_dataset):
    """Folders ``cll/``, ``fl/``, ``mcl/`` under a config naming CLL, FL and MCL: the error says which class each
    is spelt otherwise, once per reason with its count, not five lines of one file each."""
    root = make_dataset(cases_per_class=1, images_per_case=2)
    for name in ("CLL", "FL", "MCL"):
        (root / name).rename(root / name.lower())
    with pytest.raises(InputError) as info:
        discover(root, ["CLL", "FL", "MCL"])
    message = str(info.value)
    assert "skipped 6 file(s): 2 x unknown class 'cll': the class 'CLL' spelt otherwise" in message
    assert "2 x unknown class 'mcl': the class 'MCL' spelt otherwise" in message and message.count("spelt otherwise") == 3
    (root / "fl").rename(root / "FL")
    (root / "cll").rename(root / "lymphoma")
    inputs = discover(root, ["CLL", "FL", "MCL"])  # one folder right: the others are skipped with their reasons
    assert {Path(r.path).parent.name for r in inputs.records} == {"FL"}
    assert {s.reason.split(";")[0] for s in inputs.skipped} == {
        "unknown class 'lymphoma'", "unknown class 'mcl': the class 'MCL' spelt otherwise (classes are matched exactly)"}
    assert "The images name the classes" not in message  # spelt otherwise: that advice, not another class list


def test_a_cohort_of_other_classes_is_told_how_to_name_them(make_dataset):
    """A group's own two classes (folders tumour/ and normal/) under the default CLL, FL, MCL: the error says which
    classes the images name and the settings that train on them, and both settings do."""
    root = make_dataset(cases_per_class=2, images_per_case=2)
    (root / "CLL").rename(root / "tumour")
    (root / "MCL").rename(root / "normal")
    shutil.rmtree(root / "FL")
    with pytest.raises(InputError, match=r"The images name the classes normal, tumour: to train on them, set "
                                         r"data.classes=null .* or data.classes=\[normal,tumour\] \(that order\)"):
        discover(root, ["CLL", "FL", "MCL"])
    assert discover(root, None).classes == ["normal", "tumour"]
    assert to_object(load_config(None, ["data.classes=[normal,tumour]"])).data.classes == ["normal", "tumour"]


def test_a_folder_copied_from_a_mac_is_predicted_without_its_hidden_files(make_dataset, tmp_path):
    """A Mac leaves ``._<name>`` beside each file it copies (and ``.Trashes``, ``.Spotlight-V100`` folders): a
    folder or wildcard given to predict reads none of them, as training's class folders never have; each would
    have been a failed slide and the command's exit status 1."""
    from lymphoma.prediction_inputs import expand_inputs

    root = make_dataset(cases_per_class=1, images_per_case=1)
    images = sorted(root.rglob("*.png"))
    for image in images:
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (root / ".Trashes").mkdir()
    shutil.copyfile(images[0], root / ".Trashes" / "deleted.png")
    pattern, classes = re.compile(r"^(?P<case>.+)$"), ["CLL", "FL", "MCL"]
    for given in (str(root), f"{root}/**/*.png"):
        assert [s.path for s in expand_inputs([given], None, None, classes, pattern)] == [str(p) for p in images]


def test_validate_names_a_checkpoint_trained_on_tiles_of_another_size(tiled, tmp_path, capsys):
    """The run's stores hold 64-px tiles, the checkpoint was trained on 128-px ones: the error names the checkpoint
    and where to validate it, not a tiles.size the user never set."""
    from dataclasses import asdict

    from lymphoma.checkpoint import save_checkpoint
    from lymphoma.model import build_model
    from lymphoma.settings import AugmentSettings, ModelSettings, TileSettings

    architecture = ModelSettings().architecture(3)
    checkpoint = tmp_path / "wide.pt"
    save_checkpoint({"model": build_model(architecture).state_dict(), "architecture": architecture, "epoch": 0,
                     "classes": ["CLL", "FL", "MCL"], "tiles": asdict(TileSettings(size=128, stride=128)),
                     "augment": asdict(AugmentSettings(crop=112))}, checkpoint)
    source, runs = tiled
    assert main(["validate", "--checkpoint", str(checkpoint), f"data.source={source}", f"run.root={runs}",
                 "run.name=base"]) == 2
    assert (f"{runs / 'base' / 'tiles'}: stores hold 64-px tiles but checkpoint {checkpoint} was trained on 128-px "
            "tiles; validate it in the run it was trained in") in capsys.readouterr().err
