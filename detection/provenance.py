"""What made a set of numbers: the digest of the code behind an evaluation, so one is reused only
by the same code. A change to inference, post-processing, matching or a metric changes it; the
package's version (0.1.0 for every commit) could not tell them apart."""

from __future__ import annotations

import ast
import functools
import hashlib
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# The numbers also depend on the libraries that compute them.
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "faster-coco-eval")


def imports(path: Path) -> set[str]:
    """The detection modules a file imports anywhere in it, inside functions too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "detection":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("detection.")}
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = {p.stem: p for p in package.glob("*.py")}
    return {name: imports(path) & modules.keys() - {name} for name, path in modules.items()}


def reached(start: str, edges: dict[str, set[str]]) -> set[str]:
    """`start` and every module it imports, directly or not."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def code_digest(start: str = "evaluate", package: Path = PACKAGE) -> str:
    """16 hex digits over the source of `start` and every module it reaches, and the versions of
    the libraries that compute the numbers."""
    h = hashlib.sha256()
    for name in sorted(reached(start, graph(package))):
        h.update(name.encode() + b"\0" + (package / f"{name}.py").read_bytes() + b"\0")
    for lib in LIBRARIES:
        h.update(f"{lib}=={_version(lib)}\0".encode())
    return h.hexdigest()[:16]
