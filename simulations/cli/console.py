"""The command line's one console and its one error handler: an expected error prints `ErrorType: message`
and exits 1, without a traceback."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)  # paths, commands and findings stay on one line each


def fail(error: BaseException) -> NoReturn:
    """Print `ErrorType: message` (the message as plain text, not Rich markup) and exit with code 1."""
    console.print(f"[red]{type(error).__name__}[/]: {escape(str(error))}")
    raise typer.Exit(code=1) from None
