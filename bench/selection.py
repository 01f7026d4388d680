"""How much a champion's test figure flatters it when promotions are decided on the test split.

Every candidate is equally good (the same true detection rate and false positives per cell); each
is judged on the same 241 held-out cells (the shared sample's test split) and on a separate
validation split, with binomial and Poisson counting noise. A promotion replaces the champion when
the candidate's F1 on the deciding split is higher. After n promotions, the champion's test F1
minus the true F1, averaged over simulations, is the bias the decision rule leaves in the reported
figure. Versions are independent here; real versions share errors, which lowers the noise but not
the direction.

    python bench/selection.py [--cells 241] [--val-cells 300] [--detection-rate 0.8] [--fdr 0.5]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def f1(tp: np.ndarray, fp: np.ndarray, cells: int) -> np.ndarray:
    return 2 * tp / (2 * tp + fp + (cells - tp))


def judged(rng, n: int, cells: int, dr: float, fp_per_cell: float) -> np.ndarray:
    """(n,) F1 of n equal versions on one split of `cells` cells."""
    tp = rng.binomial(cells, dr, size=n)
    fp = rng.poisson(fp_per_cell * cells, size=n)
    return f1(tp, fp, cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=241, help="test cells (default: %(default)s)")
    p.add_argument("--val-cells", type=int, default=300, help="validation cells (default: %(default)s)")
    p.add_argument("--detection-rate", type=float, default=0.8)
    p.add_argument("--fdr", type=float, default=0.5, help="at the operating point (default: %(default)s)")
    p.add_argument("--sims", type=int, default=20_000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    fp_per_cell = args.detection_rate * args.fdr / (1 - args.fdr)
    true = float(f1(np.array(args.detection_rate * args.cells), np.array(fp_per_cell * args.cells), args.cells))
    out = {"true_f1": round(true, 4), "cells": args.cells}
    for promotions in (3, 20):
        versions = promotions + 1
        test, val = (
            np.stack([judged(rng, versions, cells, args.detection_rate, fp_per_cell) for _ in range(args.sims)])
            for cells in (args.cells, args.val_cells)
        )
        on_test = test.max(axis=1)  # each promotion keeps the better test F1: the champion holds the maximum
        on_val = test[np.arange(args.sims), val.argmax(axis=1)]  # decided on val, reported on test
        out[f"after_{promotions}"] = {
            "decided_on_test_inflation": round(float(on_test.mean() - true), 4),
            "decided_on_val_inflation": round(float(on_val.mean() - true), 4),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
