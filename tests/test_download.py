"""padim download against a small archive served from 127.0.0.1: checksum, resume, categories, offline."""

import hashlib
import io
import random
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from padim.cli import main


PAYLOAD = random.Random(0).randbytes(20000)  # incompressible, so the archive is tens of kB


def _archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, payload in [("bottle/train/good/000.png", PAYLOAD), ("cable/train/good/000.png", b"b" * 3000),
                              ("license.txt", b"terms")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


ARCHIVE = _archive()
SHA = hashlib.sha256(ARCHIVE).hexdigest()


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves ARCHIVE with HTTP Range support, and records the Range headers it was asked for."""

    ranges = []

    def do_GET(self):
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        body = ARCHIVE[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    _RangeHandler.ranges = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/mvtec_anomaly_detection.tar.xz"
    httpd.shutdown()


def test_download_verifies_and_unpacks_only_the_asked_categories(server, tmp_path, capsys):
    assert main(["download", "mvtec", "--to", str(tmp_path), "--categories", "bottle", "--url", server,
                 "--sha256", SHA]) == 0
    assert (tmp_path / "bottle" / "train" / "good" / "000.png").read_bytes() == PAYLOAD
    assert not (tmp_path / "cable").exists()
    assert "sha256 verified" in capsys.readouterr().out


def test_broken_download_is_resumed(server, tmp_path):
    half = len(ARCHIVE) // 2
    (tmp_path / "mvtec_anomaly_detection.tar.xz.part").write_bytes(ARCHIVE[:half])
    assert main(["download", "mvtec", "--to", str(tmp_path), "--categories", "cable", "--url", server,
                 "--sha256", SHA]) == 0
    assert _RangeHandler.ranges == [f"bytes={half}-"]
    assert (tmp_path / "mvtec_anomaly_detection.tar.xz").read_bytes() == ARCHIVE
    assert (tmp_path / "cable" / "train" / "good" / "000.png").is_file()


def test_wrong_checksum_is_refused_and_the_file_removed(server, tmp_path, capsys):
    assert main(["download", "mvtec", "--to", str(tmp_path), "--url", server, "--sha256", "0" * 64]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checksum mismatch" in err
    assert not list(tmp_path.glob("*.tar.xz*"))


def test_unknown_category(server, tmp_path, capsys):
    assert main(["download", "mvtec", "--to", str(tmp_path), "--categories", "bottel", "--url", server,
                 "--sha256", SHA]) == 1
    assert "not in the archive: bottel" in capsys.readouterr().err


def test_offline_says_so_in_one_line(tmp_path, capsys):
    with socket.socket() as sock:  # a local port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["download", "mvtec", "--to", str(tmp_path), "--url", f"http://127.0.0.1:{port}/x.tar.xz"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline?" in err[0]
