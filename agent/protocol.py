"""Wire protocol v1: the contract in docs/protocol.md, in code.

Camera -> agent (PUSH -> PULL): a frame is two ZeroMQ frames [header, pixels]; a control
message (coil_start, coil_end) is one frame [header]. Headers are msgpack maps with string keys.
Agent -> subscribers (PUB): two frames [topic, body], body a msgpack map carrying ``v`` and ``seq``.

Decoding is hostile-input safe: byte limits before msgpack, msgpack limits sized to the
schema (no extension types, no binary values, string map keys only), every key type-checked,
the pixel byte count checked before numpy touches the buffer. Every failure is a
``Rejected`` with a reason from ``REJECT_REASONS`` that the agent counts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 4096
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
DTYPES = {"uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16)}
ENCODINGS = ("raw", "png", "jpeg")
TOPICS = {"defect": b"defect", "summary": b"summary", "health": b"health",
          "track": b"track", "periodic": b"periodic"}  # track, periodic: the coil layer (agent/intel.py)

REJECT_REASONS = (
    "malformed",        # not a msgpack map / wrong number of ZeroMQ frames
    "unknown_version",  # v != 1
    "unknown_type",     # type not frame / coil_start / coil_end
    "schema",           # a key missing, of the wrong type or out of range
    "bad_shape",        # shape not [h, w] / [h, w, c] or outside the configured limits
    "bad_dtype",        # dtype other than the profile's
    "bad_encoding",     # encoding not allowed
    "size_mismatch",    # raw pixel byte count != prod(shape) * itemsize
    "oversized",        # header or payload larger than the largest legal message
    "decode_failed",    # PNG/JPEG that OpenCV cannot decode, or decoded to another shape
    "duplicate",        # same camera, coil and frame index seen before
    "stale_coil",       # frame for a coil that is already closed
    "inference_failed", # the models could not run this frame (it is counted, the agent goes on)
    "internal",         # the agent failed on this message in a way it did not foresee (a bug; logged)
)

# Parts per message the agent keeps: [header, pixels] from cameras. ZeroMQ itself has no limit on
# the number of parts (ZMQ_MAXMSGSIZE bounds each part), so this is checked as parts are read.
MAX_PARTS = 2
# JPEG start-of-frame markers the agent decodes: baseline and extended sequential, Huffman coded.
# Their decode cost is bounded by the pixel count (checked against the header's shape); a
# progressive JPEG's is not (it may hold thousands of scans over the same coefficients).
JPEG_SEQUENTIAL_SOF = (0xC0, 0xC1)


class Rejected(ValueError):
    """A message that cannot be accepted; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str, camera: str | None = None, coil: str | None = None):
        if reason not in REJECT_REASONS:  # a programming error, never input: fail loudly
            raise ValueError(f"unknown reject reason {reason!r}")
        self.reason = reason
        self.detail = detail
        self.camera = camera
        self.coil = coil
        self.index: int | None = None  # the frame index, when the header got that far
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class FrameHeader:
    camera: str
    coil: str
    seq: int
    index: int
    ts_ns: int
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    pos_mm: float


@dataclass(frozen=True)
class Control:
    type: str  # coil_start | coil_end
    camera: str
    coil: str
    seq: int
    ts_ns: int
    frames: int | None = None  # coil_end: frames this camera sent for the coil
    length_mm: float | None = None


_U63 = (1 << 63) - 1


def str_keys(pairs: list[tuple[Any, Any]]) -> dict:
    """object_pairs_hook: every map has str keys (a bin key beside a str key once reached sorted())."""
    for k, _ in pairs:
        if type(k) is not str:
            raise Rejected("malformed", f"map keys must be strings, got a {type(k).__name__} key")
    return dict(pairs)


def _unpack(raw: bytes | memoryview, max_len: int) -> Any:
    if len(raw) > max_len:
        raise Rejected("oversized", f"header is {len(raw)} bytes, limit {max_len}")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=256,
            max_bin_len=0,
            max_array_len=8,
            max_map_len=32,
            max_ext_len=0,
            use_list=True,
            object_pairs_hook=str_keys,
        )
    except Rejected:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise Rejected("malformed", f"header is not valid msgpack: {exc}") from None


def _get(h: dict, key: str, kind: type | tuple[type, ...], lo: float | None = None, hi: float | None = None) -> Any:
    if key not in h:
        raise Rejected("schema", f"missing key {key!r}")
    v = h[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise Rejected("schema", f"key {key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    # Written so that NaN fails too: every comparison with NaN is False.
    if lo is not None and not v >= lo or hi is not None and not v <= hi:
        raise Rejected("schema", f"key {key!r} = {v} out of range [{lo}, {hi}]")
    return v


def _name(h: dict, key: str) -> str:
    v = _get(h, key, str)
    if not NAME_RE.match(v):
        raise Rejected("schema", f"key {key!r} must match {NAME_RE.pattern}, got {v[:80]!r}")
    return v


def decode_message(parts: list, *, max_width: int, max_height: int, max_channels: int = 4,
                   allowed_encodings: tuple[str, ...] = ENCODINGS) -> tuple[FrameHeader | Control, Any]:
    """Decode one multipart message from a camera.

    Returns (FrameHeader, pixel_buffer) for frames, (Control, None) for control messages.
    ``parts`` items may be bytes or zmq.Frame (anything with the buffer protocol).
    """
    if not 1 <= len(parts) <= MAX_PARTS:
        raise Rejected("malformed", f"expected 1 or 2 ZeroMQ frames, got {len(parts)}")
    head = parts[0]
    head = head.buffer if hasattr(head, "buffer") else head
    h = _unpack(head, MAX_HEADER_BYTES)
    if not isinstance(h, dict):
        raise Rejected("malformed", f"header must be a map, got {type(h).__name__}")
    v = h.get("v")
    # type() is not bool: True == 1 and 1.0 == 1 in Python, yet neither is the integer 1 on the wire.
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise Rejected("unknown_version", f"protocol version {v!r} is not {PROTOCOL_VERSION}")
    mtype = h.get("type")
    # Attribute a rejection to a camera and coil only when their names are valid: a fuzzed name
    # must not open a coil (and later publish a summary) for a coil nobody runs.
    camera = h.get("camera") if isinstance(h.get("camera"), str) and NAME_RE.match(h["camera"]) else None
    coil = h.get("coil") if isinstance(h.get("coil"), str) and NAME_RE.match(h["coil"]) else None
    # Likewise the frame index, read before the rest of the header is checked: a frame rejected for
    # any reason (an unknown key included) is then counted as that frame, rejected, not as missing.
    index = h.get("index") if mtype == "frame" and type(h.get("index")) is int and 0 <= h["index"] <= 10_000_000 \
        else None
    try:
        if mtype == "frame":
            return _decode_frame(h, parts, max_width, max_height, max_channels, allowed_encodings)
        if mtype in ("coil_start", "coil_end"):
            if len(parts) != 1:
                raise Rejected("malformed", f"{mtype} must be a single ZeroMQ frame, got {len(parts)}")
            return _decode_control(h, mtype), None
    except Rejected as exc:
        exc.camera, exc.coil = exc.camera or camera, exc.coil or coil
        if exc.index is None:
            exc.index = index
        raise
    raise Rejected("unknown_type", f"message type {str(mtype)[:40]!r} is not frame, coil_start or coil_end",
                   camera, coil)


def _decode_control(h: dict, mtype: str) -> Control:
    allowed = {"v", "type", "camera", "coil", "seq", "ts_ns", "frames", "length_mm"}
    extra = set(h) - allowed
    if extra:
        raise Rejected("schema", f"unknown key(s) {sorted(extra)[:5]} in {mtype}")
    frames = length = None
    if mtype == "coil_end":
        frames = _get(h, "frames", int, 0, 10_000_000)
        if "length_mm" in h:
            length = float(_get(h, "length_mm", (int, float), 0, 1e9))
    return Control(mtype, _name(h, "camera"), _name(h, "coil"), _get(h, "seq", int, 0, _U63),
                   _get(h, "ts_ns", int, 0, _U63), frames, length)


def _decode_frame(h: dict, parts: list, max_width: int, max_height: int, max_channels: int,
                  allowed_encodings: tuple[str, ...]) -> tuple[FrameHeader, Any]:
    allowed = {"v", "type", "camera", "coil", "seq", "index", "ts_ns", "shape", "dtype", "encoding", "pos_mm"}
    extra = set(h) - allowed
    if extra:
        raise Rejected("schema", f"unknown key(s) {sorted(extra)[:5]} in frame header")
    camera, coil = _name(h, "camera"), _name(h, "coil")
    seq = _get(h, "seq", int, 0, _U63)
    index = _get(h, "index", int, 0, 10_000_000)
    ts_ns = _get(h, "ts_ns", int, 0, _U63)
    try:
        return _decode_frame_body(h, parts, camera, coil, seq, index, ts_ns, max_width, max_height, max_channels,
                                  allowed_encodings)
    except Rejected as exc:
        exc.index = index
        raise


def _decode_frame_body(h: dict, parts: list, camera: str, coil: str, seq: int, index: int, ts_ns: int,
                       max_width: int, max_height: int, max_channels: int,
                       allowed_encodings: tuple[str, ...]) -> tuple[FrameHeader, Any]:
    pos_mm = float(_get(h, "pos_mm", (int, float), -1e9, 1e9))
    shape = _get(h, "shape", list)
    if len(shape) not in (2, 3) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise Rejected("bad_shape", f"shape must be [h, w] or [h, w, c] integers, got {shape!r}")
    if not (1 <= shape[0] <= max_height and 1 <= shape[1] <= max_width):
        raise Rejected("bad_shape", f"shape {shape} outside 1..{max_height} x 1..{max_width}")
    if len(shape) == 3 and not 1 <= shape[2] <= max_channels:
        raise Rejected("bad_shape", f"channels {shape[2]} outside 1..{max_channels}")
    dtype = _get(h, "dtype", str)
    if dtype not in DTYPES:
        raise Rejected("bad_dtype", f"dtype {dtype[:20]!r} is not one of {sorted(DTYPES)}")
    encoding = _get(h, "encoding", str)
    if encoding not in allowed_encodings:
        raise Rejected("bad_encoding", f"encoding {encoding[:20]!r} is not one of {list(allowed_encodings)}")
    if len(parts) != 2:
        raise Rejected("malformed", "a frame needs 2 ZeroMQ frames [header, pixels], got 1")
    body = parts[1]
    buf = body.buffer if hasattr(body, "buffer") else memoryview(body)
    expected = int(np.prod(shape)) * DTYPES[dtype].itemsize
    if encoding == "raw" and buf.nbytes != expected:
        raise Rejected("size_mismatch", f"raw pixels are {buf.nbytes} bytes, shape {shape} {dtype} needs {expected}")
    if encoding != "raw" and buf.nbytes > expected + 65536:
        raise Rejected("oversized", f"{encoding} payload {buf.nbytes} bytes for a {expected}-byte frame")
    header = FrameHeader(camera, coil, seq, index, ts_ns, tuple(shape), dtype, encoding, pos_mm)
    return header, buf


def max_message_bytes(max_width: int, max_height: int, max_channels: int = 4, itemsize: int = 2) -> int:
    """The largest legal ZeroMQ frame: what ZMQ_MAXMSGSIZE is set to."""
    return max(MAX_HEADER_BYTES, max_width * max_height * max_channels * itemsize + 65536)


def pixels_to_array(header: FrameHeader, buf: Any) -> np.ndarray:
    """Rebuild the image without a copy for raw frames; decode PNG/JPEG with OpenCV."""
    dtype = DTYPES[header.dtype]
    if header.encoding == "raw":
        return np.frombuffer(buf, dtype=dtype).reshape(header.shape)
    import cv2

    head = bytes(buf[:65536])
    if header.encoding == "jpeg":
        sof = jpeg_sof(head)
        if sof is not None and sof not in JPEG_SEQUENTIAL_SOF:
            # Checked before OpenCV starts: a 475 KB progressive JPEG with thousands of scans took
            # 0.5-0.8 s to decode on the ingest thread. Baseline decode cost is bounded by its pixels.
            raise Rejected("bad_encoding", f"JPEG SOF{sof - 0xC0} (progressive, lossless or arithmetic) is not "
                           "accepted; send baseline JPEG", header.camera, header.coil)
    size = encoded_size(head, header.encoding)
    if size != header.shape[:2]:
        # Checked before OpenCV allocates anything: a 60 KiB PNG can claim 30000 x 30000 pixels.
        raise Rejected("decode_failed", f"{header.encoding} image header says {size}, frame header says "
                       f"{list(header.shape[:2])}", header.camera, header.coil)
    try:
        img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # a corrupt stream may raise instead of returning None
        raise Rejected("decode_failed", f"{header.encoding} payload could not be decoded: {str(exc)[:120]}",
                       header.camera, header.coil) from None
    if img is None:
        raise Rejected("decode_failed", f"{header.encoding} payload could not be decoded", header.camera, header.coil)
    if img.dtype != dtype or img.shape[:2] != header.shape[:2] or (len(header.shape) == 3) != (img.ndim == 3):
        raise Rejected("decode_failed", f"decoded {header.encoding} is {img.shape} {img.dtype}, header says "
                       f"{list(header.shape)} {header.dtype}", header.camera, header.coil)
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]  # OpenCV decodes BGR; the wire is RGB
    return img


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_sof(data: bytes) -> int | None:
    """The JPEG's start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...); None if not found."""
    pos = _jpeg_sof_pos(data)
    return None if pos is None else data[pos + 1]


def _jpeg_sof_pos(data: bytes) -> int | None:
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            return pos if pos + 9 <= len(data) else None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return None
        pos += 2 + length
    return None


def encoded_size(data: bytes, encoding: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR or a JPEG's SOF marker, without decoding; None if absent."""
    if encoding == "png":
        if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if encoding == "jpeg":
        pos = _jpeg_sof_pos(data)
        if pos is None:
            return None
        return int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
    return None


# -- encoding (camera side, used by the simulator and tests) ----------------------------------
def encode_frame(camera: str, coil: str, seq: int, index: int, image: np.ndarray, *, ts_ns: int,
                 pos_mm: float, encoding: str = "raw") -> list[bytes | memoryview]:
    header = {
        "v": PROTOCOL_VERSION, "type": "frame", "camera": camera, "coil": coil, "seq": seq, "index": index,
        "ts_ns": ts_ns, "shape": list(image.shape), "dtype": str(image.dtype), "encoding": encoding,
        "pos_mm": float(pos_mm),
    }
    if encoding == "raw":
        payload: bytes | memoryview = memoryview(np.ascontiguousarray(image)).cast("B")
    else:
        import cv2

        ext = ".png" if encoding == "png" else ".jpg"
        img = image[..., ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
        ok, enc = cv2.imencode(ext, img)
        if not ok:
            raise ValueError(f"OpenCV could not encode the frame as {encoding}")
        payload = enc.tobytes()
    return [msgpack.packb(header), payload]


def encode_control(kind: str, camera: str, coil: str, seq: int, *, ts_ns: int, frames: int | None = None,
                   length_mm: float | None = None) -> list[bytes]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": kind, "camera": camera, "coil": coil, "seq": seq,
                              "ts_ns": ts_ns}
    if kind == "coil_end":
        header["frames"] = int(frames or 0)
        if length_mm is not None:
            header["length_mm"] = float(length_mm)
    return [msgpack.packb(header)]


# -- published messages --------------------------------------------------------------------
def pack_body(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def unpack_body(raw: bytes) -> dict:
    """Decode a published body (subscriber side); bounded like the agent's own decoder."""
    body = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_ext_len=0)
    if not isinstance(body, dict) or body.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"not a v{PROTOCOL_VERSION} message body")
    return body


def encode_replay_request(first: int, last: int) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": "replay", "from": int(first), "to": int(last)})
