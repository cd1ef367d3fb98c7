"""The CLI's error root: every failure becomes one line on stderr and an exit code."""


class CliError(Exception):
    """An operation failed (exit 1)."""

    exit_code = 1


class UsageError(CliError):
    """The user's input is wrong (exit 2)."""

    exit_code = 2
