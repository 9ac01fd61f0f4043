"""Every command says what it does; every option has help with its default; one name per idea."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from agent.cli import build_parser, main
from engines.cliargs import _DeprecatedAlias, iter_parsers


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield action


def test_every_command_and_option_has_help_with_its_default():
    parser = build_parser()
    seen = 0
    for path, p in iter_parsers(parser):
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions) and path != "coilsight":
            assert p.description, f"{path}: no description"
            continue
        assert p.description, f"`{path} --help` has no one-line description"
        text = p.format_help()
        assert "/work/" not in text and "/root/" not in text, f"{path}: a machine path in its help"
        for action in _options(p):
            seen += 1
            name = "/".join(action.option_strings)
            if action.help == argparse.SUPPRESS:
                assert isinstance(action, _DeprecatedAlias), f"{path} {name}: hidden but not a deprecated alias"
                continue
            assert action.help and action.help.strip(), f"{path} {name}: no help text"
            d = action.default
            if d is not None and d is not False:
                shown = p._get_formatter()._get_help_string(action) % {"default": d}
                assert "default" in shown.lower(), f"{path} {name}: help does not give its default {d!r}"
    assert seen > 100


def test_backend_and_model_size_list_their_choices():
    parser = build_parser()
    by_path = dict(iter_parsers(parser))
    for path in ("coilsight bench", "coilsight evaluate"):
        (backend,) = [a for a in _options(by_path[path]) if "--backend" in a.option_strings]
        assert "onnxruntime" in backend.choices and "tensorrt" in backend.choices, path
        assert "{" in by_path[path].format_help()
    (size,) = [a for a in _options(by_path["coilsight train"]) if "--model-size" in a.option_strings]
    assert "small" in size.choices and "tiny" in size.choices


def test_model_sizes_in_the_help_are_the_nets_configs():
    pytest.importorskip("torch")
    from training.commands import MODEL_SIZES
    from training.nets import CONFIGS

    # every nets size, and the wafer line's documented fallback (training/line_wafer.py)
    assert MODEL_SIZES == (*CONFIGS, "standard-conv")


def test_version_and_help_run_as_a_process():
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().startswith("coilsight 0.")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "camera-sim", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "listens to the agent's event stream" in r.stdout
    assert "(default: 300)" in r.stdout and "--compose-from" not in r.stdout  # the old spelling is hidden


@pytest.mark.parametrize(("argv", "dest", "new"), [
    (["camera-sim", "--compose-from", "D"], "data_root", "--data-root"),
    (["bench", "--compose-from", "D"], "data_root", "--data-root"),
    (["evaluate", "--profile", "steel", "--data", "D"], "data_root", "--data-root"),
    (["calibrate", "thresholds", "--profile", "steel", "--dataset-root", "D"], "dataset_root", "--data-root"),
    (["calibrate", "thresholds", "--profile", "steel", "--data", "D"], "data", "--gt-dir"),
    (["calibrate", "thresholds", "--profile", "steel", "--gt-dir", "G", "--output", "D"], "output", "--out"),
])
def test_old_spellings_still_work_for_one_release_with_a_warning(argv, dest, new, capsys):
    args = build_parser().parse_args(argv)
    assert str(getattr(args, dest)) == "D"
    err = capsys.readouterr().err
    assert f"is deprecated and will be removed in the next release; use {new}" in err


def test_new_spellings_are_silent(capsys):
    args = build_parser().parse_args(["camera-sim", "--data-root", "D"])
    assert str(args.data_root) == "D" and capsys.readouterr().err == ""


def test_check_config_load_models_old_flag_and_print(tmp_path, capsys):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[agent]\nprofile = "steel"\n')
    assert main(["check-config", str(cfg), "--models"]) == 0
    captured = capsys.readouterr()
    assert "--models is deprecated" in captured.err and captured.out.strip() == f"{cfg}: ok"
    assert main(["check-config", str(cfg), "--load-models", "--print"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective config of {cfg}")
    import tomllib

    doc = tomllib.loads(out)  # the effective config is TOML with every default filled in
    assert doc["agent"]["profile"] == "steel" and doc["ingest"]["endpoint"] == "tcp://127.0.0.1:5555"
    assert doc["coil"]["budget_s"] == 300.0
