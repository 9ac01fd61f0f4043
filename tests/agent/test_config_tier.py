"""models.tier (issue 17 item 3): which shipped pack a config means, the error when that tier's pack is
not shipped (check-config and start), and the warning when the pack was trained as another tier."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import ConfigError, config_from_dict, models_problem, models_warnings
from engines.packs import SHIPPED_PACKS, missing_tier_pack, shipped_pack_dir

REPO = Path(__file__).resolve().parents[2]


def test_the_tier_chooses_the_shipped_pack_folder():
    assert config_from_dict({}).models.tier == "edge"
    assert config_from_dict({}).models_dir() == SHIPPED_PACKS / "steel" == shipped_pack_dir("steel")
    line = config_from_dict({"agent": {"profile": "kolektorsdd"}, "models": {"tier": "line"}})
    assert line.models_dir() == SHIPPED_PACKS / "line" / "kolektorsdd" == shipped_pack_dir("kolektorsdd", "line")
    # models.dir wins over the tier
    assert config_from_dict({"models": {"tier": "line", "dir": "/x/pack"}}).models_dir() == Path("/x/pack")
    with pytest.raises(ConfigError, match=r"models\.tier: must be one of edge, line, got 'gpu'"):
        config_from_dict({"models": {"tier": "gpu"}})
    with pytest.raises(ValueError, match="unknown model tier 'gpu'"):
        shipped_pack_dir("steel", "gpu")
    with pytest.raises(ValueError, match="not a profile name: 'line'"):  # the line tier's folder is no profile
        shipped_pack_dir("line")


def test_a_tier_that_is_not_shipped_is_a_config_problem_naming_the_folder_and_the_command():
    assert missing_tier_pack("steel", "edge") is None  # shipped
    assert models_problem(config_from_dict({})) is None
    assert models_problem(config_from_dict({"models": {"tier": "line"}})) is None  # steel's line pack is shipped
    problem = models_problem(config_from_dict({"agent": {"profile": "magnetic_tile"}, "models": {"tier": "line"}}))
    assert problem is not None and problem.startswith(
        "models.tier: the line tier's model pack for profile 'magnetic_tile'")
    assert f"no model.json in {SHIPPED_PACKS / 'line' / 'magnetic_tile'}" in problem
    assert "docs/models.md" in problem and "coilsight train-instances --profile magnetic_tile" in problem
    assert "--model-size line" in problem and "--out engines/models/line/magnetic_tile" in problem
    # a profile without an edge pack is named the same way; an explicit models.dir is the loader's to check
    assert "--gate-from engines/models/magnetic_tile" in problem  # a line pack keeps the edge pack's gate
    edge = models_problem(config_from_dict({"agent": {"profile": "nosuch"}}))
    assert f"no model.json in {SHIPPED_PACKS / 'nosuch'}" in edge and "--gate-from" not in edge
    assert models_problem(config_from_dict({"agent": {"profile": "nosuch"}, "models": {"dir": "/x"}})) is None


def test_check_config_exits_1_on_a_missing_tier_and_0_on_the_shipped_one(tmp_path, capsys):
    line = tmp_path / "line.toml"
    line.write_text('[agent]\nprofile = "magnetic_tile"\n[models]\ntier = "line"\n')
    assert main(["check-config", str(line)]) == 1
    out = capsys.readouterr().out
    assert f"{line}: models.tier: the line tier's model pack" in out
    assert str(SHIPPED_PACKS / "line" / "magnetic_tile") in out and "1 error(s)" in out
    for tier in ("edge", "line"):  # steel ships both tiers: each loads, and is the tier it says it is
        ok = tmp_path / f"{tier}.toml"
        ok.write_text(f'[agent]\nprofile = "steel"\n[models]\ntier = "{tier}"\n')
        assert main(["check-config", str(ok), "--load-models"]) == 0
        assert capsys.readouterr().out.strip() == f"{ok}: ok"
        assert json.loads((shipped_pack_dir("steel", tier) / "model.json").read_text())["training"]["tier"] == tier


def test_start_refuses_a_missing_tier_with_one_config_error_line(tmp_path):
    line = tmp_path / "line.toml"
    line.write_text(f'[agent]\nprofile = "magnetic_tile"\nstate_dir = "{tmp_path / "state"}"\n[models]\ntier = "line"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(line)], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "config error:" in r.stderr and f"no model.json in {SHIPPED_PACKS / 'line' / 'magnetic_tile'}" in r.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was opened


def test_a_pack_trained_as_another_tier_is_a_warning(tmp_path, capsys):
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "model.json").write_text(json.dumps({"training": {"tier": "line", "model_size": "line"}}))
    cfg = config_from_dict({"models": {"dir": str(pack)}})
    [warning] = models_warnings(cfg)
    assert warning.startswith("models.tier: 'edge' is configured, but") and "trained as the 'line' tier" in warning
    assert models_warnings(config_from_dict({"models": {"dir": str(pack), "tier": "line"}})) == []
    (pack / "model.json").write_text(json.dumps({"training": {"model_size": "edge"}}))  # no tier recorded: quiet
    assert models_warnings(cfg) == []
    assert models_warnings(config_from_dict({"models": {"dir": str(tmp_path / "nowhere")}})) == []
    (pack / "model.json").write_text(json.dumps({"training": {"tier": "line"}}))
    path = tmp_path / "a.toml"
    path.write_text(f'[models]\ndir = "{pack}"\n')
    assert main(["check-config", str(path)]) == 0  # a warning, not an error
    captured = capsys.readouterr()
    assert f"{path}: warning: models.tier: 'edge' is configured" in captured.err
    assert captured.out.strip() == f"{path}: ok"
