"""The ``sparseforge`` command line: one sub-module per command group.

One error path for every command: bad input prints one line, ``error: ...``, on stderr (no
traceback) and exits with status 2; Ctrl-C prints one line saying what was written and exits
with status 130. Every output file is written through :func:`sparseforge.fileio.atomic_write`,
so an interrupted command never leaves half a file.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import typer

__all__ = ["main", "Interrupted"]


class Interrupted(BaseException):
    """Raised by the command line's SIGINT handler (deliberately not a ``KeyboardInterrupt``:
    typer turns those into a return value, which would end the process with status 0)."""


def _interrupted(outputs: Any, argv: list[str] | None) -> NoReturn:
    """One line saying what was kept, then exit status 130."""
    print(f"interrupted; {outputs.summary() if outputs is not None else 'nothing was written'}", file=sys.stderr)
    if argv is None:  # a real process: leave at once; an interrupted import (torch, numpy) can leave modules
        # half-initialised that exit-time handlers would then trip over. Our own temporary files were
        # already removed while the interrupt unwound the stack.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)


def _importing(frame: FrameType | None) -> bool:
    """Whether the interrupted code runs inside an import (the import machinery is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _app() -> typer.Typer:
    """The typer app with every command registered (imported after the SIGINT handler is set)."""
    from . import bench, demo, experiments, llm, prune, report  # noqa: F401  (each module adds its command to `app`)
    from .app import app

    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point: run one command; one line and exit status 2 on bad input, 130 on Ctrl-C."""
    received: list[int] = []
    held: list[Any] = [None]  # the invocation's Outputs, once made

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if argv is None and _importing(frame):
            # raising inside an import can reach C++ extension code (pybind11), which aborts the
            # process instead of unwinding; nothing is written while modules load: leave now
            _interrupted(held[0], argv)
        raise Interrupted()

    previous = signal.getsignal(signal.SIGINT)
    handler_installed = previous is not signal.SIG_IGN  # an ignored SIGINT (background job) stays ignored
    if handler_installed:
        signal.signal(signal.SIGINT, on_sigint)
    outputs = None
    try:
        from .outputs import Outputs

        outputs = held[0] = Outputs()
        status = _app()(args=argv, standalone_mode=False, obj=outputs)
        if status == 130:  # typer's own answer to a KeyboardInterrupt that did not come through our handler
            raise Interrupted()
    except (Interrupted, KeyboardInterrupt):
        _interrupted(outputs, argv)
    except Exception as exc:
        if received:  # the interrupt surfaced as another error (e.g. from a half-imported module)
            _interrupted(outputs, argv)
        from ..errors import SparseforgeError

        if isinstance(exc, SparseforgeError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        # Usage errors of the click parser carry their own message and exit code.
        exit_code = getattr(exc, "exit_code", None)
        if hasattr(exc, "show") and isinstance(exit_code, int):
            exc.show()
            sys.exit(exit_code)
        raise
    finally:
        if handler_installed:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
