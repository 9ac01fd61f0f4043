"""agent/journal.py's read_journal (the read-only reader behind `coilsight report` and the web
page's past coils) on segments damaged on purpose, byte by byte: a tail cut at every length, a
record with a wrong CRC or an impossible length in the middle, and records after the damage still
read. Written for deliberate bugs the report tests let through (docs/testing.md)."""
from __future__ import annotations

import struct

from agent.journal import _HEAD, MAGIC, Journal, read_journal


def three_records(directory) -> bytes:
    j = Journal(directory, fsync=False)
    j.append_many([(b"defect", b"first body"), (b"summary", b"second body"), (b"defect", b"third body")])
    j.close()
    (seg,) = directory.glob("segment-*.log")
    return seg.read_bytes()


def starts(data: bytes) -> list[int]:
    out, pos = [], data.find(MAGIC)
    while pos >= 0:
        out.append(pos)
        pos = data.find(MAGIC, pos + 1)
    return out


def read(directory):
    damage: list = []
    return [(seq, topic, body) for seq, topic, body in read_journal(directory, damage)], damage


def test_good_records_come_back_in_order_with_topic_and_body(tmp_path):
    three_records(tmp_path)
    recs, damage = read(tmp_path)
    assert damage == []
    assert [(t, b) for _, t, b in recs] == [(b"defect", b"first body"), (b"summary", b"second body"),
                                            (b"defect", b"third body")]
    assert [s for s, _, _ in recs] == [1, 2, 3]


def test_a_tail_cut_at_any_length_is_a_torn_tail_and_the_records_before_it_read(tmp_path):
    data = three_records(tmp_path)
    (seg,) = tmp_path.glob("segment-*.log")
    last = starts(data)[-1]
    for cut in range(last + 1, len(data)):  # 1 byte of the last record .. all of it but one byte
        seg.write_bytes(data[:cut])
        recs, damage = read(tmp_path)
        assert [b for _, _, b in recs] == [b"first body", b"second body"], cut
        assert [(d.kind, d.offset) for d in damage] == [("torn_tail", last)], cut
        assert seg.read_bytes() == data[:cut]  # read-only: nothing truncated


def test_a_record_with_a_wrong_crc_is_skipped_and_the_next_one_read(tmp_path):
    data = bytearray(three_records(tmp_path))
    (seg,) = tmp_path.glob("segment-*.log")
    second = starts(bytes(data))[1]
    data[second + _HEAD.size + 12] ^= 0x01  # a bit of the second record's body flipped
    seg.write_bytes(bytes(data))
    recs, damage = read(tmp_path)
    assert [b for _, _, b in recs] == [b"first body", b"third body"]
    assert [(d.kind, d.offset) for d in damage] == [("crc_mismatch", second)]


def test_a_record_with_an_impossible_length_is_skipped_and_the_next_one_read(tmp_path):
    data = bytearray(three_records(tmp_path))
    (seg,) = tmp_path.glob("segment-*.log")
    first, second, third = starts(bytes(data))
    for length in (0, 3, 1 << 30):  # shorter than its seq header; far past the segment's end
        damaged = bytearray(data)
        struct.pack_into("<I", damaged, second + 4, length)
        seg.write_bytes(bytes(damaged))
        recs, damage = read(tmp_path)
        assert [b for _, _, b in recs] == [b"first body", b"third body"], length
        assert [(d.kind, d.offset) for d in damage] == [("bad_length", second)], length
    garbage = bytes(data[:second]) + b"\x00" * 7 + bytes(data[second:])  # junk between two records
    seg.write_bytes(garbage)
    recs, damage = read(tmp_path)
    assert [b for _, _, b in recs] == [b"first body", b"second body", b"third body"]
    assert [(d.kind, d.offset) for d in damage] == [("bad_magic", second)]


def test_records_of_several_segments_come_back_oldest_segment_first(tmp_path):
    j = Journal(tmp_path, fsync=False, segment_bytes=100)
    for n in range(12):
        j.append_many([(b"defect", b"body %02d" % n)])
    j.close()
    assert len(list(tmp_path.glob("segment-*.log"))) >= 3
    recs, damage = read(tmp_path)
    assert damage == []
    assert [b for _, _, b in recs] == [b"body %02d" % n for n in range(12)]
    assert [s for s, _, _ in recs] == list(range(1, 13))
