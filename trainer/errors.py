"""The one exception type for bad user input: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """A problem with the user's files, config or command line (not a bug in wellread)."""

    exit_code = 2


class TrainingStopped(UserError):
    """Training cannot go on (e.g. the loss kept diverging); reported in one line, exit code 1."""

    exit_code = 1
