"""Which lightly edited copies of a training image the leakage guard refuses, before (the 16 x 16
block-mean check of earlier releases) and now (normalised thumbnails over shifts, scales and flips),
and how far apart the real fields stay, on the shared BreCaHAD sample.

    python bench/leakage.py [--data-dir ../shared/data/brecahad-sample] [--sources 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from detection import leakage  # noqa: E402
from tests.test_leakage import CAVEAT, EDITS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "brecahad-sample")
    p.add_argument("--sources", type=int, default=6, help="training images each edit is made from")
    args = p.parse_args()
    fields = {f.stem: tifffile.imread(f) for f in sorted((args.data_dir / "images").glob("*.tif"))}
    names = list(fields)
    new = {n: leakage.encode(leakage.thumbnail(img)) for n, img in fields.items()}
    old = {n: leakage.legacy_thumbnail(img).tobytes().hex() for n, img in fields.items()}
    bank = leakage.banks(new)
    sources = names[:: max(1, len(names) // args.sources)][: args.sources]
    start = time.perf_counter()
    edits = {}
    for edit, make in EDITS.items():
        before = now = 0
        lowest = 1.0
        for source in sources:
            copy = np.ascontiguousarray(make(fields[source]))
            before += leakage.legacy_copy(copy, {source: old[source]})
            name, similarity = leakage.most_like(copy, bank)
            now += name == source and similarity >= leakage.COPY_SIMILARITY
            lowest = min(lowest, similarity)
        edits[edit] = {
            "refused_before": f"{before}/{len(sources)}",
            "refused_now": f"{now}/{len(sources)}",
            "lowest": round(lowest, 4),
        }
    per_image = (time.perf_counter() - start) / (len(EDITS) * len(sources))
    apart = []
    for a in names:
        others = leakage.banks({b: t for b, t in new.items() if b != a})
        name, similarity = leakage.most_like(fields[a], others)
        apart.append((similarity, a, name))
    distinct = [x for x in apart if {x[1], x[2]} != CAVEAT]
    print(
        json.dumps(
            {
                "fields": len(names),
                "threshold": leakage.COPY_SIMILARITY,
                "edits": edits,
                "distinct_fields_highest": round(max(distinct)[0], 4),
                "distinct_fields_refused_now": sum(s >= leakage.COPY_SIMILARITY for s, _, _ in distinct),
                "distinct_fields_refused_before": sum(
                    leakage.legacy_copy(fields[a], {b: t for b, t in old.items() if b != a}) and {a} != CAVEAT
                    for _, a, _ in distinct
                ),
                "caveat_pair": round(max(x for x in apart if {x[1], x[2]} == CAVEAT)[0], 4),
                "seconds_per_checked_image_vs_18": round(per_image, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
