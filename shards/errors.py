"""Errors that mean "the user's input is wrong", as opposed to a bug.

Every layer raises :class:`UserError` for bad input (a missing path, an
unknown layout, shards of another format); the CLI prints its message as one
line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """Bad user input; ``str(error)`` is the one line shown to the user."""
