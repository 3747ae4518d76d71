"""What the command-line tools print: a line of output, or a refusal on stderr."""

from __future__ import annotations

import sys


def out(line: str = "") -> None:
    """One line on stdout, flushed (progress shows as it happens)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fail(message: str) -> int:
    """``atrium: <message>`` on stderr; the exit status of a refused command (2)."""
    sys.stderr.write(f"atrium: {message}\n")
    return 2
