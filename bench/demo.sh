#!/usr/bin/env bash
# `make demo` as a new user meets it (issue 22): a fresh clone, then `make demo`, timed per phase,
# with the venv's size. One JSON line. The goal is at most 5 minutes on a quiet 2-core machine.
#   bash bench/demo.sh [CLONE_DIR]     (default: a fresh folder under /tmp)
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dir=${1:-$(mktemp -d /tmp/brecahad-demo.XXXX)}
rm -rf "$dir" && git clone -q "$src" "$dir" && cd "$dir"
t0=$(date +%s.%N)
make install >install.log 2>&1
t1=$(date +%s.%N)
make demo >demo.log 2>&1
t2=$(date +%s.%N)
venv_mb=$(du -sm .venv | cut -f1)
python3 - "$t0" "$t1" "$t2" "$venv_mb" "$dir" <<'PY'
import json, sys
t0, t1, t2, mb, where = map(str, sys.argv[1:])
t0, t1, t2 = float(t0), float(t1), float(t2)
print(json.dumps({"install_s": round(t1 - t0, 1), "demo_after_install_s": round(t2 - t1, 1),
                  "make_demo_total_s": round(t2 - t0, 1), "venv_mb": int(mb), "clone": where}))
PY
