"""``python -m kql``, and the ``kql`` console script (pyproject's ``[project.scripts]``).

The command starts here, in a module that imports nothing, not in :mod:`kql.cli`: from
its first line a Ctrl-C ends the process at once with one line and status 130, while
the rest is still being imported; :func:`kql.cli.main` then takes Ctrl-C over as
``KeyboardInterrupt`` (which the shell uses to cancel a statement). Only the
interpreter's own start-up, before any KQL code runs, is left to Python.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130      # kql.cli's and kql.shell's, not imported yet


def _interrupted_at_start(signum, frame):
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)


_interrupted_at_start.kql_start = True      # how kql.cli.main knows to take over
signal.signal(signal.SIGINT, _interrupted_at_start)


def main() -> int:
    """Run the ``kql`` command on ``sys.argv``."""
    from .cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
