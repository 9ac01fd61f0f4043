"""scripts/ensure-system-tools.sh (run by `make test` before pytest) never stops pytest from starting."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-system-tools.sh"


def bin_without_systemd_analyze(tmp_path: Path, apt_get: str | None) -> Path:
    """A PATH of its own: the few tools the script needs, no systemd-analyze, and an apt-get that
    behaves as told (None: no apt-get at all)."""
    b = tmp_path / "bin"
    b.mkdir()
    for tool in ("id", "timeout", "cat"):
        (b / tool).symlink_to(shutil.which(tool))
    if apt_get is not None:
        (b / "apt-get").write_text(f"#!{shutil.which('sh')}\n{apt_get}\n")
        (b / "apt-get").chmod(0o755)
    return b


@pytest.mark.parametrize(("apt_get", "said"), [
    ('echo "E: Could not resolve host" >&2; exit 100', "(no network or no package source?)"),
    (None, "cannot be installed here (needs root and apt-get)"),
])
def test_a_tool_that_cannot_be_installed_is_reported_and_the_script_succeeds(tmp_path, apt_get, said):
    if apt_get is not None and os.geteuid() != 0:
        pytest.skip("the install path runs as root only")
    path = bin_without_systemd_analyze(tmp_path, apt_get)
    r = subprocess.run([shutil.which("bash"), str(SCRIPT)], env={"PATH": str(path)}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert said in r.stderr and "will be skipped" in r.stderr
    # every tool it lacks is named, so the reader knows which tests will skip
    assert "systemd" in r.stderr and "chromium" in r.stderr
