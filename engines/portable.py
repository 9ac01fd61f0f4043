"""Text without the paths of the machine that wrote it, for files that ship with a pack.

A pack's model.json (its `training` block), MODEL_CARD.md, calibration.json and calibration report
say how it was made: the data set and the command. Written as they ran, those name folders of one
machine (``/work/shared/data``, ``/tmp/runs/steel_medium2``) that mean nothing anywhere else. Here:

- the data root (any ``.../shared/data``, or the value of ``$COILSIGHT_DATA_ROOT``) becomes
  ``$COILSIGHT_DATA_ROOT``, so a data set reads as ``neu_det under $COILSIGHT_DATA_ROOT``;
- a run folder (``.../runs/NAME``) becomes ``runs/NAME`` (``coilsight train --out``);
- any other absolute path under a home, work or temporary folder becomes its last part.

``python -m engines.portable FILE...`` rewrites files in place (text level, so JSON stays JSON and
keeps its layout) and says which it changed.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

DATA_ROOT = "$COILSIGHT_DATA_ROOT"
_NOT_AFTER = r"(?<![\w.$/-])"  # the path starts here: not inside a word, a relative path or a variable
_DATA = re.compile(_NOT_AFTER + r"/[\w./-]*/shared/data\b")
_RUNS = re.compile(_NOT_AFTER + r"/(?:[\w.-]+/)*?runs/")
_MACHINE = re.compile(_NOT_AFTER + r"/(?:work|home|root|tmp|mnt|scratch|Users|var/tmp)(?:/[\w.-]+)+/?")
# what a shipped file must not hold (tests scan the packs with it)
MACHINE_PATH = re.compile(_NOT_AFTER + r"/(?:work|home|root|tmp|mnt|scratch|Users)/[\w.-]")


def portable(text: str) -> str:
    """``text`` with the machine's paths replaced (see the module docstring)."""
    root = os.environ.get("COILSIGHT_DATA_ROOT", "").rstrip("/")
    if len(root) > 1:
        text = re.sub(_NOT_AFTER + re.escape(root) + r"(?![\w.-])", lambda _m: DATA_ROOT, text)
    text = _DATA.sub(lambda _m: DATA_ROOT, text)
    text = _RUNS.sub("runs/", text)
    return _MACHINE.sub(lambda m: Path(m.group(0).rstrip("/")).name, text)


def portable_tree(obj: Any) -> Any:
    """Every string in a JSON-like tree (dicts, lists) made portable; keys and other values kept."""
    if isinstance(obj, str):
        return portable(obj)
    if isinstance(obj, dict):
        return {k: portable_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable_tree(v) for v in obj]
    return obj


def machine_paths(text: str) -> list[str]:
    """The machine paths left in ``text`` (empty when it is portable)."""
    return [m.group(0) for m in MACHINE_PATH.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m engines.portable FILE... (rewrites machine paths in place)", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        new = portable(text)
        if new != text:
            path.write_text(new)
        left = machine_paths(new)
        print(f"{path}: {'rewritten' if new != text else 'unchanged'}"
              + (f"; still holds {', '.join(sorted(set(left)))}" if left else ""))
        failed += bool(left)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
