"""`coilsight camera-sim`: stream a coil to an agent, then report what the agent made of it.

A camera cannot see rejections on its PUSH socket, so the simulator also listens to the agent's
event stream (docs/protocol.md 2.3): the heartbeat says the agent is there, which ``seq`` it last
took from this camera and what it rejected from it; the coil summary says what was inspected.
Exit codes: 0 the coil was summarised complete with nothing rejected; 1 frames were not sent,
rejected, missing, or no verdict came in time; 2 no agent at the ingest or event endpoint; 3 the
agent refused the connection in its handshake (CURVE: a key not on its allow-list, CURVE on one
side only, or another server's key; agent/tools/curve_client.py says which).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import msgpack
import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from agent.tools.curve_client import FAILED, ClientKeys, explain_failure, failure_rank
from agent.tools.progress import ProgressLine

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_NOT_INSPECTED, EXIT_NO_AGENT, EXIT_REFUSED = 0, 1, 2, 3


def unique_coil_id(prefix: str = "sim") -> str:
    """A coil id no earlier run used (time-based, like the demo's), within the protocol's name rules."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() // 1000 % 1_000_000:06d}"


class ConnectWatch:
    """Watches a socket's handshakes (a ZeroMQ monitor), so a camera knows it reached an agent:
    ZeroMQ's connect succeeds, and sends are queued, even when nothing listens. A handshake that
    failed (CURVE refused, one side without CURVE, another server's key) is kept in ``failure``
    as (event, value), so the caller can say why instead of "no agent"."""

    def __init__(self, keys: ClientKeys | None = None, immediate: bool = True) -> None:
        self.monitor: zmq.Socket | None = None
        self.keys = keys
        self.immediate = immediate
        self.failure: tuple[int, int] | None = None
        self.succeeded = False

    def __call__(self, sock: zmq.Socket) -> None:  # CameraSim's socket_setup: before connect
        if self.keys is not None:
            self.keys.setup(sock)
        if self.monitor is not None:  # a later socket (a Subscriber's replay REQ): the keys only
            return
        if self.immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing until the agent has taken the connection
        self.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | FAILED)

    def _take(self, timeout_ms: int) -> bool:
        """Read one monitor event within ``timeout_ms``; True when there was one."""
        if self.monitor is None or not self.monitor.poll(timeout_ms, zmq.POLLIN):
            return False
        msg = recv_monitor_message(self.monitor)
        if msg["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.succeeded = True
        elif self.failure is None or failure_rank(msg["event"], msg["value"]) >= failure_rank(*self.failure):
            self.failure = (msg["event"], msg["value"])  # the most telling of the retries
        return True

    def wait(self, timeout_s: float) -> bool:
        if self.monitor is None:
            raise RuntimeError("ConnectWatch.wait before the socket was set up")
        deadline = time.monotonic() + timeout_s
        # A definite refusal ends the wait at once: libzmq would only retry it and fail again. A peer
        # that just closed the connection may be either of two things: retries may tell which.
        while (not self.succeeded and not (self.failure and failure_rank(*self.failure) > 1)
               and (left := deadline - time.monotonic()) > 0):
            if not self._take(max(1, int(left * 1000))):
                break
        return self.succeeded

    def failed(self) -> bool:
        """A handshake failed and none succeeded yet (reads the events waiting now; never blocks)."""
        while self._take(0):
            pass
        return self.failure is not None and not self.succeeded

    def refused(self, endpoint: str) -> str | None:
        """Why the handshake failed, in words (after the events waiting now), or None."""
        while self._take(0):
            pass
        if self.succeeded or self.failure is None:
            return None
        return explain_failure(*self.failure, endpoint, self.keys or ClientKeys("camera"))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None


class AgentListener(threading.Thread):
    """Keeps the agent's latest heartbeat and the final summaries of the coils we ask about."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, keys: ClientKeys | None = None):
        super().__init__(name="camera-sim-listener", daemon=True)
        self.endpoint = endpoint
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        # its handshakes, read by the caller's thread (only the monitor socket: never self.sock)
        self.watch = ConnectWatch(keys or ClientKeys("subscriber"), immediate=False)
        self.watch(self.sock)
        for topic in (b"health", b"summary"):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.health: dict | None = None
        self.heartbeats = 0
        self.summaries: dict[str, dict] = {}
        self.changed = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                if not poller.poll(100):
                    continue
                topic, body = self.sock.recv_multipart()
                try:
                    msg = msgpack.unpackb(body, raw=False)
                except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                    log.warning("camera_sim_bad_event", topic=topic.decode(errors="replace"))
                    continue
                with self.changed:
                    if topic == b"health":
                        self.health, self.heartbeats = msg, self.heartbeats + 1
                    elif topic == b"summary" and msg.get("final"):
                        self.summaries[str(msg.get("coil"))] = msg
                    self.changed.notify_all()
        finally:
            self.sock.close(linger=0)

    def wait_for(self, predicate, timeout_s: float):
        """Wait until predicate() is truthy (checked at every event); its last value."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not (value := predicate()) and (left := deadline - time.monotonic()) > 0:
                self.changed.wait(min(left, 0.5))
        return value

    def camera(self, camera: str) -> dict | None:
        cams = (self.health or {}).get("cameras")
        return cams.get(camera) if isinstance(cams, dict) else None

    def stop(self) -> None:
        self._halt.set()
        self.join(2.0)
        self.watch.close()


def _rejected(listener: AgentListener, camera: str) -> dict[str, int]:
    """This camera's rejections by reason since the agent started (all cameras' on an agent whose
    heartbeat has no ``cameras`` key)."""
    cam = listener.camera(camera)
    if cam is not None:
        return dict(cam.get("rejected") or {})
    return dict((listener.health or {}).get("rejected") or {})


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(now.items()) if v - before.get(k, 0) > 0}


def _counting(frames: Iterable, progress: ProgressLine, listener: AgentListener | None, camera: str,
              before: dict[str, int], sent: list[int]) -> Iterator:
    for item in frames:
        yield item
        sent[0] += 1
        rejected = sum(_delta(_rejected(listener, camera), before).values()) if listener else None
        progress.update(sent[0], rejected)


def run_camera_sim(args, frames: Iterable, classes: tuple[str, ...]) -> int:
    from agent.tools.camera_sim import CameraSim

    ingest_endpoint, events_endpoint = args.endpoint, args.events  # resolved from --config by the command
    # CURVE keys (agent/tools/curve_client.py), resolved by the command; plain sockets without them
    camera_keys = getattr(args, "camera_keys", None) or ClientKeys("camera")
    events_keys = getattr(args, "events_keys", None) or ClientKeys("subscriber")
    coil = args.coil or unique_coil_id()
    listener = None
    if not args.no_verdict:
        listener = AgentListener(events_endpoint, keys=events_keys)
        listener.start()
    watch = ConnectWatch(camera_keys)
    try:
        cam = CameraSim(ingest_endpoint, camera=args.camera, socket_setup=watch)
        try:
            # Both waits run at once (the listener is already connecting): the ingest first, as the
            # agent binds it only when ready; then its heartbeat, for the verdict.
            if not watch.wait(args.connect_timeout):
                if why := watch.refused(ingest_endpoint):
                    return _refused(why)
                return _no_agent(f"no agent at {ingest_endpoint}: nothing took the connection within "
                                 f"{args.connect_timeout:g} s (is `coilsight run` up? give its --config or --endpoint)")
            if listener is not None:  # a refused handshake ends the wait too (checked every 0.5 s)
                listener.wait_for(lambda: listener.health or listener.watch.failed(), args.connect_timeout)
            if listener is not None and listener.health is None:
                if why := listener.watch.refused(events_endpoint):
                    return _refused(why + " (the verdict comes from the event stream; --no-verdict sends without it)")
                return _no_agent(f"no heartbeat from {events_endpoint} within {args.connect_timeout:g} s: cannot "
                                 "learn what the agent does with the coil (give the agent's --config or --events; "
                                 "--no-verdict sends without checking)")
            cam_health = listener.camera(args.camera) if listener else None
            # Continue this camera's seq where the agent last saw it: a restarted gateway is not a gap.
            cam.seq = int(cam_health["last_seq"]) + 1 if cam_health else 0
            before = _rejected(listener, args.camera) if listener else {}
            progress = ProgressLine(f"camera-sim {coil}", args.frames if not args.folder else None)
            count = [0]
            sent = cam.send_coil(coil, _counting(frames, progress, listener, args.camera, before, count),
                                 rate_hz=args.rate, encoding=args.encoding, gt_dir=args.gt_dir, classes=classes)
            end_seq = cam.seq - 1
        finally:
            cam.close()
        result = {"coil": sent.coil, "camera": sent.camera, "sent": sent.sent, "defective": len(sent.defective),
                  "defects": sum(len(v) for v in sent.instances.values()), "not_sent": len(sent.dropped)}
        if listener is None:
            progress.close()
            print(json.dumps({**result, "verdict": "not_checked"}))
            return EXIT_NOT_INSPECTED if sent.dropped else EXIT_OK
        verdict, problem = _verdict(listener, args.camera, coil, end_seq, before, args.wait, progress, sent.sent)
        summary = listener.summaries.get(coil)
        if summary is not None and not args.folder:  # the gate's decisions against the painted frames
            from agent.tools.demo import gate_vs_truth

            gate = gate_vs_truth(summary, set(sent.defective), args.camera)
            if gate["decisions"] != "unknown":
                verdict["gate"] = {**gate, "defective": len(sent.defective),
                                   "clean": sent.sent - len(sent.defective)}
        progress.close()
        print(json.dumps({**result, **verdict}))
        if sent.dropped:
            problem = problem or f"{len(sent.dropped)} frame(s) could not be handed to ZeroMQ"
        if problem:
            print(f"coilsight camera-sim: {problem}", file=sys.stderr)
            return EXIT_NOT_INSPECTED
        return EXIT_OK
    finally:
        watch.close()
        if listener is not None:
            listener.stop()


def _no_agent(message: str) -> int:
    print(f"coilsight camera-sim: {message}", file=sys.stderr)
    return EXIT_NO_AGENT


def _refused(message: str) -> int:
    print(f"coilsight camera-sim: {message}", file=sys.stderr)
    return EXIT_REFUSED


def _verdict(listener: AgentListener, camera: str, coil: str, end_seq: int, before: dict[str, int],
             wait_s: float, progress: ProgressLine, n_sent: int) -> tuple[dict, str | None]:
    """Wait for the coil's final summary, or for proof that none will come (the agent took our last
    message, the coil is not open, and a heartbeat later still no summary)."""
    seen_end_at: list[int] = []

    def settled():
        if coil in listener.summaries:
            return "summary"
        h, cam = listener.health or {}, listener.camera(camera)
        if cam is not None and cam.get("last_seq", -1) >= end_seq and coil not in (h.get("coils_open") or []):
            if not seen_end_at:
                seen_end_at.append(listener.heartbeats)
            if listener.heartbeats >= seen_end_at[0] + 2:  # one more heartbeat: a summary would be out
                return "no_summary"
        progress.update(n_sent, sum(_delta(_rejected(listener, camera), before).values()))
        return None

    how = listener.wait_for(settled, wait_s)
    rejected = _delta(_rejected(listener, camera), before)
    n_rejected = sum(rejected.values())
    out = {"rejected": n_rejected, "rejected_by_reason": rejected}
    if how == "summary":
        s = listener.summaries[coil]
        f = s["frames"]
        out.update(verdict="inspected" if s["complete"] and not f["rejected"] else "incomplete",
                   complete=s["complete"], end_reason=s["end_reason"], received=f["received"],
                   inspected=f["inspected"], gated_out=f["gated_out"], missing=f["missing"],
                   defects=s["defect_count"])
        out["rejected"] = max(n_rejected, f["rejected"])
        out["rejected_by_reason"] = s.get("rejected_by_reason") or rejected
        if out["rejected"]:
            return out, (f"the agent rejected {out['rejected']} of {n_sent} frames "
                         f"({_reasons(out['rejected_by_reason'])}) of coil {coil}")
        if not s["complete"]:
            return out, (f"coil {coil} was summarised incomplete ({s['end_reason']}): {f['missing']} missing, "
                         f"{f['shed']} shed, {f['lost']} lost")
        return out, None
    if how == "no_summary":
        out["verdict"] = "rejected"
        hint = (f": coil {coil} was already summarised; send a new coil (leave --coil out for a fresh id)"
                if "stale_coil" in rejected else "")
        return out, (f"the agent rejected {n_rejected} of {n_sent} frames ({_reasons(rejected)}) and "
                     f"published no summary{hint}")
    out["verdict"] = "unknown"
    return out, (f"no summary for coil {coil} within {wait_s:g} s of its end"
                 + (f"; the agent rejected {n_rejected} message(s) ({_reasons(rejected)})" if n_rejected else ""))


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in by_reason.items()) or "no reason given"


def frames_from_args(args):
    """The frame source camera-sim's options ask for, and the class names of its ground truth."""
    from agent.tools.camera_sim import composed_frames, folder_frames, synthetic_frames
    from agent.tools.line_sim import LINE_PROFILES, line_classes, line_frames
    from training.synth import STEEL_CLASSES

    if args.folder:
        return folder_frames(args.folder), STEEL_CLASSES
    if args.profile in LINE_PROFILES:  # wafer, chip, parts: that line's generator, with its ground truth
        return line_frames(args.profile, args.frames, args.defect_fraction, seed=args.seed), line_classes(args.profile)
    if args.data_root:
        return composed_frames(args.frames, args.defect_fraction, profile=args.profile, data_root=Path(args.data_root),
                               split=args.split, seed=args.seed, with_instances=True), STEEL_CLASSES
    return synthetic_frames(args.frames, args.defect_fraction, seed=args.seed, with_instances=True), STEEL_CLASSES
