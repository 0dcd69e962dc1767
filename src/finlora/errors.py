"""The one exception type a user is meant to see.

Anything raised as `FinloraError` is a mistake in the user's input (a file, a config, a path);
the CLI prints its message as one line and exits with status 2. Every other exception is a bug.
"""

import os


class FinloraError(Exception):
    """A user-facing error: the message names the file, line or key at fault."""


# The CLI's exit status on Ctrl-C or SIGTERM; also how a `--nproc` process ends when the launcher
# stops it because another process failed.
STOPPED = 130

# Where the processes of `finlora train --nproc` leave their one-line user errors, for the
# launcher (distributed.launch) to print once rather than once a process.
ERRORS_ENV = "FINLORA_ERRORS_DIR"


def under_launcher() -> bool:
    """True in a process that `finlora train --nproc` started."""
    directory, rank = os.environ.get(ERRORS_ENV), os.environ.get("RANK")
    return bool(directory) and rank is not None and os.path.isdir(str(directory))


def leave_error(message: str) -> bool:
    """In a process `finlora train --nproc` started, leave a user error for the launcher to
    print; False in any other process, which prints its own."""
    if not under_launcher():
        return False
    directory, rank = os.environ[ERRORS_ENV], os.environ["RANK"]
    with open(os.path.join(directory, f"{int(rank):05d}.txt"), "w", encoding="utf-8") as fh:
        fh.write(message)
    return True
