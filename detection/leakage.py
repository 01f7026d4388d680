"""Is an evaluated image one of the model's training images? The same decoded pixels, or a lightly
edited copy: re-compressed, flipped, turned, shifted, cropped and resized back, or with its
brightness, contrast, gamma or saturation changed.

Each training image is recorded (split.json) as a grey thumbnail of 16 px cells (85 x 64 for a
BreCaHAD field). An evaluated image is compared in every flip, at per-axis scales up to 7.5% (a crop
resized back) and at every shift up to MARGIN cells, by zero-normalised cross-correlation: each
window's mean and contrast are removed, so brightness and contrast changes do not count, and gamma
and saturation barely do. On the shared sample (18 real fields, 4 cases) distinct fields correlate
at most 0.36 and the edited copies issue 20 lists at least 0.88 (`tests/test_leakage.py`), so
COPY_SIMILARITY sits between them. Two fields that are the same tissue (Case_101-05 and -06 of the
shared sample: 0.9995) are one image to this check.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np
from skimage.transform import rescale

BLOCK = 16  # px per thumbnail cell
MARGIN = 6  # cells cut from each side of an evaluated image's views: shifts up to 96 px are searched
SCALES = (1.0, 1.025, 1.05, 1.075)  # per axis: a crop of up to ~7% of a side, resized back
COPY_SIMILARITY = 0.6  # zero-normalised cross-correlation at or above which an image is a copy
KIND = "grey/16"  # split.thumbnail_kind of these thumbnails
LEGACY_KIND = "block16"  # before: 16 x 16 block means, compared pixel by pixel under flips and turns
LEGACY_TOLERANCE = 1.5  # mean absolute grey difference under which a legacy thumbnail matched


def grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float64)
    return image.mean(axis=2) if image.ndim == 3 else image


def cells(values: np.ndarray, size: int) -> np.ndarray:
    """Means of size x size blocks (a partial last row or column is dropped)."""
    h, w = (values.shape[0] // size) * size, (values.shape[1] // size) * size
    return values[:h, :w].reshape(h // size, size, w // size, size).mean(axis=(1, 3))


def thumbnail(image: np.ndarray) -> np.ndarray:
    """(H/16, W/16) uint8 grey cell means of an image: what split.json records per training image."""
    return np.round(cells(grey(image), BLOCK)).astype(np.uint8)


def encode(thumb: np.ndarray) -> str:
    h, w = thumb.shape
    return f"{h}x{w}:" + base64.b64encode(zlib.compress(thumb.tobytes(), 9)).decode()


def decode(text: str) -> np.ndarray:
    shape, _, data = text.partition(":")
    h, w = (int(x) for x in shape.split("x"))
    return np.frombuffer(zlib.decompress(base64.b64decode(data)), np.uint8).reshape(h, w)


def views(image: np.ndarray) -> list[np.ndarray]:
    """The middle of an evaluated image's thumbnail in each flip (and quarter turn, when square) and at
    each pair of per-axis scales: what a training thumbnail would hold of it, if it is a copy."""
    quarter = cells(grey(image), BLOCK // 4)
    flips = [quarter, quarter[:, ::-1], quarter[::-1], quarter[::-1, ::-1]]
    if quarter.shape[0] == quarter.shape[1]:
        flips += [f.T for f in flips]
    out = []
    for f in flips:
        for sy in SCALES:
            for sx in SCALES:
                scaled = f if sx == sy == 1 else rescale(f, (1 / sy, 1 / sx), preserve_range=True, anti_aliasing=False)
                middle = cells(scaled, 4)[MARGIN:-MARGIN, MARGIN:-MARGIN]
                if min(middle.shape) >= 4:
                    out.append(middle)
    return out


def _window_sums(stack: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, H-h+1, W-w+1) sums of every h x w window of each (H, W) thumbnail (integral images)."""
    c = np.pad(stack.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    return c[:, h:, w:] - c[:, :-h, w:] - c[:, h:, :-w] + c[:, :-h, :-w]


class Bank:
    """Training thumbnails of one shape, ready to be searched: one FFT for all of them per view
    (scikit-image's match_template does one pair at a time)."""

    def __init__(self, names: list[str], thumbs: list[np.ndarray]):
        self.names = names
        self.stack = np.stack(thumbs).astype(np.float64)
        self.shape = self.stack.shape[1:]
        self.spectrum = np.fft.rfft2(self.stack)
        self._spread: dict[tuple[int, int], np.ndarray] = {}

    def _window_spread(self, h: int, w: int) -> np.ndarray:
        """sqrt(sum of squared deviations) of every window of each thumbnail."""
        if (h, w) not in self._spread:
            s1, s2 = _window_sums(self.stack, h, w), _window_sums(self.stack**2, h, w)
            self._spread[(h, w)] = np.sqrt(np.maximum(s2 - s1**2 / (h * w), 0.0))
        return self._spread[(h, w)]

    def similarity(self, view: np.ndarray) -> np.ndarray:
        """(N,) the highest zero-normalised cross-correlation of `view` with a window of each thumbnail
        (-1 where the view does not fit)."""
        h, w = view.shape
        H, W = self.shape
        if h > H or w > W:
            return np.full(len(self.names), -1.0)
        z = view - view.mean()
        norm = np.sqrt((z**2).sum())
        if norm == 0:  # a flat view correlates with nothing
            return np.full(len(self.names), -1.0)
        products = np.fft.irfft2(self.spectrum * np.conj(np.fft.rfft2(z, s=self.shape)), s=self.shape)
        spread = self._window_spread(h, w)
        zncc = products[:, : H - h + 1, : W - w + 1] / np.maximum(norm * spread, 1e-9)
        return zncc.reshape(len(self.names), -1).max(axis=1)


def banks(thumbnails: dict[str, str]) -> list[Bank]:
    """The recorded training thumbnails, one bank per shape."""
    by_shape: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
    for name, text in sorted(thumbnails.items()):
        t = decode(text)
        by_shape.setdefault(t.shape, []).append((name, t))
    return [Bank([n for n, _ in group], [t for _, t in group]) for group in by_shape.values()]


def most_like(image: np.ndarray, recorded: list[Bank]) -> tuple[str, float]:
    """The training image an image is most like, and how alike (zero-normalised correlation)."""
    best, score = "", -1.0
    vs = views(image)
    for bank in recorded:
        top = np.max([bank.similarity(v) for v in vs], axis=0) if vs else np.full(len(bank.names), -1.0)
        k = int(np.argmax(top))
        if top[k] > score:
            best, score = bank.names[k], float(top[k])
    return best, score


# --- splits recorded before these thumbnails -------------------------------------------------


LEGACY_SIDE = 16


def legacy_thumbnail(image: np.ndarray) -> np.ndarray:
    """The 16 x 16 grey block means earlier releases recorded."""
    g = grey(image)
    h, w = (g.shape[0] // LEGACY_SIDE) * LEGACY_SIDE, (g.shape[1] // LEGACY_SIDE) * LEGACY_SIDE
    if h == 0 or w == 0:
        return np.zeros((LEGACY_SIDE, LEGACY_SIDE), np.uint8)
    blocks = g[:h, :w].reshape(LEGACY_SIDE, h // LEGACY_SIDE, LEGACY_SIDE, w // LEGACY_SIDE).mean(axis=(1, 3))
    return np.round(blocks).astype(np.uint8)


def legacy_copy(image: np.ndarray, thumbnails: dict[str, str]) -> bool:
    """An earlier release's check: a flip or turn of the image's 16 x 16 thumbnail within 1.5 grey
    levels of a recorded one."""
    train = np.stack(
        [np.frombuffer(bytes.fromhex(t), np.uint8).reshape(LEGACY_SIDE, LEGACY_SIDE) for t in thumbnails.values()]
    ).astype(np.float64)
    thumb = legacy_thumbnail(image)
    turns = [np.rot90(thumb, k) for k in range(4)]
    variants = np.stack(turns + [t[:, ::-1] for t in turns]).astype(np.float64)
    return float(np.abs(variants[:, None] - train[None]).mean(axis=(2, 3)).min()) < LEGACY_TOLERANCE
