"""scripts/install.sh staged into a scratch root (--root): files, owners, modes, drop-ins."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root"),
    pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd not installed"),
]


@pytest.fixture
def source(tmp_path):
    """A release tree: the installer, units and docs from the repo, a config per profile."""
    src = tmp_path / "src"
    (src / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "install.sh", src / "scripts" / "install.sh")
    shutil.copytree(ROOT / "systemd", src / "systemd")
    (src / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "deployment.md", src / "docs" / "deployment.md")
    (src / "configs").mkdir()
    for profile in ("steel", "chip"):
        (src / "configs" / f"{profile}.toml").write_text(f"# {profile} profile\n")
    return src


def install(source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(source / "scripts" / "install.sh"), "--skip-venv", *args],
                          capture_output=True, text=True, timeout=120)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staged_install_lays_out_the_box(source, tmp_path):
    root = tmp_path / "root"
    result = install(source, "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    units = root / "etc/systemd/system"
    assert (units / "coilsight.service").read_text() == (ROOT / "systemd/coilsight.service").read_text()
    assert (units / "coilsight-engines.service").is_file()
    assert (units / "coilsight-web.service").read_text() == (ROOT / "systemd/coilsight-web.service").read_text()
    assert not (units / "coilsight.service.d").exists()  # steel is the unit's default
    passwd = (root / "etc/passwd").read_text()
    uid = int(next(line for line in passwd.splitlines() if line.startswith("coilsight:")).split(":")[2])
    state = root / "var/lib/coilsight"
    assert state.stat().st_uid == uid and mode(state) == 0o750
    for role_dir in ("cameras", "subscribers", "operators", "clients"):  # clients: the deprecated single list
        assert mode(root / "etc/coilsight/curve" / role_dir) == 0o750
    config = root / "etc/coilsight/steel.toml"
    assert config.read_text() == "# steel profile\n" and mode(config) == 0o640
    assert (root / "opt/coilsight/share/docs/deployment.md").is_file()


def test_reinstall_keeps_the_edited_config(source, tmp_path):
    root = tmp_path / "root"
    assert install(source, "--root", str(root)).returncode == 0
    config = root / "etc/coilsight/steel.toml"
    config.write_text("# tuned on the line\n")
    result = install(source, "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "exists, kept" in result.stdout
    assert config.read_text() == "# tuned on the line\n"


def test_other_profile_gets_a_drop_in(source, tmp_path):
    root = tmp_path / "root"
    result = install(source, "--profile", "chip", "--root", str(root))
    assert result.returncode == 0, result.stderr
    for unit in ("coilsight", "coilsight-engines", "coilsight-web"):
        drop_in = root / f"etc/systemd/system/{unit}.service.d/profile.conf"
        assert "Environment=COILSIGHT_CONFIG=/etc/coilsight/chip.toml" in drop_in.read_text()
    assert (root / "etc/coilsight/chip.toml").is_file()


def test_unknown_profile_and_option_are_refused(source, tmp_path):
    result = install(source, "--profile", "glass", "--root", str(tmp_path / "r"))
    assert result.returncode == 1
    assert "no profile 'glass':" in result.stderr and "configs/glass.toml does not exist" in result.stderr
    result = install(source, "--frobnicate")
    assert result.returncode == 2
    assert "unknown option --frobnicate" in result.stderr
