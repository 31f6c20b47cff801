"""Errors the command line turns into one sentence and an exit code."""


class UserError(Exception):
    """Bad input from the user: a file, a field, a name. Exit code 2."""

    exit_code = 2
