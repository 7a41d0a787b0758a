"""What hvdtrain prints for people: whole lines, each in one write.

Launchers forward each rank's output and prefix its lines (horovodrun: ``[1,0]<stdout>:``). horovodrun also runs
Python unbuffered, so ``print(text)`` becomes two writes (the text, then the newline), and the two can be
forwarded, and prefixed, separately: ``text[1,0]<stdout>:`` and a lone newline (seen here). Writing each line with
its newline in one call keeps every forwarded line whole.
"""
from __future__ import annotations

import sys


def say(text: str = "", stream=None) -> None:
    """Write ``text`` (one or more lines) and a newline in one write, then flush."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def warn(text: str) -> None:
    """A warning line on stderr."""
    say(f"[hvdtrain] warning: {text}", sys.stderr)


def error(text: str) -> None:
    """An error line on stderr."""
    say(f"hvdtrain: error: {text}", sys.stderr)
