"""argparse helpers shared by every package's `coilsight` sub-commands (the lowest layer that
registers commands imports this, so agent/ and training/ use the same ones).

- ``CoilsightParser``: every option's help ends with its default, sub-commands inherit it.
- ``deprecated_alias``: an old option spelling kept for one release, hidden from help, that warns
  on stderr and stores into the new option's destination.
"""
from __future__ import annotations

import argparse
import sys


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it already names its default, or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default != argparse.SUPPRESS and action.option_strings
                and "default" not in text.lower() and not isinstance(action, argparse._VersionAction)):
            text += " (default: %(default)s)"
        return text


class CoilsightParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"coilsight: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def deprecated_alias(parser, old: str, new: str, dest: str, *, flag: bool = False, **kwargs) -> None:
    """``old`` works like ``new`` (same destination) for one more release, with a warning."""
    if flag:
        kwargs["nargs"] = 0
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def iter_parsers(parser: argparse.ArgumentParser, prefix: str = "coilsight"):
    """(command path, parser) for the parser and every sub-command below it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name]
                yield from iter_parsers(sub, f"{prefix} {name}")
