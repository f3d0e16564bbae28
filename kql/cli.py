"""The ``kql`` command: run a query (``-c``), saved ``.kql`` files, or the shell.

Exit status: 0 success, 1 a statement failed (a KQL error), 2 a usage error (bad option,
unreadable file), 70 an internal error (a bug), 130 interrupted.

>>> main(["-c", "SET strategy = 'naive'", "--no-progress"])
strategy = naive
0
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from .errors import KqlError
from .shell import (EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, Runner, report_error,
                    report_internal, run_shell)

EXIT_USAGE, EXIT_BROKEN_PIPE = 2, 141

_EPILOG = """\
examples:
  kql                                   the interactive shell (\\help inside it)
  kql -c "OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 16 STRIDE 8 INTO 'out.png'"
  kql setup.kql explain.kql             run saved files, in order; stops at the first error
  kql --catalog ~/.kql LOAD...          remember LOAD MODEL / LOAD IMAGE across runs
  kql bench ...                         the benchmarks

exit status: 0 ok, 1 a statement failed, 2 usage error, 70 internal error, 130 interrupted.
environment: KQL_PROGRESS=1|0 forces the progress bar on|off; KQL_HISTORY is the shell's
history file (default ~/.kql_history); KQL_CACHE_DIR keeps the device calibration when no
--catalog is given (default ~/.cache/kql; empty: not kept); KQL_DEBUG=1 shows tracebacks."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``kql`` console script and of ``python -m kql``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KqlError as exc:
        report_error(exc, sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        return _broken_pipe()
    except Exception as exc:            # a bug: one line, the traceback only with KQL_DEBUG=1
        report_internal(exc, sys.stderr)
        return EXIT_INTERNAL


def _main(argv: list) -> int:
    args = _parse(argv)
    if isinstance(args, int):
        return args
    files = _read_files(args.files)
    if isinstance(files, int):
        return files
    from .api import connect

    runner = Runner(connect(args.catalog), progress=_progress_wanted(args.progress))
    if args.command is not None:
        return runner.run(args.command)
    for path, text in files:
        status = runner.run(text, where=path)
        if status != EXIT_OK:
            return status
    if not files:
        return run_shell(runner)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kql", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="KQL: declarative occlusion heat maps for image CNNs. With no query "
                    "and no file, opens the interactive shell.")
    parser.add_argument("files", nargs="*", metavar="FILE.kql",
                        help="files of ';'-separated statements to run, in order")
    parser.add_argument("-c", "--command", metavar="QUERY",
                        help="run QUERY (one or more ';'-separated statements) and exit")
    parser.add_argument("--catalog", metavar="DIR",
                        help="keep the catalog of loaded models and images in DIR")
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True,
                     help="always show the progress bar (on stderr)")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="never show the progress bar (default: only when stderr is a terminal)")
    parser.add_argument("--version", action="version", version=f"kql {__version__}")
    return parser


def _parse(argv: list):
    """The parsed arguments, or the exit status argparse chose (--help, usage error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is not None and args.files:
            parser.error("give either -c QUERY or files, not both")
    except SystemExit as exc:
        return _exit_code(exc)
    return args


def _read_files(paths: list):
    """``[(path, text)]`` for every file, or EXIT_USAGE after a one-line error."""
    files = []
    for path in paths:
        try:
            with open(path, encoding="utf-8-sig") as fh:
                files.append((path, fh.read()))
        except OSError as exc:
            return _usage_error(f"cannot read '{path}': {exc.strerror or exc}")
        except UnicodeDecodeError:
            return _usage_error(f"cannot read '{path}': not UTF-8 text")
    return files


def _progress_wanted(flag: Optional[bool]) -> bool:
    """--progress / --no-progress, else KQL_PROGRESS=1|0, else whether stderr is a terminal."""
    if flag is not None:
        return flag
    env = os.environ.get("KQL_PROGRESS", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def _bench(argv: list) -> int:
    try:
        bench = importlib.import_module("kql.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "kql.bench":
            raise
        return _usage_error("'kql bench' is not available: this build has no kql.bench module")
    try:
        return int(bench.main(argv) or 0)
    except SystemExit as exc:
        return _exit_code(exc)


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return EXIT_FAILED


def _broken_pipe() -> int:
    """Whoever read stdout went away (``kql ... | head``): stop quietly, like Unix tools."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
