"""The errors kdsweep turns into messages and exit codes (see cli.main)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input the user can fix (a missing model or dataset, an impossible setting): exit 2.

    The message is one line naming the problem and the fix.
    """


class StudyError(UsageError):
    """A study file with problems: one line per problem, naming the file and the key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
