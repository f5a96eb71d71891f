"""`lymphoma download` against a tarball of real images served on 127.0.0.1, with a dropped connection."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from lymphoma.download import download_dataset
from lymphoma.errors import InputError


class TarballServer(http.server.ThreadingHTTPServer):
    """Serves one payload with Range support; the first ``drops`` responses stop half way."""

    def __init__(self, payload: bytes, drops: int = 0) -> None:
        self.payload, self.drops, self.requests = payload, drops, []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/lymphoma.tar.gz"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        server: TarballServer = self.server  # type: ignore[assignment]
        server.requests.append(self.headers.get("Range"))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = server.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops > 0:
            server.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-transfer
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def tarball(data_root, manifest_rows) -> tuple[bytes, dict[str, list[str]]]:
    """A tarball laid out like the public one (lymphoma/<class>/<name>.tif) holding real images as TIFF."""
    buffer, names = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for row in manifest_rows[::40]:
            image = io.BytesIO()
            Image.open(data_root / row["lowres_path"]).save(image, format="TIFF")
            info = tarfile.TarInfo(f"lymphoma/{row['cls']}/{row['filename']}")
            info.size = image.tell()
            image.seek(0)
            tar.addfile(info, image)
            names.setdefault(row["cls"], []).append(row["filename"])
        readme = tarfile.TarInfo("lymphoma/README.txt")
        readme.size = 5
        tar.addfile(readme, io.BytesIO(b"notes"))
    return buffer.getvalue(), names


def serve(payload: bytes, drops: int = 0) -> TarballServer:
    server = TarballServer(payload, drops)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_interrupted_download_resumes_verifies_and_unpacks_class_folders(tmp_path, tarball, data_root, manifest_rows):
    payload, names = tarball
    server = serve(payload, drops=1)
    try:
        dest = download_dataset(tmp_path / "data", [server.url], hashlib.sha1(payload).hexdigest(), attempts=2)
    finally:
        server.shutdown()
    assert server.requests[0] is None and server.requests[1] == f"bytes={len(payload[: len(payload) // 2])}-"
    for label, files in names.items():
        assert sorted(p.name for p in (dest / label).iterdir()) == sorted(files)
    row = manifest_rows[0]
    np.testing.assert_array_equal(np.asarray(Image.open(dest / row["cls"] / row["filename"])),
                                  np.asarray(Image.open(data_root / row["lowres_path"])))
    assert not list(dest.glob("*.tar.gz*")) and not (dest / "README.txt").exists()
    server = serve(payload)
    try:
        assert download_dataset(dest, [server.url], None) == dest  # complete: nothing fetched again
    finally:
        server.shutdown()
    assert server.requests == []


def test_checksum_mismatch_and_dead_mirror_through_the_cli(tmp_path, tarball, capsys):
    payload, _ = tarball
    server = serve(payload)
    try:
        dead = "http://127.0.0.1:9/lymphoma.tar.gz"
        code = main(["download", "--dest", str(tmp_path / "d"), "--url", dead, "--url", server.url, "--sha1", "0" * 40])
        err = capsys.readouterr().err
        assert code == 2 and f"{server.url}: SHA-1 {hashlib.sha1(payload).hexdigest()} differs" in err
        assert dead in err and not list((tmp_path / "d").glob("*.part"))
        code = main(["download", "--dest", str(tmp_path / "d"), "--url", dead, "--url", server.url, "--sha1", "none"])
        assert code == 0 and "data set ready" in capsys.readouterr().out
    finally:
        server.shutdown()


def test_a_tarball_without_class_folders_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("other/file.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    server = serve(buffer.getvalue())
    try:
        with pytest.raises(InputError, match="no images under folders named"):
            download_dataset(tmp_path / "d", [server.url], None)
    finally:
        server.shutdown()


def test_a_folder_of_someones_own_images_is_never_unpacked_into(tmp_path, tarball):
    """Unpacking replaces the class folders of --dest: a folder that holds other files (a user's own CLL/ images)
    is refused before anything is fetched, and nothing in it changes."""
    payload, _ = tarball
    mine = tmp_path / "my-cohort"
    (mine / "CLL").mkdir(parents=True)
    (mine / "CLL" / "patient-7.png").write_bytes(b"my own image")
    server = serve(payload)
    try:
        with pytest.raises(InputError, match=r"--dest .*my-cohort holds other files \(CLL\); the class folders"):
            download_dataset(mine, [server.url], None)
    finally:
        server.shutdown()
    assert server.requests == [] and sorted(p.name for p in mine.rglob("*")) == ["CLL", "patient-7.png"]
    assert (mine / "CLL" / "patient-7.png").read_bytes() == b"my own image"
