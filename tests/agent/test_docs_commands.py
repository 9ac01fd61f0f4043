"""The command lines in README.md and docs/*.md use options that exist, in their current spelling
(an old spelling still works for one release, with a warning: docs must not teach it)."""
from __future__ import annotations

import re
from pathlib import Path

from agent.cli import build_parser
from engines.cliargs import _DeprecatedAlias, iter_parsers

ROOT = Path(__file__).resolve().parents[2]


def command_lines(text: str):
    """`coilsight ...` in code blocks and in inline code; not messages (`coilsight camera-sim: ...`)."""
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if (i := line.find("coilsight ")) >= 0:
                yield line[i:]
    yield from re.findall(r"`(coilsight [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def check(cmd: str, parsers: dict) -> list[str]:
    cmd = re.split(r" #| \| | && |; ", cmd)[0]  # the command itself: not a comment, pipe or the next command
    tokens = [t for t in re.split(r"[\s\[\]|\\]+", cmd) if t]
    if len(tokens) > 1 and tokens[1].endswith(":"):
        return []  # a message the command prints
    path, rest = "coilsight", tokens[1:]
    while rest and f"{path} {rest[0]}" in parsers:
        path, rest = f"{path} {rest[0]}", rest[1:]
    options = {o: a for a in parsers[path]._actions for o in a.option_strings}
    problems = []
    for i, tok in enumerate(rest):
        if not tok.startswith("--"):
            continue
        name = tok.split("=")[0]
        action = options.get(name)
        if action is None:
            problems.append(f"`{path}` has no option {name}")
        elif isinstance(action, _DeprecatedAlias):
            problems.append(f"`{path} {name}` is a deprecated spelling of {action.new}")
        elif path == "coilsight bench" and name == "--json" and i + 1 < len(rest) and not rest[i + 1].startswith("-"):
            problems.append("`coilsight bench --json FILE` is deprecated: --out FILE")
    return problems


def test_documented_command_lines_use_current_options():
    parsers = dict(iter_parsers(build_parser()))
    found, problems = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for cmd in command_lines(doc.read_text()):
            found += 1
            problems += [f"{doc.relative_to(ROOT)}: {p}: {cmd}" for p in check(cmd, parsers)]
    assert found > 30
    assert not problems, "\n".join(problems)


def test_the_checker_catches_old_spellings():
    parsers = dict(iter_parsers(build_parser()))
    assert check("coilsight bench --frames 4000 --json out.json", parsers) == [
        "`coilsight bench --json FILE` is deprecated: --out FILE"]
    assert check("coilsight calibrate thresholds --data DIR", parsers) == [
        "`coilsight calibrate thresholds --data` is a deprecated spelling of --gt-dir"]
    assert check("coilsight camera-sim --no-such-flag", parsers) == ["`coilsight camera-sim` has no option --no-such-flag"]
    assert check("coilsight bench --json | jq .", parsers) == []
