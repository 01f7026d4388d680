"""The package's shape (issue 23): data flows one way, so no module of detection/ imports, even
inside a function, a module that imports it back."""

import shutil

from detection import provenance
from detection.provenance import graph, reached


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules around it, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_walk_finds_a_circle_where_there_is_one():
    assert cycle({"evaluate": {"predict"}, "predict": {"second_look"}, "second_look": {"evaluate"}}) == [
        "evaluate",
        "predict",
        "second_look",
        "evaluate",
    ]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_detection_has_no_import_circle():
    edges = graph()
    assert {"pipeline", "evaluate", "predict"} <= edges.keys()
    assert "pipeline" in edges["evaluate"] and "pipeline" in edges["predict"]  # one way through the code
    assert cycle(edges) is None, " -> ".join(cycle(edges) or [])


def test_the_served_model_knows_nothing_of_evaluation():
    found = reached("predict", graph())
    assert not found & {"evaluate", "tune", "promote", "compare", "train", "cli"}, sorted(found)


def test_the_code_digest_changes_with_the_code_that_makes_the_numbers(tmp_path):
    """Issue 23: evaluations were reused by package version, 0.1.0 for every commit."""
    package = tmp_path / "detection"
    shutil.copytree(provenance.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = provenance.code_digest("evaluate", package)
    assert before == provenance.code_digest("evaluate", provenance.PACKAGE)  # the source, not where it lies
    (package / "cli.py").write_text((package / "cli.py").read_text() + "# a comment\n")
    assert provenance.code_digest.__wrapped__("evaluate", package) == before  # evaluate does not import cli
    (package / "postprocess.py").write_text((package / "postprocess.py").read_text() + "# a change\n")
    assert provenance.code_digest.__wrapped__("evaluate", package) != before
