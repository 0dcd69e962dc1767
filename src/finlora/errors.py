"""The one exception type a user is meant to see.

Anything raised as `FinloraError` is a mistake in the user's input (a file, a config, a path);
the CLI prints its message as one line and exits with status 2. Every other exception is a bug.
"""


class FinloraError(Exception):
    """A user-facing error: the message names the file, line or key at fault."""
