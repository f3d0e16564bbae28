"""The interactive shell, and the runner that prints results and errors for the CLI.

:class:`Runner` runs KQL text on a connection and prints what happens: each statement's
rendered result on stdout, errors on stderr as ``error: <message>`` plus the caret lines,
never a traceback (``KQL_DEBUG=1`` adds one); in the shell, a heat map's picture and top
regions follow it (:mod:`kql.results.preview`). :class:`Shell` is fed lines; it collects
them until the statement ends with ``;`` (:func:`is_complete`) and runs the backslash
commands. On a terminal the lines come from prompt_toolkit (history, multi-line
editing, Tab completion from :mod:`kql.completion`); from a pipe they are read plainly,
without prompts.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from typing import Callable, Optional, TextIO

from .errors import KqlError, KqlExecutionError
from .progress import ProgressBar
from .results import preview

HELP = """\
KQL statements end with ';' and may span lines; '--' starts a comment; Tab completes.

  OCCLUDE <image> USING <model> [clauses]    the occlusion heat map of an image (or many)
      <image>   a catalog name, an image table (LOAD IMAGES), a 'file.png', a quoted
                glob 'cats/*.png' (one row per image), or sample('chelsea')
      clauses, in any order:
        TARGET <index> | '<label>' | PREDICTED    class to explain (default PREDICTED)
        TARGET (<t>, <t>, ...) | TARGET TOP <k>   several classes: one map each, one scan
        OUTPUT softmax|sigmoid|logits|probability score of the outputs (default detected)
        RESIZE squash|crop|pad                    fit a photo to the model (default squash)
        PATCH <h> [x <w>]                         patch size in pixels (default 16)
        PATCH <d> x <h> x <w>                     a volume's cube in voxels (default 8)
        STRIDE <h> [x <w>] | <d> x <h> x <w>      step between positions (default 4)
        COLOR black|gray|white|mean|(r, g, b)     patch colour (default gray)
        COLOR (<v>)                               one value: a grey image's or a volume's
        COLOR mean_patch|gaussian                 the image under the patch: its mean,
                                                  or times 1 - a Gaussian
        REGION (x, y, w, h)                       occlude only inside this box (image pixels)
        REGION (x, y, z, w, h, d)                 a volume's box (voxels)
        WITH SSIM >= <t>                          approximate, keeping SSIM >= t
        DRILLDOWN <fraction> [SPEEDUP <s>]        coarse pass, then refine the hot part
        ON cpu|gpu|auto                           device
        BATCH <n>                                 positions per forward pass
        INTO '<file>'                             write .png .npy .parquet .nii(.gz)
      many images (a glob or an image table) also take:
        WHERE <column> >=|<=|>|< <number>         keep the rows that pass
        ORDER BY <column> [ASC|DESC]              sort the rows
        LIMIT <n>                                 the first n rows
        ON RAY                                    spread the images over a Ray cluster
        <column>  probability, drop, seconds, target, path, label, height or width
  EXPLAIN [ANALYZE] OCCLUDE ...              the plan, one operator a line, a summary last
                                             (ANALYZE also runs it and shows the times)
  LOAD MODEL <name> FROM '<file>' [ARCH <arch>] [LABELS '<file>'] [TRUSTED]
      <file>    ONNX, TorchScript (code: only TRUSTED), or a state dict (.pt / safetensors) of ARCH
      <arch>    resnet18 (torchvision) | timm:<name> | 'package.module:factory' (your code)
  LOAD IMAGE <name> FROM '<file>'            one image, a NIfTI volume or a DICOM series folder
  LOAD IMAGES <name> FROM '<glob>'           an image table: every file the glob matches
  SHOW MODELS;  SHOW IMAGES;  SHOW SETTINGS;
  SET <setting> = <value>;                   SHOW SETTINGS lists them all; among them:
      strategy = 'auto' | 'naive' | 'incremental'    crossover = 'auto' | 'none' | <f>
      tau = 'auto' | <f>    gates = 'exact' | 'frozen'    (approximations)
      memory_limit = 'auto' | '<n> MB' | '<n> GB'    a larger BATCH is lowered to fit
      confirm_seconds = <s> | none    ask before a run predicted longer (default 600)
      max_image_pixels = <n>    layout = 'auto' | 'channels_last' | 'contiguous'
      engine = 'local' | 'ray'    ray_address = 'local' | 'auto' | 'ray://<host>:<port>'
      overlay_colormap, overlay_alpha, overlay_scale, ...    how INTO '.png' looks
  CALIBRATE [ON cpu|gpu]                     measure the device for the cost model
  CALIBRATE <model> ON (<image>, ...) | ON '<glob>' [PATCH ...] [STRIDE ...] [COLOR ...]
                                             tune the threshold of WITH SSIM on samples

After each heat map the shell draws it (brighter: a larger drop of the score) and lists
the top regions by drop in the original image's pixels; NO_COLOR=1 draws it in shades.

Example:
  OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 16 STRIDE 8 INTO 'out.png';

Shell commands (no ';' needed):
  \\help             this text
  \\models           SHOW MODELS
  \\images           SHOW IMAGES
  \\timing [on|off]  print the time of each statement
  \\q, \\quit         leave (Ctrl-D too); Ctrl-C cancels the statement typed or running"""

# Exit statuses of Runner.run, which the CLI passes on.
EXIT_OK, EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 70, 130

_NOISE = re.compile(r"--[^\n]*|'[^'\n]*'?|\"[^\"\n]*\"?")


def code_of(text: str) -> str:
    """``text`` without comments, each quoted string (which ends on its line) blanked.

    >>> code_of("LOAD IMAGE a FROM 'x;--y.png'  -- the cat;")
    "LOAD IMAGE a FROM ''  "
    """
    return _NOISE.sub(lambda m: "" if m.group().startswith("--") else "''", text)


def is_complete(text: str) -> bool:
    """Whether the typed ``text`` is ready to run: its code ends with ``;``, it has no
    code at all, or its last line is a backslash command.

    >>> is_complete("OCCLUDE img USING net\\n  PATCH 16;  -- done")
    True
    >>> is_complete("OCCLUDE 'a;b.png' USING net  -- no end yet;")
    False
    >>> is_complete("\\\\timing"), is_complete("-- just a comment"), is_complete("")
    (True, True, True)
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[-1].startswith("\\"):
        return True
    code = code_of(text).strip()
    return not code or code.endswith(";")


def debug_enabled() -> bool:
    """``KQL_DEBUG`` set to anything but 0: show tracebacks."""
    return os.environ.get("KQL_DEBUG", "").strip() not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def report_error(exc: KqlError, err: TextIO, where: Optional[str] = None) -> None:
    """``error: [where: ]<message>`` and the caret lines, on ``err``."""
    if debug_enabled():
        traceback.print_exception(exc, file=err)
    prefix = f"{where}: " if where else ""
    print(f"error: {prefix}{_one_line(str(exc))}", file=err)
    context = exc.context()
    if context:
        print(context, file=err)
    err.flush()


def report_internal(exc: BaseException, err: TextIO) -> None:
    """One line for a bug (not a user error); the traceback only with ``KQL_DEBUG=1``."""
    line = f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"
    if debug_enabled():
        traceback.print_exception(exc, file=err)
    else:
        line += " (rerun with KQL_DEBUG=1 to see the traceback)"
    print(line, file=err)
    err.flush()


class Runner:
    """Runs KQL text on a connection, printing results on ``out`` and errors on ``err``.

    It answers the connection's question before a run predicted longer than ``SET
    confirm_seconds`` (:meth:`confirm_long_run`): with ``ask`` (the interactive shell's
    prompt) it asks y/N; without (``kql -c``, files, piped input) it refuses, saying how
    to go on.
    """

    def __init__(self, con, progress: bool = False, out: Optional[TextIO] = None,
                 err: Optional[TextIO] = None, ask: Optional[Callable[[str], str]] = None):
        self.con = con
        self.progress = progress
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.timing = False
        self.preview = False                # the shell's: heat map pictures, tables to fit
        self.ask = ask                      # (question) -> the answer typed; None: no one to ask
        con.on_long_run = self.confirm_long_run
        con.on_warning = lambda message: self.say(f"warning: {message}", self.err)

    def confirm_long_run(self, message: str) -> None:
        """Return to run a long statement; raise a KqlExecutionError not to."""
        if self.ask is None:
            raise KqlExecutionError(f"not run: {message}, and there is no one to confirm it "
                                    f"here; to run it, SET confirm_seconds = none first")
        try:
            answer = self.ask(f"{message}. Run it? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise KqlExecutionError(f"not run (answered no): {message}; SET confirm_seconds = "
                                    f"none to skip the question")

    def run(self, text: str, where: Optional[str] = None) -> int:
        """Run every statement of ``text``, stopping at the first error.

        Returns an exit status: 0 ok, 1 a KQL error, 70 an internal error, 130 Ctrl-C.
        """
        bar = ProgressBar(self.progress, stream=self.err)
        try:
            with bar:
                self._run(text, bar)
            return EXIT_OK
        except KqlError as exc:
            report_error(exc, self.err, where)
            return EXIT_FAILED
        except KeyboardInterrupt:
            self.say("interrupted", self.err)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            raise                           # stdout is gone: the CLI ends quietly
        except Exception as exc:            # a bug: one line, never a traceback
            report_internal(exc, self.err)
            return EXIT_INTERNAL

    def _run(self, text: str, bar: ProgressBar) -> None:
        start = time.perf_counter()
        for result in self.con.run(text, progress=bar):
            bar.close()
            rendered = self.render(result)
            if rendered:
                print(rendered, file=self.out)
            if self.timing:
                print(f"Time: {time.perf_counter() - start:.3f} s", file=self.out)
            self.out.flush()
            start = time.perf_counter()

    def render(self, result) -> str:
        """A result as text for ``out``; with :attr:`preview`, a heat map's picture follows
        it and a SHOW table is wrapped to the terminal's width."""
        text = result.render()
        if not self.preview:
            return text
        if result.kind == "show" and result.rows:
            return preview.fit_table(result.rows, preview.terminal_width(self.out, most=1000))
        picture = preview.for_stream(result, self.out)
        return text + "\n" + picture if picture else text

    def say(self, text: str, stream: Optional[TextIO] = None) -> None:
        stream = stream if stream is not None else self.out
        print(text, file=stream)
        stream.flush()


class Shell:
    """Collects lines into statements and runs them; runs backslash commands at once."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.pending = ""
        self.interrupted = False            # Ctrl-C stopped a statement

    def _run(self, text: str) -> None:
        self.interrupted = self.runner.run(text) == EXIT_INTERRUPTED

    def feed(self, line: str) -> bool:
        """Take one line (no newline); False when the shell should exit."""
        if line.strip().startswith("\\"):
            return self.command(line.strip())
        self.pending += line + "\n"
        if is_complete(self.pending):
            text, self.pending = self.pending, ""
            if code_of(text).strip():
                self._run(text)
        return True

    def feed_text(self, text: str) -> bool:
        """Take several lines at once (what the prompt returned)."""
        return all(self.feed(line) for line in text.split("\n"))

    def take_pending(self) -> str:
        """The unfinished statement typed so far, removed from the shell."""
        text, self.pending = self.pending, ""
        return text

    def finish(self) -> None:
        """At end of input, run a last statement that lacks its ``;``."""
        text = self.take_pending()
        if code_of(text).strip():
            self._run(text)

    def command(self, line: str) -> bool:
        """Run a backslash command; False for ``\\q``."""
        name, *args = line.split()
        name, args = name.rstrip(";"), [arg.rstrip(";").lower() for arg in args]
        if name in ("\\q", "\\quit"):
            return False
        handlers = {"\\help": self._help, "\\h": self._help, "\\?": self._help,
                    "\\models": self._show, "\\images": self._show, "\\timing": self._timing}
        if name not in handlers:
            self._error(f"unknown command '{name}'; \\help lists the commands")
        else:
            handlers[name](name, args)
        return True

    def _error(self, message: str) -> None:
        self.runner.say(f"error: {message}", self.runner.err)

    def _help(self, name: str, args: list) -> None:
        self.runner.say(HELP)

    def _show(self, name: str, args: list) -> None:
        if args:
            self._error(f"'{name}' takes no argument")
        else:
            self._run("SHOW MODELS" if name == "\\models" else "SHOW IMAGES")

    def _timing(self, name: str, args: list) -> None:
        if args not in ([], ["on"], ["off"]):
            self._error("\\timing takes nothing, 'on' or 'off'")
            return
        self.runner.timing = args == ["on"] if args else not self.runner.timing
        self.runner.say(f"Timing is {'on' if self.runner.timing else 'off'}.")


# -- reading lines ---------------------------------------------------------------------------

def run_shell(runner: Runner, stdin: Optional[TextIO] = None) -> int:
    """The shell on ``stdin``: prompt_toolkit on a terminal, plain lines from a pipe."""
    stdin = stdin if stdin is not None else sys.stdin
    runner.preview = True
    shell = Shell(runner)
    if stdin.isatty():
        from . import __version__

        runner.say(f"KQL {__version__}: occlusion heat maps for image CNNs. "
                   f"\\help for help, \\q to quit.")
        return interactive(shell)
    return piped(shell, stdin)


def piped(shell: Shell, stream: TextIO) -> int:
    """Read lines from a non-terminal ``stream`` (no prompts), until EOF or ``\\q``."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")    # bad bytes become a syntax error, not a crash
    for line in stream:
        if not shell.feed(line.rstrip("\r\n")):
            return 0
        if shell.interrupted:
            return EXIT_INTERRUPTED             # no prompt to go back to: Ctrl-C ends it
    shell.finish()
    return EXIT_INTERRUPTED if shell.interrupted else EXIT_OK


def interactive(shell: Shell, input=None, output=None) -> int:
    """The prompt_toolkit loop; ``input``/``output`` are for tests (pipe input, dummy output)."""
    from prompt_toolkit import PromptSession

    from .completion import KqlCompleter

    shell.runner.ask = PromptSession(input=input, output=output).prompt   # y/N before long runs
    session = PromptSession(history=make_history(shell.runner.err), multiline=True,
                            key_bindings=_key_bindings(), input=input, output=output,
                            completer=KqlCompleter.for_connection(shell.runner.con),
                            complete_while_typing=False,
                            prompt_continuation=lambda width, line, soft: "   ...> ")
    while True:
        try:
            text = session.prompt("kql> ", default=shell.take_pending())
        except KeyboardInterrupt:
            continue                            # Ctrl-C drops what was typed
        except EOFError:
            return 0
        if not shell.feed_text(text):
            return 0


def _key_bindings():
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event):
        buffer = event.current_buffer
        if is_complete(buffer.text):
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    return bindings


def make_history(err: TextIO):
    """FileHistory at ``$KQL_HISTORY`` (default ``~/.kql_history``); in memory if the file
    cannot be written or ``KQL_HISTORY`` is empty."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = os.environ.get("KQL_HISTORY", os.path.join("~", ".kql_history"))
    if not path.strip():
        return InMemoryHistory()
    path = os.path.expanduser(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        print(f"note: history is not saved: cannot write '{path}': {exc.strerror or exc}",
              file=err)
        return InMemoryHistory()
    return FileHistory(path)
