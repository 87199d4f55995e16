"""What a command has written so far, so an interrupt can say what was kept."""

from __future__ import annotations

from pathlib import Path

import typer


class Outputs:
    """Files one command invocation has completed (each written atomically, so each is whole)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def wrote(self, path: Path) -> Path:
        self.paths.append(Path(path))
        return path

    def summary(self) -> str:
        if not self.paths:
            return "nothing was written"
        return "kept (complete): " + ", ".join(str(p) for p in self.paths) + "; nothing else was written"


def outputs_of(ctx: typer.Context) -> Outputs:
    """The invocation's :class:`Outputs` (a fresh one when the app is called without ``obj``)."""
    if not isinstance(ctx.obj, Outputs):
        ctx.obj = Outputs()
    return ctx.obj
