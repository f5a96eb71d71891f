"""Shards written through PyTables and read back as one dataset, on real images."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import numpy as np
import pytest
import tables

from lymphoma.errors import InputError
from lymphoma.images import read_rgb
from lymphoma.inputs import ImageRecord, discover
from lymphoma.phase_tiles import PhaseTiles
from lymphoma.settings import TileSettings
from lymphoma.sharding import ShardPlan, fingerprint
from lymphoma.store import parse_compression, read_complete_shard, verify_shard, write_shard
from lymphoma.tiling import cut_tiles

SETTINGS = TileSettings(size=96, stride=80)
CLASSES = ["CLL", "FL", "MCL"]


@pytest.fixture()
def records(make_dataset):
    return discover(make_dataset(1, 2), CLASSES).records


def write(path, records, compression="blosc:zstd:5", settings=SETTINGS):
    plan = ShardPlan("train", 0, tuple(records))
    fp = fingerprint(plan, CLASSES, settings, compression)
    return write_shard(path, "train", records, CLASSES, settings, compression, fp), fp


def test_shard_layout_labels_counts_and_pixels(tmp_path, records):
    summary, _ = write(tmp_path / "s.h5", records)
    with tables.open_file(tmp_path / "s.h5") as h5:
        imgs = h5.root.imgs
        assert imgs.atom.dtype == np.uint8 and imgs.shape[1:] == (96, 96, 3)
        assert imgs.chunkshape == (1, 96, 96, 3)
        assert imgs.filters.complib == "blosc:zstd" and imgs.filters.complevel == 5
        attrs = h5.root._v_attrs
        assert json.loads(attrs.classes) == CLASSES and attrs.tile_size == 96 and attrs.stride == 80
        assert attrs.complete and attrs.n_tiles == imgs.nrows == summary.n_tiles
        labels, names, cases, coords = (h5.root.labels[:], h5.root.filenames[:].astype(str),
                                        h5.root.cases[:].astype(str), h5.root.coords[:])
        images = h5.root.images[:]
        row = 0
        for record in records:
            tiles = cut_tiles(read_rgb(record.path), SETTINGS)
            n = len(tiles.pixels)
            assert (names[row:row + n] == record.name).all() and (cases[row:row + n] == record.case).all()
            assert (labels[row:row + n] == CLASSES.index(record.label)).all()
            source = read_rgb(record.path)
            for k in (0, n - 1):
                x, y = coords[row + k]
                np.testing.assert_array_equal(imgs[row + k], source[y:y + 96, x:x + 96])
            row += n
        assert row == imgs.nrows
        assert images["n_tiles"].sum() == imgs.nrows and len(images) == len(records)
        assert images["filename"].astype(str).tolist() == [r.name for r in records]
        assert images["case"].astype(str).tolist() == [r.case for r in records]
        assert images["label"].tolist() == [CLASSES.index(r.label) for r in records]
        assert set(images["width"]) == {417} and set(images["height"]) == {312}
        assert set(images["n_tiles"]) == {15} and set(images["n_background"]) == {0}  # 3 x 5 tiles of 96 at 80
    assert summary.images_per_class == {"CLL": 2, "FL": 2, "MCL": 2}
    assert sum(summary.tiles_per_class.values()) == summary.n_tiles
    assert not list(tmp_path.glob("*.tmp-*"))


def test_complete_shard_is_recognised_and_a_damaged_or_stale_one_is_not(tmp_path, records, caplog):
    """A shard of other settings, or none, is simply written (again); a damaged one is named in a warning with
    HDF5's reason on one line (its back trace is a dozen lines of library frames)."""
    _, fp = write(tmp_path / "s.h5", records)
    assert read_complete_shard(tmp_path / "s.h5", fp).n_tiles > 0
    assert read_complete_shard(tmp_path / "s.h5", "another-fingerprint") is None
    assert read_complete_shard(tmp_path / "absent.h5", fp) is None
    assert not caplog.records
    data = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    assert read_complete_shard(tmp_path / "cut.h5", fp) is None
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{tmp_path / 'cut.h5'} is damaged: it cannot be read (truncated file: eof = ")
    assert "back trace" not in warning and "\n" not in warning
    with pytest.raises(InputError) as training:  # what training says of it, before any retiling
        PhaseTiles([tmp_path / "cut.h5"])
    assert str(training.value).startswith(f"{tmp_path / 'cut.h5'}: not a readable tile shard (truncated file: ")
    assert str(training.value).endswith("; rerun `lymphoma tile` to rebuild it") and "\n" not in str(training.value)


def test_bytes_changed_inside_a_finished_shard_are_found(tmp_path, records, caplog):
    """One byte of one stored tile changed on disk: readers would return the wrong pixel; the digests notice,
    so a rerun does not call the shard complete."""
    path = tmp_path / "s.h5"
    _, fp = write(path, records, compression="none")
    with tables.open_file(path) as h5:
        tile = h5.root.imgs[7]
    data = bytearray(path.read_bytes())
    at = data.find(tile.tobytes())
    assert at > 0
    data[at + 100] ^= 0xFF
    path.write_bytes(data)
    reader = PhaseTiles([path])
    assert reader[7][0].tobytes() != tile.tobytes()  # what a reader now gets
    reader.close()
    assert verify_shard(path) == "the bytes of /imgs differ from the digest recorded when it was written"
    assert read_complete_shard(path, fp) is None
    assert f"{path} is damaged: the bytes of /imgs differ from the digest recorded when it was written; it is " \
           "written again" in caplog.text


# Fingerprints of one shard plan as 886943d computed them (before a resized image was normalised after its resize):
# the key is (tiles.resize, whether tiling normalises by image).
FINGERPRINTS_886943D = {
    (1.0, False): "66f0f111bbe3855bedc053e256178baa8a95384172e03af678fca996f4bed1e2",
    (1.0, True): "618b5c0cac5c583c946e3f7cca03bee4388a433d6ca2400450d0976cf4e23239",
    (0.5, False): "72b81cda38779be8119ff4206f5ae29341161824af3b3feabfcb05470b2bbe62",
    (0.5, True): "59b10e1ef9aa9734b5533d1c607874a19b0d8060c9dea5c678a868ab23848d61",
}


def test_only_shards_resized_before_their_stain_normalisation_changed_fingerprint():
    """Shards normalised by image at a resize were cut in the other order before 53195cc: a store begun then and
    resumed now cuts those shards again instead of mixing the two orders; every other shard on disk stays
    current (its fingerprint is the one it was written with)."""
    plan = ShardPlan("train", 0, (ImageRecord("/absent/a.png", "CLL", "case-a"),))
    stain = {"method": "reinhard", "scope": "image", "means": [1.0, 2.0, 3.0], "stds": [0.5, 0.5, 0.5]}
    for (resize, normalised), before in FINGERPRINTS_886943D.items():
        now = fingerprint(plan, CLASSES, TileSettings(size=96, stride=80, resize=resize), "blosc:zstd:5",
                          stain if normalised else None)
        assert (now != before) == (resize != 1 and normalised), (resize, normalised)


def test_compression_spec_names_allowed_values():
    assert parse_compression("zlib:6").complib == "zlib"
    assert parse_compression("blosc:lz4").complevel == 5
    assert parse_compression("none").complevel == 0
    with pytest.raises(InputError, match="unknown library 'gzip'.*allowed: none, zlib"):
        parse_compression("gzip:6")


def _read_in_worker(args):
    dataset, indices = args
    return [dataset[i][0].sum() for i in indices]


def test_shards_read_as_one_dataset_across_processes(tmp_path, records):
    a, _ = write(tmp_path / "a.h5", records[:3])
    b, _ = write(tmp_path / "b.h5", records[3:])
    dataset = PhaseTiles([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert len(dataset) == a.n_tiles + b.n_tiles
    with tables.open_file(tmp_path / "a.h5") as ha, tables.open_file(tmp_path / "b.h5") as hb:
        whole = np.concatenate([ha.root.imgs[:], hb.root.imgs[:]])
        labels = np.concatenate([ha.root.labels[:], hb.root.labels[:]])
    for i in (0, a.n_tiles - 1, a.n_tiles, len(dataset) - 1, -1):
        tile, label = dataset[i]
        np.testing.assert_array_equal(tile, whole[i])
        assert label == labels[i]
    tiles, batch_labels = dataset.read_batch([5, a.n_tiles + 2])
    np.testing.assert_array_equal(tiles, whole[[5, a.n_tiles + 2]])
    assert list(batch_labels) == list(labels[[5, a.n_tiles + 2]])
    assert dataset.class_counts().tolist() == np.bincount(labels, minlength=3).tolist()
    dataset[0]  # open handles in this process, then hand the dataset to forked and spawned workers
    chunks = [(dataset, list(range(k, len(dataset), 4))) for k in range(4)]
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            sums = pool.map(_read_in_worker, chunks)
        for (_, indices), got in zip(chunks, sums):
            assert got == [whole[i].sum() for i in indices]
    assert pickle.loads(pickle.dumps(dataset))._handles == {}
    dataset.close()
    with pytest.raises(IndexError):
        dataset[len(dataset)]
