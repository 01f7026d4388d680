"""The one family of errors a user should see: `python -m detection` prints the message on one
line (naming the file, the value and the fix) and exits with the class's code, instead of a
traceback. Each stage defines its own subclass beside the code that raises it; anything else is a
bug and keeps its traceback."""

from __future__ import annotations


class DetectionError(Exception):
    exit_code = 2  # bad input or environment: fix it and run again
    advice = ""  # said after the message, for errors whose state the user should know about
    problems: list[str] | None = None  # every problem found, one per line, when there are several
