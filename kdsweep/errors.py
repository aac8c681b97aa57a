"""The errors kdsweep turns into messages and exit codes (see cli.main).

Their messages are redacted as they are made: a URL they quote keeps no password, wherever the
error ends up (a terminal, a notebook, a log).
"""

from __future__ import annotations

from kdsweep.redact import redact


class UsageError(Exception):
    """Bad input the user can fix (a missing model or dataset, an impossible setting): exit 2.

    The message is one line naming the problem and the fix.
    """

    def __init__(self, message: str = ""):
        super().__init__(redact(str(message)))


class StudyError(UsageError):
    """A study file with problems: one line per problem, naming the file and the key path."""

    def __init__(self, problems: list[str]):
        self.problems = [redact(p) for p in problems]
        super().__init__("\n".join(self.problems))


def first_line(error: BaseException | str, *, limit: int = 300) -> str:
    """An error's message as one line: its first non-empty line (drivers and libraries add
    hints below it), runs of whitespace made one space, passwords in URLs masked, cut at
    ``limit`` characters; the error's type when it has no message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = redact(" ".join(lines[0].split())) if lines else ""
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def described(error: BaseException, *, limit: int = 500) -> str:
    """``Type: first line``: how a failed trial's reason and an unexpected error read."""
    return first_line(f"{type(error).__name__}: {first_line(error, limit=limit)}", limit=limit)
