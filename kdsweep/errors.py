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
