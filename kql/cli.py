"""The ``kql`` command: run a query (``-c``), saved ``.kql`` files, or the shell.

Exit status: 0 success, 1 a statement failed (a KQL error), 2 a usage error (bad option,
unreadable file), 70 an internal error (a bug), 130 interrupted.

>>> main(["-c", "SET strategy = 'naive'", "--no-progress"])
strategy = naive
0
"""

from __future__ import annotations

# Little at the top: kql/__main__.py exits quietly on a Ctrl-C until main() takes it
# over; the rest is imported inside main(), torch only once a statement needs it.
import os
import signal
import sys

# The shell's statuses, and two of the command's own; 130 is also shell.EXIT_INTERRUPTED,
# written here so that a Ctrl-C before the shell module is imported needs no import.
EXIT_USAGE, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED = 2, 141, 130

_EPILOG = """\
examples:
  kql                                   the interactive shell (\\help inside it)
  kql -c "OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 16 STRIDE 8 INTO 'out.png'"
  kql setup.kql explain.kql             run saved files, in order; stops at the first error
  kql --catalog ~/.kql LOAD...          remember LOAD MODEL / LOAD IMAGE across runs
  kql bench ...                         the benchmarks
  kql serve [--host H] [--port N]       the web viewer (http://127.0.0.1:8765/)

exit status: 0 ok, 1 a statement failed, 2 usage error, 70 internal error, 130 interrupted.
environment: KQL_PROGRESS=1|0 forces the progress bar on|off; KQL_HISTORY is the shell's
history file (default ~/.kql_history); KQL_CACHE_DIR keeps the device calibration when no
--catalog is given (default ~/.cache/kql; empty: not kept); KQL_DEBUG=1 shows tracebacks."""


def main(argv: list[str] | None = None) -> int:
    """The ``kql`` command (started by kql/__main__.py: ``kql`` or ``python -m kql``).

    Ctrl-C anywhere in it, torch's import included, ends the command quietly: one line
    and status 130 (the shell alone uses it to cancel a statement and go on). Until
    torch is imported, kql/__main__.py's quiet exit answers it.
    """
    try:
        return _guarded(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        return _interrupted()


def _guarded(argv: list) -> int:
    """The command, every error it can end in reported on one line."""
    from . import shell
    from .errors import KqlError

    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        if argv[:1] == ["serve"]:
            return _serve(argv[1:])
        return _main(argv)
    except KqlError as exc:
        shell.report_error(exc, sys.stderr)
        return shell.EXIT_FAILED
    except BrokenPipeError:
        return _broken_pipe()
    except Exception as exc:            # a bug: one line, the traceback only with KQL_DEBUG=1
        shell.report_internal(exc, sys.stderr)
        return shell.EXIT_INTERNAL


def _take_over_interrupts() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt, in place of the quiet exit that
    kql/__main__.py set up for the start (any other handler is left alone). Called once
    torch is imported: a KeyboardInterrupt raised inside an extension's import can be
    swallowed ("Exception ignored in ..."), and the command would then go on."""
    import torch  # noqa: F401  (under the quiet exit: see above)

    if getattr(signal.getsignal(signal.SIGINT), "kql_start", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from .fileio import raise_on_sigterm

    raise_on_sigterm()      # SIGTERM -> SystemExit(143): a write in progress removes its temp file


def _interrupted() -> int:
    """Say so once; a second Ctrl-C while the interpreter shuts down is ignored."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:                  # not the main thread: nothing to ignore with
        pass
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _main(argv: list) -> int:
    args = _parse(argv)
    if isinstance(args, int):
        return args
    files = _read_files(args.files)
    if isinstance(files, int):
        return files
    from . import shell
    from .api import connect

    _take_over_interrupts()
    runner = shell.Runner(connect(args.catalog), progress=_progress_wanted(args.progress))
    if args.command is not None:
        return runner.run(args.command)
    for path, text in files:
        status = runner.run(text, where=path)
        if status != shell.EXIT_OK:
            return status
    if not files:
        return shell.run_shell(runner)
    return shell.EXIT_OK


def _parser():
    """The command's ``argparse.ArgumentParser``."""
    import argparse

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


def _progress_wanted(flag: bool | None) -> bool:
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
    import importlib

    try:
        bench = importlib.import_module("kql.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "kql.bench":
            raise
        return _usage_error("'kql bench' is not available: this build has no kql.bench module")
    _take_over_interrupts()
    try:
        return int(bench.main(argv) or 0)
    except SystemExit as exc:
        return _exit_code(exc)


def _serve(argv: list) -> int:
    """``kql serve [--host 127.0.0.1] [--port 8765] [--catalog DIR]``: the web viewer."""
    import argparse
    import importlib.util

    parser = argparse.ArgumentParser(
        prog="kql serve", description="A local web viewer of heat maps (kql/serve.py).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    parser.add_argument("--catalog", metavar="DIR",
                        help="the catalog of loaded models and images, as for kql --catalog")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    if not 0 <= args.port <= 65535:
        return _usage_error(f"--port must be from 0 to 65535, not {args.port}")
    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")) or not (
            importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
        return _usage_error("kql serve needs the web extra: pip install 'kql[web]'")
    _take_over_interrupts()
    from .serve import serve

    return serve(args.host, args.port, args.catalog)


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1                            # shell.EXIT_FAILED: a statement (here, a bench run) failed


def _broken_pipe() -> int:
    """Whoever read stdout went away (``kql ... | head``): stop quietly, like Unix tools."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
