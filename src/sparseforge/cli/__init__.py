"""The ``sparseforge`` command line: one sub-module per command group.

One error path for every command: bad input prints one line, ``error: ...``, on stderr (no
traceback) and exits with status 2; Ctrl-C prints one line saying what was written and exits
with status 130. Every output file is written through :func:`sparseforge.fileio.atomic_write`,
so an interrupted command never leaves half a file.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from .app import app
from .outputs import Outputs

__all__ = ["app", "main", "Interrupted"]


class Interrupted(BaseException):
    """Raised by the command line's SIGINT handler (deliberately not a ``KeyboardInterrupt``:
    typer turns those into a return value, which would end the process with status 0)."""


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def _register_commands() -> None:
    from . import bench, demo, prune, report  # noqa: F401  (each module adds its command to `app`)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run one command; one line and exit status 2 on bad input, 130 on Ctrl-C."""
    outputs = Outputs()
    previous = signal.getsignal(signal.SIGINT)
    handler_installed = previous is not signal.SIG_IGN  # an ignored SIGINT (background job) stays ignored
    if handler_installed:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        _register_commands()
        status = app(args=argv, standalone_mode=False, obj=outputs)
        if status == 130:  # typer's own answer to a KeyboardInterrupt that did not come through our handler
            raise Interrupted()
    except (Interrupted, KeyboardInterrupt):
        print(f"interrupted; {outputs.summary()}", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        from ..errors import SparseforgeError

        if isinstance(exc, SparseforgeError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        # Usage errors of the click parser carry their own message and exit code.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    finally:
        if handler_installed:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
