"""The journal on real files: append/read, restarts, and damage that is found, reported and skipped."""
from __future__ import annotations

import msgpack
import pytest

from agent.journal import _HEAD, MAGIC, Journal, JournalError


def body(i: int) -> bytes:
    return msgpack.packb({"v": 1, "n": i, "pad": "x" * 40})


def fill(j: Journal, n: int) -> list[int]:
    return j.append_many([(b"defect" if i % 3 else b"summary", body(i)) for i in range(n)])


def offsets(j: Journal) -> list[tuple[int, int]]:
    """(offset, length) of each record of the last segment, in seq order."""
    seg = j._segments[-1]
    return [seg.index[s] for s in sorted(seg.index)]


def test_append_read_roundtrip_and_limits(tmp_path):
    j = Journal(tmp_path, fsync=True)
    assert j.last_seq == 0 and j.first_seq == 1
    seqs = fill(j, 10)
    assert seqs == list(range(1, 11))
    recs = j.read(3, 7)
    assert [r[0] for r in recs] == [3, 4, 5, 6, 7]
    assert recs[0][1] == b"defect" and recs[1][1] == b"summary"  # seq 3 is i = 2, seq 4 is i = 3
    assert msgpack.unpackb(recs[0][2])["n"] == 2
    assert [r[0] for r in j.read(1, 100, limit=4)] == [1, 2, 3, 4]
    assert j.read(11, 20) == []
    j.close()
    with pytest.raises(JournalError, match="journal is closed"):
        j.append_many([(b"defect", body(0))])


def test_topic_too_long_is_refused(tmp_path):
    j = Journal(tmp_path, fsync=False)
    with pytest.raises(JournalError, match="topic of 256 bytes is longer than 255"):
        j.append_many([(b"t" * 256, body(0))])


def test_restart_continues_and_never_reuses_seq(tmp_path):
    j = Journal(tmp_path, fsync=False)
    fill(j, 5)
    j.close()
    j2 = Journal(tmp_path, fsync=False)
    assert j2.last_seq == 5 and not j2.damage
    assert fill(j2, 3) == [6, 7, 8]
    assert [r[0] for r in j2.read(1, 8)] == list(range(1, 9))
    j2.close()
    # Rotation: small segments, old ones dropped beyond keep_segments; seqs still continue.
    j3 = Journal(tmp_path, fsync=False, segment_bytes=300, keep_segments=3)
    for _ in range(10):
        fill(j3, 2)
    assert j3.last_seq == 28
    assert len(list(tmp_path.glob("segment-*.log"))) == 3
    first = j3.first_seq
    assert first > 1 and [r[0] for r in j3.read(first, 28)] == list(range(first, 29))
    j3.close()
    j4 = Journal(tmp_path, fsync=False, segment_bytes=300, keep_segments=3)
    assert j4.last_seq == 28 and fill(j4, 1) == [29]


def test_torn_tail_is_reported_kept_aside_and_truncated(tmp_path):
    j = Journal(tmp_path, fsync=False)
    fill(j, 6)
    off, ln = offsets(j)[-1]
    j.close()
    seg = next(tmp_path.glob("segment-*.log"))
    with open(seg, "r+b") as f:  # the power went out in the middle of writing record 6
        f.truncate(off + ln - 7)
    j2 = Journal(tmp_path, fsync=False)
    assert [d.kind for d in j2.damage] == ["torn_tail"]
    assert j2.damage[0].offset == off and j2.damage[0].segment == seg.name
    # Record 6 may have been published before the crash? Its header is intact: its seq is never reused.
    assert j2.last_seq == 6
    assert [r[0] for r in j2.read(1, 10)] == [1, 2, 3, 4, 5]
    assert seg.stat().st_size == off
    assert seg.with_suffix(".damaged").stat().st_size == ln - 7
    assert fill(j2, 2) == [7, 8]
    assert [r[0] for r in j2.read(1, 10)] == [1, 2, 3, 4, 5, 7, 8]
    j2.close()
    assert not Journal(tmp_path, fsync=False).damage  # clean after the truncation


@pytest.mark.parametrize("where,kind", [("body", "crc_mismatch"), ("length", "bad_length"),
                                        ("magic", "bad_magic"), ("seq", "crc_mismatch")])
def test_flipped_byte_mid_file_is_detected_and_skipped(tmp_path, where, kind):
    j = Journal(tmp_path, fsync=False)
    fill(j, 9)
    off, ln = offsets(j)[4]  # record seq 5
    j.close()
    seg = next(tmp_path.glob("segment-*.log"))
    data = bytearray(seg.read_bytes())
    at = {"body": off + ln - 3, "length": off + 6, "magic": off + 1, "seq": off + _HEAD.size}[where]
    data[at] ^= 0x40
    seg.write_bytes(bytes(data))
    j2 = Journal(tmp_path, fsync=False)
    assert [d.kind for d in j2.damage] == [kind]
    assert j2.damage[0].offset == off
    # Only the damaged record is skipped: every good record around it is still served.
    assert [r[0] for r in j2.read(1, 100)] == [1, 2, 3, 4, 6, 7, 8, 9]
    assert j2.last_seq == 9  # a flipped seq mid-file (5 -> 69) reserves nothing: good records follow it
    assert fill(j2, 1) == [10]
    j2.close()
    assert len(Journal(tmp_path, fsync=False).damage) == 1  # reported again at each open, never "healed"


def test_damage_found_on_read_is_skipped(tmp_path):
    j = Journal(tmp_path, fsync=False)
    fill(j, 4)
    off, ln = offsets(j)[1]
    seg = next(tmp_path.glob("segment-*.log"))
    j._fh.flush()
    with open(seg, "r+b") as f:  # rots while the journal is open
        f.seek(off + ln - 2)
        f.write(b"\xff")
    assert [r[0] for r in j.read(1, 4)] == [1, 3, 4]


def test_garbage_between_records_and_foreign_files(tmp_path):
    j = Journal(tmp_path, fsync=False)
    fill(j, 3)
    j.close()
    seg = next(tmp_path.glob("segment-*.log"))
    data = seg.read_bytes()
    off = data.index(MAGIC, 1)
    seg.write_bytes(data[:off] + b"junkjunk" + data[off:])
    (tmp_path / "segment-abc.log").write_bytes(b"nothing")
    j2 = Journal(tmp_path, fsync=False)
    assert [d.kind for d in j2.damage] == ["bad_magic"]
    assert [r[0] for r in j2.read(1, 3)] == [1, 2, 3]


def test_reserve_through_raises_the_floor_and_reports_missing_records(tmp_path):
    j = Journal(tmp_path, fsync=False)
    fill(j, 3)
    assert not j.reserve_through(2, "published.seq")
    assert j.reserve_through(7, "published.seq")
    assert [d.kind for d in j.damage] == ["missing_records"]
    assert "published.seq shows seq 7 was used; the journal ends at 3" in j.damage[0].detail
    assert fill(j, 1) == [8]


def test_torn_tail_right_after_the_seq_still_reserves_it(tmp_path):
    j = Journal(tmp_path, fsync=False)
    fill(j, 4)
    off, _ = offsets(j)[-1]
    j.close()
    seg = next(tmp_path.glob("segment-*.log"))
    with open(seg, "r+b") as f:  # header and seq written, the topic length byte not
        f.truncate(off + _HEAD.size + 8)
    j2 = Journal(tmp_path, fsync=False)
    assert [d.kind for d in j2.damage] == ["torn_tail"] and j2.last_seq == 4
    assert fill(j2, 1) == [5]


def test_the_evidence_at_the_journal_end_itself_is_no_loss(tmp_path):
    """published.seq equal to the journal's last seq is the normal case after a clean stop: not damage."""
    j = Journal(tmp_path, fsync=False)
    fill(j, 3)
    assert not j.reserve_through(3, "published.seq")
    assert j.damage == [] and fill(j, 1) == [4]


def test_a_record_repeating_a_seq_is_reported_and_not_served(tmp_path):
    """Two records with one seq (a copy gone wrong): the first is kept, the repeat is damage."""
    j = Journal(tmp_path, fsync=False)
    fill(j, 3)
    j.close()
    seg = next(tmp_path.glob("segment-*.log"))
    data = seg.read_bytes()
    with open(seg, "ab") as f:  # the last record again, byte for byte
        f.write(data[data.rfind(MAGIC):])
    j2 = Journal(tmp_path, fsync=False)
    assert [(d.kind, d.detail) for d in j2.damage] == [("seq_order", "seq 3 after 3")]
    assert [r[0] for r in j2.read(1, 10)] == [1, 2, 3] and j2.last_seq == 3


def test_a_read_spans_segments_that_hold_none_of_the_range(tmp_path):
    j = Journal(tmp_path, fsync=False, segment_bytes=200)  # about two records a segment
    for i in range(12):
        j.append_many([(b"defect", body(i))])
    assert len(list(tmp_path.glob("segment-*.log"))) >= 4
    assert [r[0] for r in j.read(9, 12)] == [9, 10, 11, 12]  # the first segments hold none of 9..12
    assert [msgpack.unpackb(b)["n"] for _, _, b in j.read(1, 12)] == list(range(12))
