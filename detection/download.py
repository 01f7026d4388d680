"""Get BreCaHAD from its figshare record (article 7379186, doi:10.6084/m9.figshare.7379186).

figshare's public API lists the record's files with their sizes and MD5s. Each file is fetched into
DIR/.download/, resuming a partial file with an HTTP Range request, checked against its MD5 (a
mismatch deletes it), and zips are unpacked so that DIR/images and DIR/groundTruth hold the dataset
as `validate` and every command expect it. Offline, it says so in one line with the manual steps.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DetectionError
from .progress import Bar

ARTICLE = 7379186
API = f"https://api.figshare.com/v2/articles/{ARTICLE}"
DOI = "https://doi.org/10.6084/m9.figshare.7379186"
CHUNK = 1 << 20  # bytes per read, and per progress step


class DownloadError(DetectionError, RuntimeError):
    """A download that cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    md5: str
    url: str


def manual_steps(out: Path) -> str:
    return (
        f"download BreCaHAD by hand from {DOI}, unzip it so that {out}/images and {out}/groundTruth exist, "
        f"then run: python -m detection validate {out}"
    )


def _open(url: str, timeout: float, headers: dict | None = None):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach figshare ({url.split('/')[2]}): {reason}") from None


def record(api: str, timeout: float) -> list[RemoteFile]:
    """The record's files, from figshare's public API."""
    try:
        with _open(api, timeout) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise DownloadError(f"figshare answered HTTP {e.code} for {api}") from None
    except json.JSONDecodeError as e:
        raise DownloadError(f"figshare's answer for {api} is not JSON ({e})") from None
    try:
        return [
            RemoteFile(f["name"], int(f["size"]), f.get("computed_md5") or f["supplied_md5"], f["download_url"])
            for f in doc["files"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise DownloadError(f"figshare's record at {api} lacks the file list ({type(e).__name__}: {e})") from None


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(remote: RemoteFile, dst: Path, timeout: float) -> Path:
    """Download one file to `dst`, resuming what an earlier, interrupted transfer left, then check its MD5."""
    have = dst.stat().st_size if dst.exists() else 0
    if have > remote.size:
        dst.unlink()
        have = 0
    if have < remote.size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = _open(remote.url, timeout, headers)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{remote.name}: figshare answered HTTP {e.code}") from None
        with response, dst.open("ab" if response.status == 206 else "wb") as f:
            done = have if response.status == 206 else 0
            with Bar(max(1, -(-(remote.size - done) // CHUNK)), f"download {remote.name}", every=50) as bar:
                try:
                    while block := response.read(CHUNK):
                        f.write(block)
                        bar.advance(MiB=round((done := done + len(block)) / CHUNK, 1))
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(
                        f"{remote.name}: the transfer broke off at {done} of {remote.size} bytes "
                        f"({e}); run the same command again to resume"
                    ) from None
        if dst.stat().st_size < remote.size:
            raise DownloadError(
                f"{remote.name}: the transfer ended at {dst.stat().st_size} of {remote.size} bytes; "
                f"run the same command again to resume"
            )
    got = md5(dst)
    if got != remote.md5:
        dst.unlink()
        raise DownloadError(
            f"{remote.name}: MD5 {got} is not figshare's {remote.md5}; the corrupt file was "
            f"deleted, run the same command again"
        )
    return dst


def unpack(archive: Path, out: Path) -> None:
    """Unzip and move the folder holding images/ and groundTruth/ to `out`."""
    staging = out / ".download" / "unpacked"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(staging)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive.name} is not a readable zip ({e}); delete {archive} and run again") from None
    roots = [p.parent for p in staging.rglob("images") if p.is_dir() and (p.parent / "groundTruth").is_dir()]
    if not roots:
        raise DownloadError(f"{archive.name} holds no folder with images/ and groundTruth/; {manual_steps(out)}")
    for part in ("images", "groundTruth"):
        target = out / part
        target.mkdir(parents=True, exist_ok=True)
        for f in (roots[0] / part).iterdir():
            shutil.move(str(f), target / f.name)
    shutil.rmtree(staging)


def download(out: Path, api: str | None = None, timeout: float = 30.0) -> list[str]:
    """Fetch, check and unpack the record into `out`; returns `validate`'s problems (empty: ready)."""
    from .data import check_dataset

    api = api or os.environ.get("BRECAHAD_FIGSHARE_API", API)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".download"
    partial.mkdir(exist_ok=True)
    try:
        files = record(api, timeout)
        for remote in files:
            path = fetch(remote, partial / remote.name, timeout)
            if path.suffix.lower() == ".zip":
                unpack(path, out)
            else:
                shutil.copy2(path, out / remote.name)
    except DownloadError as e:
        raise DownloadError(f"{e}. Or {manual_steps(out)}") from None
    shutil.rmtree(partial)  # every file checked and unpacked: nothing left to resume
    return check_dataset(out)
