"""`coilsight demo` for every shipped profile, its JSON on stdout, its log kept on failure; log lines
people can read (issue 20 items 6, 9, 10, 11)."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from agent.config import config_dict, dump_toml

ROOT = Path(__file__).resolve().parents[2]


def _demo(*argv: str, timeout: float = 240, tmp: Path | None = None) -> subprocess.CompletedProcess:
    """`coilsight demo` as a process; with ``tmp`` its folder (and the log it keeps) goes there."""
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp is not None else None
    return subprocess.run([sys.executable, "-m", "agent.cli", "demo", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _ranges_set(ranges) -> set[int]:
    return {i for a, b in ranges for i in range(a, b + 1)}


def test_demo_json_is_the_only_thing_on_stdout(tmp_path, agent_config):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(dump_toml(config_dict(agent_config())))
    r = _demo("--config", str(cfg), "--frames", "24", "--defect-fraction", "0.5", "--json", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # `demo --json | jq` works: progress and logs went to stderr
    s, gt = doc["summary"], doc["ground_truth"]
    assert s["final"] and s["complete"] and s["frames"]["received"] == 24
    assert s["frames"]["inspected"] + s["frames"]["gated_out"] == 24
    assert gt["frames"] == 24 and gt["painted_frames"] + gt["clean_frames"] == 24
    assert 0 <= gt["painted_defects_found"] <= gt["painted_defects"] and gt["gate_passed"] == s["frames"]["inspected"]
    assert gt["defect_events"] == s["defect_count"]
    # the gate's decision per frame (summary inspected_ranges) joined with what the demo painted
    passed = _ranges_set(s["inspected_ranges"].get("cam0", []))
    assert gt["gate_decisions"] == "all" and len(passed) == s["frames"]["inspected"]
    assert gt["gate_passed_painted"] + gt["gate_passed_clean"] == gt["gate_passed"]
    assert 0 < gt["gate_passed_painted"] <= gt["painted_frames"] and gt["gate_passed_clean"] <= gt["clean_frames"]
    assert gt["painted_frames_with_events"] <= gt["gate_passed_painted"]  # events come only from inspected frames
    assert gt["clean_frames_with_events"] <= gt["gate_passed_clean"]
    assert doc["box_score"]["true_defects"] == gt["painted_defects"]  # one truth for both comparisons
    assert "starting agent (tiny profile" in r.stderr
    # a good run keeps the agent's log (only that) and says where
    m = re.search(r"agent log: (\S+)", r.stderr)
    assert m, r.stderr
    log = Path(m[1])
    assert log.parent.parent == tmp_path and "agent_ready" in log.read_text()
    assert [p.name for p in log.parent.iterdir()] == ["agent.log"]


def test_demo_table_compares_with_its_ground_truth_and_percentages_agree(tmp_path, agent_config):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(dump_toml(config_dict(agent_config())))
    r = _demo("--config", str(cfg), "--frames", "24", "--defect-fraction", "0.5", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Coil summary" in out and "Against the demo's own ground truth" in out
    assert "{'" not in out  # no Python dict reprs

    def grab(pattern: str) -> list[int]:
        m = re.search(pattern, out)
        assert m, f"{pattern!r} not in:\n{out}"
        return [int(g) for g in m.groups()]

    def agree(pattern: str) -> list[int]:
        """A line "A of B (P %)" repeated: each P is A / B."""
        m = re.search(pattern, out)
        assert m, f"{pattern!r} not in:\n{out}"
        nums = m.groups()
        for a, b, pct in zip(nums[::3], nums[1::3], nums[2::3]):
            assert f"{100 * int(a) / int(b):.1f}" == pct, m[0]
        return [int(n) for i, n in enumerate(nums) if i % 3 != 2]

    # the summary table
    (sent,) = grab(r"frames sent +(\d+)")
    (inspected,) = grab(r"inspected \(gate passed\) +(\d+)")
    (gated_out,) = grab(r"gated out +(\d+)")
    (defects,) = grab(r"\ndefects +(\d+)")
    # the ground-truth block: every number agrees with the others and with the table
    painted_frames, frames, painted_defects, clean_frames = grab(
        r"painted: (\d+) of (\d+) frames carry (\d+) defects; (\d+) frames are clean")
    assert frames == sent == 24 and painted_frames + clean_frames == frames and inspected + gated_out == frames
    pp, pf, pc, cf = agree(r"gate passed (\d+) of (\d+) painted frames \((\d+\.\d) %\) and (\d+) of (\d+) clean "
                           r"frames \((\d+\.\d) %\)")
    assert (pf, cf) == (painted_frames, clean_frames) and pp + pc == inspected
    assert grab(r"clean frames \(\d+\.\d %\): (\d+) frames to segmentation") == [inspected]
    ep, pf2, ec, cf2 = agree(r"defect events on (\d+) of (\d+) painted frames \((\d+\.\d) %\) and on (\d+) of "
                             r"(\d+) clean frames \((\d+\.\d) %\)")
    assert (pf2, cf2) == (painted_frames, clean_frames) and ep <= pp and ec <= pc
    found, painted2 = agree(r"(\d+) of (\d+) painted defects found \((\d+\.\d) %")
    matched, painted3 = agree(r"(\d+) of (\d+) painted defects matched one-to-one at IoU >= 0.5 \((\d+\.\d) %\)")
    assert painted2 == painted3 == painted_defects and found <= painted_defects and matched <= painted_defects
    assert grab(r"(\d+) defect events received by the subscriber; camera sent (\d+) frames") == [defects, sent]


def test_demo_refuses_a_profile_without_a_pack(tmp_path, agent_config):
    cfg = tmp_path / "nopack.toml"
    data = config_dict(agent_config())
    data["models"]["dir"] = str(tmp_path / "empty")  # a profile whose pack is not there
    (tmp_path / "empty").mkdir()
    cfg.write_text(dump_toml(data))
    r = _demo("--config", str(cfg), timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert re.search(r"coilsight demo: profile tiny has no model pack to demo \(no model\.json in .*empty\); "
                     r"the shipped packs are steel, magnetic_tile, kolektorsdd, wafer, chip and parts", r.stderr), r.stderr


def test_demo_keeps_the_agent_log_when_the_run_fails(tmp_path, agent_config):
    cfg = tmp_path / "strict.toml"
    data = config_dict(agent_config())
    data["models"].update(backends=["tensorrt"], strict=True)  # no TensorRT here: the agent cannot start
    cfg.write_text(dump_toml(data))
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = _demo("--config", str(cfg), "--frames", "4", tmp=tmp_path)
    assert r.returncode == 1
    m = re.search(r"agent exited with code 1 before it was ready; agent log kept: (\S+)", r.stderr)
    assert m, r.stderr
    log = Path(m[1])
    assert log.is_file() and "strict mode and tensorrt cannot load" in log.read_text()


def test_console_logs_show_maps_as_json_not_python_reprs():
    from agent.logs import configure_logging

    buf = io.StringIO()
    saved = structlog.get_config()
    try:
        configure_logging("console", "info", stream=buf)
        structlog.get_logger("t").info("models_loaded", models={"gate": {"backend": "onnxruntime-cpu"}}, ids=["a"])
    finally:
        structlog.configure(**saved)
    line = buf.getvalue()
    # maps and lists as compact JSON (the renderer quotes a value holding quotes), never {'gate': ...}
    assert """models='{"gate":{"backend":"onnxruntime-cpu"}}'""" in line and """ids='["a"]'""" in line
    assert "{'" not in line


def test_a_cpu_box_logs_one_line_per_model_and_no_fallback_warnings(tiny_pack):
    from engines.backends.select import open_backend
    from engines.modelpack import load_model_pack

    pack = load_model_pack(tiny_pack)
    with structlog.testing.capture_logs() as logs:
        backend, skipped = open_backend(["tensorrt", "onnxruntime-cuda", "onnxruntime"], pack.models["gate"],
                                        max_batch=1, threads=1, strict=False, engine_dir=None)
    backend.deactivate()
    if backend.name != "onnxruntime-cpu":
        pytest.skip("a GPU backend loaded here")
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    (line,) = [e for e in logs if e["log_level"] == "info"]
    assert line["event"] == "backend_selected" and line["fell_back_from"] == "tensorrt, onnxruntime-cuda"
    assert line["skipped_because"].startswith("tensorrt: ") and "onnxruntime-cuda: provider(s)" in line["skipped_because"]
    assert "[" not in line["skipped_because"]  # names, not Python lists


def test_progress_line_only_on_a_terminal():
    from agent.tools.progress import ProgressLine

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = ProgressLine("camera-sim C1", 10, stream=stream, every_s=0.0)
        for i in range(1, 11):
            p.update(i, rejected=0)
        p.close()
    assert pipe.getvalue() == ""
    assert "\rcamera-sim C1: 10/10 frames, " in tty.getvalue() and ", 0 rejected" in tty.getvalue()


def test_libpng_lines_go_through_the_log_and_its_rate_limit(tmp_path, agent_config):
    """A camera sending broken PNGs: libpng's own stderr lines become rate-limited log events."""
    import signal
    import time

    import zmq
    from tinypack import clean_frame

    from agent.protocol import encode_frame
    from agent.service import status_request

    cfg = agent_config(ingest={"allowed_encodings": ["raw", "png"]})
    path = tmp_path / "agent.toml"
    path.write_text(dump_toml(config_dict(cfg)))
    err_path = tmp_path / "agent.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=err)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.setsockopt(zmq.SNDTIMEO, 10_000)
    try:
        from agent.tools.demo import wait_ready

        wait_ready(proc, cfg.control.endpoint, timeout_s=60)
        push.connect(cfg.ingest.endpoint)
        n = 40
        for i in range(n):
            header, png = encode_frame("cam0", "broken", i, i, clean_frame(), ts_ns=time.time_ns(), pos_mm=0.0,
                                       encoding="png")
            png = bytearray(bytes(png))
            png[60:80] = b"x" * 20  # inside the IDAT chunk: libpng complains on stderr
            push.send_multipart([header, bytes(png)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if status_request(cfg.control.endpoint)["health"]["rejected"].get("decode_failed", 0) >= n:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # the reader thread logs what libpng wrote
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        push.close()
        if proc.poll() is None:
            proc.kill()
    lines = err_path.read_text().splitlines()
    assert not [line for line in lines if line.startswith("libpng")]  # nothing bypasses the log
    native = [json.loads(line) for line in lines if '"native_library_message"' in line]
    assert 1 <= len(native) <= 12 and all("libpng error" in e["text"] for e in native)
    assert native[0]["level"] == "warning"


def test_coils_restored_is_a_warning_only_when_something_was_restored(tmp_path, agent_config):
    from agent.coil import CoilRegistry
    from agent.journal import Journal
    from agent.recovery import Recovery

    cfg = agent_config()
    classes = ("bright", "dark")
    journal = Journal(tmp_path / "journal", fsync=False)
    try:
        before = CoilRegistry.for_config(cfg, classes)
        Recovery(tmp_path / "ckpt.json").save(before, journal.last_seq, force=True)  # a clean stop: nothing open
        with structlog.testing.capture_logs() as logs:
            Recovery(tmp_path / "ckpt.json").restore(CoilRegistry.for_config(cfg, classes), journal)
        (line,) = [e for e in logs if e["event"] == "coils_restored"]
        assert line["log_level"] == "info" and line["coils"] == []
        before.admit("cam0", "open-coil", 0, 0.0)  # a coil still open at the crash
        Recovery(tmp_path / "ckpt.json").save(before, journal.last_seq, force=True)
        with structlog.testing.capture_logs() as logs:
            Recovery(tmp_path / "ckpt.json").restore(CoilRegistry.for_config(cfg, classes), journal)
        (line,) = [e for e in logs if e["event"] == "coils_restored"]
        assert line["log_level"] == "warning" and "open-coil" in line["coils"]
    finally:
        journal.close()


def test_line_demo_json_is_the_only_thing_on_stdout(tmp_path):
    """The generated lines' demo keeps its progress notes on stderr too (`demo --profile wafer --json | jq`),
    says which frames with defects its gate passed, and keeps the agent's log."""
    pytest.importorskip("onnxruntime")
    r = _demo("--profile", "wafer", "--frames", "6", "--defect-fraction", "0.5", "--json", timeout=240, tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    s, table = doc["summary"], doc["found_vs_truth"]
    assert s["type"] == "summary" and "starting agent" in r.stderr
    gate = table["gate"]
    assert gate["decisions"] == "all" and gate["defective"] + gate["clean"] == 6 and gate["defective"] > 0
    assert gate["passed_defective"] + gate["passed_clean"] == gate["inspected"] == s["frames"]["inspected"]
    assert gate["passed_defective"] <= gate["defective"] and gate["passed_clean"] <= gate["clean"]
    m = re.search(r"agent log: (\S+)", r.stderr)
    assert m and Path(m[1]).is_file() and Path(m[1]).parent.parent == tmp_path
