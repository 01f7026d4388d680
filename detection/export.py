"""What a version found, written out: the detections table of predict and the served model, and
QuPath-importable GeoJSON (evaluate's `detections/`, predict's `--format geojson`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["image", "x1", "y1", "x2", "y2", "score", "label", "class", "cx", "cy"]

# QuPath's colours for the classes it is shown (RGB); others get grey.
QUPATH_COLOURS = {"tumor": [200, 0, 0], "non_tumor": [0, 120, 200], "mitosis": [255, 140, 0]}


def table(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, classes, image: int = 0) -> pd.DataFrame:
    """One row per detection of one image: its box, score, 1-based label, class name and centre."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return pd.DataFrame(
        {
            "image": np.full(len(boxes), image, np.int64),
            "x1": boxes[:, 0],
            "y1": boxes[:, 1],
            "x2": boxes[:, 2],
            "y2": boxes[:, 3],
            "score": np.asarray(scores, np.float32),
            "label": np.asarray(labels, np.int64),
            "class": [classes[k - 1] for k in labels],
            "cx": (boxes[:, 0] + boxes[:, 2]) / 2,
            "cy": (boxes[:, 1] + boxes[:, 3]) / 2,
        }
    )[COLUMNS]


def to_geojson(table: pd.DataFrame, source: str) -> dict:
    """Detections (a `table`: cx, cy, score, class) as a GeoJSON FeatureCollection that QuPath
    imports (File > Import objects): one Point detection per cell, in image pixels (x right, y down),
    classified, with the score as a measurement."""
    grey = [128] * 3
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": QUPATH_COLOURS.get(name, grey)},
                "measurements": {"score": score},
                "source": source,
            },
        }
        # Plain columns, not iterrows: a slide's table holds a million rows.
        for x, y, score, name in zip(
            table.cx.astype(float).tolist(),
            table.cy.astype(float).tolist(),
            table.score.astype(float).tolist(),
            table["class"].tolist(),
        )  # fmt: skip
    ]
    return {"type": "FeatureCollection", "features": features}
