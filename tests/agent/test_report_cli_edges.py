"""`coilsight report` at its edges: usage and write errors exit non-zero with one line, and a coil
name from a copied journal is escaped in the page. Written for deliberate bugs the report tests
let through (docs/testing.md)."""
from __future__ import annotations

import time

from agent.cli import main
from agent.journal import Journal
from agent.protocol import pack_body


def journal_with(directory, coil: str):
    j = Journal(directory, fsync=False)
    j.append_many([(b"summary", pack_body({"v": 1, "type": "summary", "agent": "line-7", "seq": 1,
                                           "ts_ns": time.time_ns(), "coil": coil, "final": True,
                                           "defects": {"bright": 0}, "defect_count": 0, "length_mm": 1000.0}))])
    j.close()
    return directory


def test_journal_and_config_together_is_a_usage_error(tmp_path, capsys):
    j = journal_with(tmp_path / "j", "A")
    assert main(["report", "A", "--journal", str(j), "--config", str(tmp_path / "agent.toml")]) == 2
    assert "give --journal or --config, not both" in capsys.readouterr().err


def test_a_report_that_cannot_be_written_exits_1(tmp_path, capsys):
    j = journal_with(tmp_path / "j", "A")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for fmt in ("json", "html"):
        assert main(["report", "A", "--journal", str(j), "--out", str(blocked), "--format", fmt]) == 1
        err = capsys.readouterr().err
        assert "report: cannot write the report" in err and "Traceback" not in err


def test_a_coil_name_is_escaped_in_the_page(tmp_path, capsys):
    coil = "C<img src=x onerror=alert(1)>"
    j = journal_with(tmp_path / "j", coil)
    out = tmp_path / "out"
    assert main(["report", coil, "--journal", str(j), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "<img src=x" not in page and "C&lt;img src=x onerror=alert(1)&gt;" in page
