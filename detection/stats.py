"""Channel statistics of the training split, for model.image_mean / model.image_std.

The paper's image_std (~0.004) is about 40x smaller than BreCaHAD's pixel std (~0.15): it looks
like the variance of per-image means. Both are reported so the two normalisations can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Sample


@dataclass(frozen=True)
class ChannelStats:
    images: int
    mean: tuple[float, float, float]  # pixel mean per RGB channel, in [0, 1]
    std: tuple[float, float, float]  # pixel std per channel
    var_of_image_means: tuple[float, float, float]  # what the paper's image_std resembles


def channel_stats(samples: list[Sample], on_image=lambda: None) -> ChannelStats:
    """Exact pooled mean and std over every pixel (sums in float64, one image in memory at a time)."""
    total, sq, n, means = np.zeros(3), np.zeros(3), 0, []
    for s in samples:
        px = s.read_image().reshape(-1, 3).astype(np.float64) / 255.0
        total += px.sum(0)
        sq += (px**2).sum(0)
        n += len(px)
        means.append(px.mean(0))
        on_image()
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    spread = np.var(np.array(means), axis=0)

    def r(v):
        return tuple(round(float(x), 6) for x in v)

    return ChannelStats(len(samples), r(mean), r(std), r(spread))


def as_config(stats: ChannelStats, base: str, source: str) -> str:
    return (
        f"# The paper's protocol with input statistics measured by `python -m detection stats` on the\n"
        f"# training split of {source} ({stats.images} images), in place of the paper's image_std (~0.004),\n"
        f"# which looks like the variance of per-image means ({list(stats.var_of_image_means)} here).\n"
        f"_base_: {base}\n"
        f"model:\n"
        f"  image_mean: {list(stats.mean)}\n"
        f"  image_std: {list(stats.std)}\n"
    )
