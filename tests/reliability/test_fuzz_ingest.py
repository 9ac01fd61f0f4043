"""10,000 hostile messages interleaved with a real coil, through a real PULL socket into a real agent."""
from __future__ import annotations

import random
import time

import msgpack
import zmq
from harness import Collector, check_accounting, figures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinypack import clean_frame, frame_with

from agent.protocol import encode_control, encode_frame
from agent.service import status_request

N_VALID = 400
N_BAD = 10_000
JUNK_CAM, JUNK_COIL = "camX", "junk"  # every attributable bad message goes here, never to the real coil


def good_header(i: int) -> dict:
    return {"v": 1, "type": "frame", "camera": JUNK_CAM, "coil": JUNK_COIL, "seq": i, "index": 1_000_000 + i,
            "ts_ns": 1, "shape": [64, 256], "dtype": "uint8", "encoding": "raw", "pos_mm": 0.0}


PIX = clean_frame().tobytes()
# A value of any type but the one a key needs: the message must be rejected whatever Hypothesis draws.
ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                st.text(max_size=300), st.binary(max_size=50), st.lists(st.integers(), max_size=10),
                st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
WRONG = {
    "v": ANY.filter(lambda x: not (type(x) is int and x == 1)),
    "type": ANY.filter(lambda x: x not in ("frame", "coil_start", "coil_end")),
    "camera": ANY.filter(lambda x: not isinstance(x, str)),
    "seq": ANY.filter(lambda x: type(x) is not int or not 0 <= x < 2**63),
    "index": ANY.filter(lambda x: type(x) is not int or not 0 <= x <= 10**7),
    "shape": ANY.filter(lambda x: x != [64, 256]),
    "dtype": ANY.filter(lambda x: x not in ("uint8", "uint16")),
    "encoding": ANY.filter(lambda x: x not in ("raw", "png", "jpeg")),
    "pos_mm": ANY.filter(lambda x: not (type(x) in (int, float) and -1e9 <= x <= 1e9)),
}


def hypothesis_headers(n: int) -> list[bytes]:
    out: list[bytes] = []

    @settings(max_examples=n, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(key=st.sampled_from(sorted(WRONG)), data=st.data(),
           extra=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in good_header(0)),
                                 ANY, max_size=2))
    def gen(key, data, extra):
        h = good_header(len(out))
        h[key] = data.draw(WRONG[key])
        h.update(extra)
        try:
            out.append(msgpack.packb(h))
        except (OverflowError, ValueError, TypeError):
            pass  # not encodable: nothing to send

    gen()
    return out


def mutated(rng: random.Random, i: int) -> tuple[list[bytes], str | None]:
    """A real message broken in one known way; returns (parts, expected reason or None if any)."""
    h = good_header(10_000 + i)
    kind = rng.randrange(16)
    if kind == 0:
        raw = msgpack.packb(h)
        return [raw[:rng.randrange(1, len(raw))], PIX], "malformed"  # truncated header
    if kind == 1:
        raw = bytearray(msgpack.packb(h))
        raw[0] = rng.choice([0xC1, 0x90, 0xC0, 0xA1, 0x01, 0xD4])  # the map marker flipped to another type
        return [bytes(raw), PIX], "malformed"
    if kind == 2:
        return [msgpack.packb(h), PIX[:rng.randrange(0, len(PIX))] + b"\0" * rng.choice([0, 0, 7])], "size_mismatch"
    if kind == 3:
        h["v"] = rng.choice([0, 2, -1, "1", 1.0, True, None, 2**40])
        return [msgpack.packb(h), PIX], "unknown_version"
    if kind == 4:
        h["shape"] = rng.choice([[10**6, 256], [64, 10**9], [0, 256], [-1, 5], [64, 256, 99], [64], [64, 256, 1, 1],
                                 [64.0, 256], ["64", 256]])
        return [msgpack.packb(h), PIX], "bad_shape"
    if kind == 5:
        return [msgpack.packb(rng.choice([[1, 2], 7, "frame", None, b"\x00" * 9, 3.5]))], "malformed"
    if kind == 6:
        h["pos_mm"] = msgpack.ExtType(rng.randrange(0, 127), b"xx")
        return [msgpack.packb(h), PIX], "malformed"
    if kind == 7:
        return [msgpack.packb(h), PIX, b"third"], "malformed"
    if kind == 8:
        h["dtype"] = rng.choice(["float32", "int8", "uint32", ""])
        return [msgpack.packb(h), PIX], "bad_dtype"
    if kind == 9:
        h["encoding"] = rng.choice(["bmp", "tiff", "RAW", "gzip"])
        return [msgpack.packb(h), PIX], "bad_encoding"
    if kind == 10:
        h["encoding"] = "png"
        import cv2

        png = bytearray(cv2.imencode(".png", clean_frame())[1].tobytes())
        if rng.random() < 0.5:
            png[16:24] = (30000).to_bytes(4, "big") * 2  # a decompression bomb's header
        else:
            png[40:] = bytes(rng.randrange(256) for _ in range(len(png) - 40))
        return [msgpack.packb(h), bytes(png)], "decode_failed"
    if kind == 11:
        h["pad"] = "x" * 5000
        return [msgpack.packb(h), PIX], "oversized"
    if kind == 12:
        h["type"] = rng.choice(["frames", "coil_stop", "", "replay"])
        return [msgpack.packb(h), PIX], "unknown_type"
    if kind == 13:
        h["pos_mm"] = float("nan")
        return [msgpack.packb(h), PIX], "schema"
    if kind == 14:
        c = encode_control("coil_end", JUNK_CAM, JUNK_COIL, 1, ts_ns=1, frames=rng.choice([-1, 10**8]))
        return [msgpack.packb({**msgpack.unpackb(c[0]), "frames": rng.choice([-1, 10**8, "5"])})], "schema"
    h["camera"] = rng.choice(["", "a" * 65, "cam 0", "cäm", "x/y"])
    return [msgpack.packb(h), PIX], "schema"


def test_ten_thousand_hostile_messages_reject_exactly_and_inspect_every_valid_frame(running_agent):
    agent = running_agent(ingest={"max_queue_frames": 2000, "rcvhwm": 100_000, "max_width": 256, "max_height": 64,
                                  "coil_idle_timeout_s": 120.0})
    cfg = agent.cfg
    t_gen = time.monotonic()
    fuzzed = hypothesis_headers(3000)
    rng = random.Random(7)
    bad: list[tuple[list[bytes], str | None]] = [([h, PIX], None) for h in fuzzed]
    while len(bad) < N_BAD:
        bad.append(mutated(rng, len(bad)))
    rng.shuffle(bad)
    gen_s = time.monotonic() - t_gen
    expected_by_reason: dict[str, int] = {}
    for _, reason in bad:
        if reason:
            expected_by_reason[reason] = expected_by_reason.get(reason, 0) + 1

    col = Collector(cfg)
    time.sleep(0.3)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.setsockopt(zmq.SNDHWM, 100_000)
    push.connect(cfg.ingest.endpoint)
    t0 = time.monotonic()
    seq = 0
    push.send_multipart(encode_control("coil_start", "cam0", "F1", seq, ts_ns=time.time_ns()))
    defective = set()
    bad_copies = 0
    per_valid = N_BAD // N_VALID
    for i in range(N_VALID):
        seq += 1
        img = frame_with("bright", x=4 * (i % 50), y=8) if i % 10 == 0 else clean_frame()
        if i % 10 == 0:
            defective.add(i)
        push.send_multipart(encode_frame("cam0", "F1", seq, i, img, ts_ns=time.time_ns(), pos_mm=128.0 * i))
        if i % 20 == 0:  # a broken copy of a frame the agent holds: only a duplicate, never inspected twice
            seq += 1
            head = encode_frame("cam0", "F1", seq, i, img, ts_ns=time.time_ns(), pos_mm=128.0 * i)[0]
            push.send_multipart([head, b"short"])
            bad_copies += 1
        for parts, _ in bad[i * per_valid:(i + 1) * per_valid]:
            push.send_multipart(parts)
    seq += 1
    push.send_multipart(encode_control("coil_end", "cam0", "F1", seq, ts_ns=time.time_ns(), frames=N_VALID))
    push.close()
    assert col.wait(lambda c: c.summaries("F1"), 60), "no summary for the real coil"
    wall_s = time.monotonic() - t0
    status = status_request(cfg.control.endpoint)
    health = status["health"]
    col.close()
    assert agent.ingest.error is None and agent.inference.error is None and agent.publisher.error is None
    s = col.summaries("F1")[0]
    check_accounting(s)
    f = s["frames"]
    assert (f["sent"], f["received"], f["inspected"] + f["gated_out"]) == (N_VALID, N_VALID, N_VALID)
    assert f["rejected"] == f["shed"] == f["missing"] == f["lost"] == 0 and s["complete"]
    assert f["inspected"] == len(defective) and sorted(d["index"] for d in col.defects("F1")) == sorted(defective)
    assert f["duplicates"] == bad_copies
    rejected = health["rejected"]
    assert sum(rejected.values()) == len(bad) + bad_copies, rejected
    assert rejected["duplicate"] == bad_copies
    for reason, n in expected_by_reason.items():
        # Hypothesis headers add to these counts; the targeted ones are a floor per reason.
        assert rejected.get(reason, 0) >= n, (reason, rejected)
    assert health["state"] == "ready"
    # The Prometheus counters tell the same story as health, reason by reason.
    assert {k: int(v) for k, v in status["metrics"]["rejected"].items() if v} == rejected
    figures("fuzz ingest", valid_frames=N_VALID, hostile=len(bad), broken_copies=bad_copies,
            hypothesis_headers=len(fuzzed),
            rejected_total=sum(rejected.values()), rejected=dict(sorted(rejected.items())),
            inspected=f["inspected"], gated_out=f["gated_out"], defects=s["defect_count"],
            generate_s=round(gen_s, 1), send_to_summary_s=round(wall_s, 1))
