"""`coilsight` command line. Sub-commands live beside the code they drive."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers); handlers import heavy packages lazily.
COMMAND_MODULES = (
    "agent.commands",
    "training.commands",
    "agent.engine_commands",
    "agent.web.commands",
    "agent.auth",
    "agent.tools.commands",
    "agent.bridge.commands",
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("coilsight")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        from agent import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from engines.cliargs import CoilsightParser, iter_parsers

    parser = CoilsightParser(prog="coilsight", description="Coilsight edge inspection agent")
    parser.add_argument("--version", action="version", version=f"coilsight {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for _ in iter_parsers(parser):  # each sub-command's --help starts with its one-line description
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import structlog

    if not structlog.is_configured():  # stdout carries each command's result; its log events go to stderr
        from agent.logs import configure_logging

        configure_logging(stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
