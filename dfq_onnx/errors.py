"""Errors a user can act on: one line that names the problem and what to do."""


class DfqError(Exception):
    """A problem with the user's input or request; the CLI prints it as one line and exits 2."""


class Interrupted(Exception):
    """The run was stopped (Ctrl-C, SIGTERM); the message says what was kept and how to resume."""


class Resumable(DfqError):
    """The run stopped for a reason outside the model (a lost cluster node); its finished units are
    kept and the message says how to resume."""
