"""The root ``peerpath`` command and its global options."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from peerpath import __version__
from peerpath.cli.common import options

app = typer.Typer(
    name="peerpath",
    help="peerpath: a secure peer-to-peer overlay network for software agents.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    # Help texts are paragraphs: their single line breaks are the source's, not the reader's.
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peerpath {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Verbose logs and full tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """peerpath: a secure peer-to-peer overlay network for software agents."""
    options["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s" if debug else "peerpath: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        for noisy in ("quic", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
