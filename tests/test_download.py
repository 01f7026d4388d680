"""`download` against a fake figshare record served on 127.0.0.1: the API's JSON shape, a zip of
three real sample images, a transfer cut in half, a corrupted file."""

import hashlib
import http.server
import json
import threading
import zipfile

import pytest

from detection.data import check_dataset, label_files, load_dataset
from detection.download import ARTICLE, DownloadError, download
from tests.conftest import ROOT, need_shared, run_cli

SAMPLE = ROOT.parent / "shared" / "data" / "brecahad-sample"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    """A zip laid out like BreCaHAD's: BreCaHAD/images/*.tif and BreCaHAD/groundTruth/*.json."""
    samples = load_dataset(need_shared(SAMPLE))[:3]
    labels = label_files(SAMPLE)
    path = tmp_path_factory.mktemp("figshare") / "BreCaHAD.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for s in samples:
            z.write(s.image_path, f"BreCaHAD/images/{s.image_path.name}")
            z.write(labels[s.name], f"BreCaHAD/groundTruth/{labels[s.name].name}")
    return path.read_bytes()


class Figshare:
    """What the API answers, and what each download request gets: 'ok' (honouring Range), 'cut'
    (half the bytes, then the connection closes) or 'corrupt' (every byte, one of them wrong)."""

    def __init__(self, payload: bytes, modes: list[str]):
        self.payload, self.modes, self.ranges = payload, modes, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == f"/v2/articles/{ARTICLE}":
                    return self._send(
                        200,
                        json.dumps(
                            {
                                "id": ARTICLE,
                                "files": [
                                    {
                                        "id": 1,
                                        "name": "BreCaHAD.zip",
                                        "size": len(fake.payload),
                                        "computed_md5": hashlib.md5(fake.payload).hexdigest(),
                                        "supplied_md5": "",
                                        "download_url": f"{fake.url}/ndownloader/files/1",
                                    }
                                ],
                            }
                        ).encode(),
                    )
                mode = fake.modes.pop(0) if fake.modes else "ok"
                fake.ranges.append(self.headers.get("Range"))
                body = fake.payload
                if mode == "corrupt":
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "cut":
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api = f"{self.url}/v2/articles/{ARTICLE}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_an_interrupted_transfer_resumes_where_it_stopped(archive, tmp_path):
    out = tmp_path / "BreCaHAD"
    with Figshare(archive, ["cut"]) as fake:
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            download(out, fake.api)
        partial = out / ".download" / "BreCaHAD.zip"
        assert 0 < partial.stat().st_size < len(archive)
        kept = partial.stat().st_size
        assert download(out, fake.api) == []  # resumed, checked, unpacked and valid
        assert fake.ranges == [None, f"bytes={kept}-"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        s.image_path.name for s in load_dataset(SAMPLE)[:3]
    )
    assert not (out / ".download").exists() and check_dataset(out) == []


def test_a_corrupted_file_is_named_deleted_and_fetched_again(archive, tmp_path):
    out = tmp_path / "BreCaHAD"
    with Figshare(archive, ["corrupt"]) as fake:
        with pytest.raises(DownloadError, match=r"BreCaHAD.zip: MD5 [0-9a-f]{32} is not figshare's"):
            download(out, fake.api)
        assert not (out / ".download" / "BreCaHAD.zip").exists() and not (out / "images").exists()
        assert download(out, fake.api) == []
        assert fake.ranges == [None, None]  # nothing of the corrupt file was kept to resume
    assert len(load_dataset(out)) == 3


@pytest.mark.subprocess
def test_offline_it_says_so_in_one_line_with_the_manual_steps(tmp_path):
    with Figshare(b"", []) as fake:
        dead = fake.api
    result = run_cli("download", str(tmp_path / "d"), cwd=tmp_path, env={"BRECAHAD_FIGSHARE_API": dead})
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "cannot reach figshare (127.0.0.1:" in line and "10.6084/m9.figshare.7379186" in line
    assert "python -m detection validate" in line


def test_an_answer_without_a_file_list_is_refused(tmp_path):
    with Figshare(b"x", []) as fake, pytest.raises(DownloadError, match="lacks the file list|not JSON"):
        download(tmp_path / "d", f"{fake.url}/ndownloader/files/1")
