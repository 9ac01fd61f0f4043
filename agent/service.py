"""The agent: wires the threads together and runs the main loop.

Signals only set flags; the main loop (every ``agent.tick_s``) acts: coil deadlines and idle
timeouts, watchdog pings while inference makes progress, STATUS lines, control requests,
SIGHUP reloads, and a phased, bounded shutdown on SIGTERM/SIGINT.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog
import zmq

from agent import recovery, statefiles
from agent.batcher import FrameQueue
from agent.binding import BindError, bind, wait_bound
from agent.camera_stats import CameraStats
from agent.coil import CoilRegistry
from agent.config import Config
from agent.guard import LoopGuard, recv_request, router_socket, send_reply
from agent.ingest import Ingest, frame_multiple
from agent.journal import Journal
from agent.metrics import Metrics
from agent.inference import Inference, Models, open_models
from agent.protocol import str_keys
from agent.publish import Publisher
from agent.sdnotify import Notifier, Watchdog
from agent.threadnames import name_this_thread

log = structlog.get_logger(__name__)


class StartupError(RuntimeError):
    """The agent cannot start; the message is the one line systemd shows."""


class Agent:
    def __init__(self, cfg: Config, *, notifier: Notifier | None = None, install_signals: bool = True):
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.watchdog = Watchdog(self.notifier)
        self.install_signals = install_signals
        self.metrics = Metrics()
        self.ctx = zmq.Context()
        self.state = "starting"
        self.started_mono = time.monotonic()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.models: Models | None = None
        self.intel = None  # agent.intel.CoilIntel: tracks, periodic series, grade; None = off
        self.crops = None  # agent.crops.CropStore, its thread
        self.journal: Journal | None = None
        self.publisher: Publisher | None = None
        self.ingest: Ingest | None = None
        self.inference: Inference | None = None
        self.control: zmq.Socket | None = None
        self.control_endpoint: str | None = None
        self._control_watch = None  # agent.auth.HandshakeWatch on a CURVE control socket
        self.metrics_port: int | None = None
        self.summaries_published = 0
        self.camera_stats = CameraStats()
        self.recent_summaries: list[dict] = []  # the last few final summaries, for `coilsight status`
        self.reloads = 0
        self.authenticator = None
        self._watermark: int | None = None  # last seq written to published.seq
        self.ready = threading.Event()
        self.exit_code = 0
        # last resort around each control request: no local client can end the main loop
        self.control_guard = LoopGuard("control", max_consecutive=1000, on_error=self.metrics.count_loop_error)
        self.control_dropped = 0
        self.state_lock: statefiles.StateLock | None = None
        self.state_report = statefiles.StateReport()  # state files moved aside at start-up
        self._journal_alarm: dict | None = None  # Journal.alarm(): the disk refuses writes

    # -- start-up: fails loudly ---------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        # First, before any model loads: a second agent on this state directory is refused at once.
        self.state_lock = statefiles.StateLock(cfg.state_path()).acquire()
        self.notifier.status("loading models")
        self.models = open_models(cfg)
        pack = self.models.pack
        for f in self.models.fallbacks:  # each already logged once, with its reason, as backend_not_loaded
            self.metrics.count_backend_fallback(f["model"], f["backend"])
        log.info("models_loaded", profile=pack.profile, models=self.models.describe())
        for role, d in self.models.describe().items():
            self.metrics.set_backend(role, d["backend"])
        self.notifier.status("warming up")
        self.models.warm_up(min(cfg.models.opt_batch, self.models.batch))  # no larger than it will run
        state = cfg.state_path()
        state.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(state / "journal" / cfg.agent.name, fsync=cfg.publish.fsync,
                               keep_segments=cfg.journal.keep_segments)
        if self.journal.damage:
            log.error("journal_damage_reported", damage=[d.as_dict() for d in self.journal.damage[:10]])
        self.coils = CoilRegistry.for_config(cfg, pack.classes)
        self.frames = FrameQueue(cfg.ingest.max_queue_frames)
        self.intel, self.crops = self._coil_layer(pack, state)
        socket_setup = self._setup_auth()
        self.publisher = Publisher(
            self.ctx, endpoint=cfg.publish.endpoint, replay_endpoint=cfg.publish.replay_endpoint,
            journal=self.journal, agent=cfg.agent.name, heartbeat_s=cfg.publish.heartbeat_s,
            sndhwm=cfg.publish.sndhwm, linger_ms=cfg.publish.linger_ms, max_replay=cfg.publish.max_replay,
            health=self.health, on_published=self._on_published, socket_setup=socket_setup,
            on_loop_error=self.metrics.count_loop_error, on_reply_dropped=self.metrics.count_reply_dropped,
            layer=self.intel)
        watermark = statefiles.read_watermark(self._watermark_path(), self.journal.last_seq, self.state_report)
        # A journal cut at a record boundary looks clean; the watermark proves those seqs were used.
        self.journal.reserve_through(watermark, "published.seq")
        if watermark < self.journal.last_seq:
            n = self.publisher.republish_from(watermark + 1)
            log.info("journal_tail_to_republish", first=watermark + 1, last=self.journal.last_seq, count=n)
        self.publisher.start()
        wait_bound(self.publisher, self.publisher.bound, "publish sockets")
        self.inference = Inference(cfg=cfg, frames=self.frames, coils=self.coils, models=self.models,
                                   submit=self.publisher.submit, on_stage=self.metrics.observe_stage,
                                   on_alive=self.watchdog.mark_alive, on_reject=self._on_reject,
                                   on_loop_error=self.metrics.count_loop_error,
                                   on_frames=self.publisher.note_frames if self.intel else None, crops=self.crops)
        self.inference.start()
        # Crash recovery (agent/recovery.py): open coils continue, in-flight frames are lost, and
        # what never reached the journal is sent again. Before ingest, so no frame beats it.
        self.recovery = recovery.Recovery(self.journal.dir / recovery.CHECKPOINT_NAME)
        for topic, body in self.recovery.restore(self.coils, self.journal, self.state_report):
            if topic == "summary":
                self._emit_summary(body)
            else:
                self.publisher.submit(topic, body)
        self.ingest = Ingest(self.ctx, endpoint=cfg.ingest.endpoint, rcvhwm=cfg.ingest.rcvhwm, frames=self.frames,
                             coils=self.coils, channels=pack.channels, max_width=cfg.ingest.max_width,
                             max_height=cfg.ingest.max_height, allowed_encodings=cfg.ingest.allowed_encodings,
                             emit_summary=self._emit_summary, on_reject=self._on_reject, socket_setup=socket_setup,
                             on_frame=self.metrics.observe_stage,
                             backpressure=cfg.ingest.overload == "backpressure", shape_multiple=frame_multiple(pack),
                             on_loop_error=self.metrics.count_loop_error)
        self.ingest.start()
        wait_bound(self.ingest, self.ingest.bound, f"ingest socket {cfg.ingest.endpoint}")
        self.control = router_socket(self.ctx, max_msg_bytes=4096)  # REQ clients see a REP (agent/guard.py)
        self._control_watch = self._bind_control(socket_setup)
        self.control_endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        if cfg.control.metrics_port:
            try:
                self.metrics_port = self.metrics.serve("127.0.0.1", cfg.control.metrics_port)
            except OSError as exc:
                raise BindError(str(exc)) from None
        if self.install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_signal)
        self.state = "ready"
        self.ready.set()
        self.notifier.ready(f"ready: {pack.profile}, backend {self.models.describe()['gate']['backend']}")
        log.info("agent_ready", ingest=self.ingest.bound_endpoint, publish=self.publisher.pub_endpoint_bound,
                 replay=self.publisher.replay_endpoint_bound, control=self.control_endpoint,
                 metrics_port=self.metrics_port, journal_last_seq=self.journal.last_seq)

    def _coil_layer(self, pack, state: Path):
        """Tracks, periodic series, grade (agent/intel.py) and crops (agent/crops.py), where the pack
        finds defects in the strip (a segmentation model) and coil.stitch.enabled; else (None, None)."""
        c = self.cfg.coil
        if not c.stitch.enabled or "seg" not in pack.models:
            log.info("coil_layer_off", reason="coil.stitch.enabled is false" if not c.stitch.enabled
                     else "the pack has no segmentation model (no defect geometry to stitch)")
            return None, None
        from agent.intel import CoilIntel

        crops = None
        if c.crops.enabled:
            from agent.crops import CropStore

            crops = CropStore(state / "crops", size_px=c.crops.size_px, margin_px=c.crops.margin_px,
                              max_coils=c.crops.max_coils, max_bytes=c.crops.max_bytes, queue_size=c.crops.queue)
            crops.start()
        return CoilIntel(self.cfg, pack.classes, crops), crops

    def _setup_auth(self):
        """CURVE on every socket that faces the plant network: keys from files, allow-list via ZAP."""
        if not self.cfg.auth.enabled:
            return None
        from agent import auth

        secret = auth.credentials_dir(self.cfg.auth.credentials_dir or None) / self.cfg.auth.server_key
        probe = self.ctx.socket(zmq.PUB)
        try:
            auth.make_curve_server(probe, secret)  # fail here, at start-up, on a missing or bad key
        finally:
            probe.close(linger=0)
        from agent.config import config_warnings

        for warning in config_warnings(self.cfg):
            log.warning("config_deprecated", warning=warning)
        self.authenticator = auth.start_authenticator(self.ctx, self.cfg.auth.allow_lists())
        log.info("curve_enabled", allow_lists=self.cfg.auth.allow_lists())
        def setup(sock: zmq.Socket, name: str) -> auth.HandshakeWatch:
            auth.make_curve_server(sock, secret, auth.SOCKET_ROLES[name])  # only that role's keys get in
            return auth.HandshakeWatch(sock, name)  # plain-text peers and wrong server keys, logged at a bounded rate

        return setup

    def _bind_control(self, socket_setup):
        """Control on ipc:// is guarded by its file mode; on tcp:// with auth on, by CURVE and the
        operator keys (config validation refuses non-loopback tcp:// without auth)."""
        ep = self.cfg.control.endpoint
        if ep.startswith("ipc://"):
            from agent.auth import bind_private_ipc

            bind_private_ipc(self.control, ep, int(self.cfg.control.socket_mode, 8))
            return None
        watch = socket_setup(self.control, "control") if socket_setup and ep.startswith("tcp://") else None
        try:
            bind(self.control, ep, "control")  # BindError names the socket and the endpoint
        except BaseException:
            if watch is not None:
                watch.close()  # its monitor socket would keep ctx.term() waiting
            raise
        return watch

    def reload_keys(self) -> dict[str, list[str]]:
        """SIGHUP: re-read the CURVE allow-lists; peers whose key was removed are cut off at once."""
        if self.authenticator is None:
            return {}
        return self.authenticator.reload_and_revoke({
            "ingest": self.ingest.bound_endpoint, "publish": self.publisher.pub_endpoint_bound,
            "replay": self.publisher.replay_endpoint_bound, "control": self.control_endpoint})

    # -- main loop ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Start, loop until asked to stop, shut down. Returns the process exit code."""
        name_this_thread("coilsight")  # the main loop; `ps` and `top` show the process by this name
        try:
            self.start()
        except BaseException:
            # A failed start (a port in use) must exit, not hang: ctx.term() waits forever for the
            # sockets of threads already started and for one a failed bind left open.
            for t in (self.ingest, self.inference, self.publisher):
                if t is not None:
                    t.stop(2.0)
            self.ctx.destroy(linger=0)
            self._close_partial()
            raise
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        tick_ms = int(self.cfg.agent.tick_s * 1000)
        last_status = 0.0
        try:
            while not self._stop.is_set():
                if dict(poller.poll(tick_ms)).get(self.control):
                    try:
                        self._serve_control()
                        self.control_guard.ok()
                    except Exception as exc:  # last resort: counted, logged (bounded), the loop goes on
                        self.control_guard.failed(exc, socket="control")
                self._tick()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload_keys()
                    self.reload_models()
                now = time.monotonic()
                if now - last_status >= 5.0:
                    last_status = now
                    self.notifier.status(self._status_line())
                    self.metrics.set_journal_bytes(self.journal.size_bytes())
        except Exception as exc:  # the agent started: this is a failure while running, not at start-up
            log.exception("agent_failed", error=str(exc), kind=type(exc).__name__)
            self.exit_code = 1
        finally:
            self.shutdown()
        return self.exit_code

    def _tick(self) -> None:
        for t in (self.ingest, self.inference, self.publisher):
            # A thread that ended anyway (its last-resort handler gave up) leaves the agent headless:
            # exit non-zero now, so that systemd restarts it. Every thread of these runs until stop().
            if t.error is not None or not t.is_alive():
                self.exit_code = 1
                log.error("thread_failed", thread=t.name, error=repr(t.error))
                self._stop.set()
                return
        for s in self.coils.poll():
            self._emit_summary(s)
        if self._control_watch is not None:
            self._control_watch.drain()
        self.watchdog.maybe_ping()
        inferred = self.inference.inspected + self.inference.gated_out
        if inferred:
            self.metrics.set_gate_pass_rate(self.inference.inspected / inferred)
        self.metrics.set_queue_depth("frames", len(self.frames))
        self.metrics.set_queue_depth("publish", self.publisher.queue_depth())
        self._write_watermark()
        self.recovery.save(self.coils, self.journal.last_seq, owed_since_ns=self.publisher.oldest_unjournaled_ns())
        alarm = self.journal.alarm()  # the disk refuses the journal: events held in memory
        changed = (alarm is None) != (self._journal_alarm is None)
        self._journal_alarm = alarm
        self.metrics.set_journal_alarm(alarm)
        if changed:
            self.notifier.status(self._status_line())  # at once, not at the next 5 s STATUS

    def _status_line(self) -> str:
        a = self._journal_alarm
        alarm = (f"ALARM journal not writable: {a['path']}: {a['error']}; {a['held_records']} event(s) held in memory; "
                 if a else "")
        return (f"{alarm}{self.state}: {self.inference.inspected + self.inference.gated_out} frames inferred, "
                f"{len(self.frames)} queued, {len(self.coils.open_coils())} coil(s) open, "
                f"last seq {self.journal.last_seq}")

    # -- events ---------------------------------------------------------------------------------
    def _emit_summary(self, summary: dict) -> None:
        self.publisher.submit("summary", self.inference.decorate_summary(summary) if self.inference else summary)

    def _on_published(self, topic: str, body: dict) -> None:
        self.metrics.count_published(topic)
        if topic == "summary":
            self.summaries_published += 1
            f = body["frames"]
            if body.get("final"):
                self.recent_summaries = [*self.recent_summaries[-4:], body]
                for cam, c in body.get("cameras", {}).items():
                    for state in ("inspected", "gated_out", "rejected", "shed", "missing", "lost"):
                        if c.get(state):
                            self.metrics.count_frames(cam, state, c[state])
            self.metrics.set_deadline_slack(body["timing"]["slack_s"])
            log.info("coil_summary_published", coil=body["coil"], final=body["final"], complete=body["complete"],
                     end_reason=body["end_reason"], received=f["received"], inspected=f["inspected"],
                     gated_out=f["gated_out"], missing=f["missing"], defects=body["defect_count"],
                     wall_s=body["timing"]["wall_s"])

    def _on_reject(self, reason: str, camera: str | None) -> None:
        self.metrics.count_rejected(reason)
        self.camera_stats.count_reject(camera, reason)

    def health(self) -> dict:
        inf = self.inference
        return {
            "state": self.state,
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "profile": self.models.pack.profile if self.models else None,
            "backend": {r: d["backend"] for r, d in self.models.describe().items()} if self.models else {},
            "models": self.models.pack.versions() if self.models else {},
            "queue_depth": len(self.frames) if hasattr(self, "frames") else 0,
            "inferred": (inf.inspected + inf.gated_out) if inf else 0,
            "rejected": self._rejected_counts(),
            "coils_open": self.coils.open_coils() if hasattr(self, "coils") else [],
            "journal_damage": len(self.journal.damage) if self.journal else 0,
            "journal_unwritable": self._journal_alarm,
            "reloads": self.reloads,
            "loop_errors": self._loop_errors(),
            "state_files_moved_aside": list(self.state_report.moved_aside),
            "cameras": self.camera_stats.snapshot(*self.ingest.camera_seqs())
            if self.ingest else {},
        }

    def _rejected_counts(self) -> dict:
        out = dict(self.ingest.rejected) if self.ingest else {}
        if self.inference is not None:
            for reason, n in dict(self.inference.rejected).items():
                out[reason] = out.get(reason, 0) + n
        return out

    def _loop_errors(self) -> dict:
        """Failures each thread's loop survived (agent/guard.py), by thread."""
        guards = [self.control_guard]
        if self.ingest is not None:
            guards += [self.ingest.message_guard, self.ingest.socket_guard]
        if self.inference is not None:
            guards.append(self.inference.guard)
        if self.publisher is not None:
            guards.append(self.publisher.guard)
        return {g.thread: g.total() for g in guards if g.total()}

    # -- control socket ---------------------------------------------------------------------------
    def _serve_control(self) -> None:
        try:
            envelope, raw, error = recv_request(self.control)
        except zmq.Again:
            return
        cmd = None
        if raw is not None:
            try:
                req = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=64, max_bin_len=0,
                                      max_array_len=0, max_map_len=4, max_ext_len=0, object_pairs_hook=str_keys)
                cmd = req.get("cmd") if isinstance(req, dict) else None
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                cmd = None
        if cmd == "status":
            reply = {"ok": True, "health": self.health(), "metrics": self.metrics.snapshot(),
                     "coils": self.coils.snapshot(), "late_frames": self.coils.late_frames(),
                     "last_seq": self.journal.last_seq, "recent_summaries": list(self.recent_summaries),
                     "journal_bytes": self.journal.size_bytes(),
                     "coil_layer": ({**self.intel.stats(), "errors": self.publisher.layer_errors,
                                     **({"crops": self.crops.stats()} if self.crops else {})} if self.intel else None)}
        elif cmd == "reload":
            ok, detail = self.reload_models()
            reply = {"ok": ok, "detail": detail}
        elif cmd == "crop":
            reply = self._crop_reply(req)
        else:
            reply = {"ok": False, "error": error or "expected {cmd: status | reload | crop}"}
        if not send_reply(self.control, envelope, [msgpack.packb(reply, default=str)]):
            self.control_dropped += 1
            self.metrics.count_reply_dropped("control")

    def _crop_reply(self, req: dict) -> dict:
        """{cmd: crop, coil, track_id} -> the track's PNG (agent/crops.py), or why not."""
        if self.crops is None:
            return {"ok": False, "error": "crops are off on this agent (coil.crops.enabled, coil.stitch.enabled, "
                                          "or a pack without a segmentation model)"}
        from agent.crops import CropError

        try:
            png = self.crops.read(req.get("coil"), req.get("track_id"))
        except CropError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "coil": req["coil"], "track_id": req["track_id"], "png": png}

    def reload_models(self) -> tuple[bool, str]:
        """Hot swap: load the new models beside the old ones; switch between batches. A failed
        load keeps the old models running."""
        self.notifier.reloading()
        try:
            new = open_models(self.cfg)
            new.warm_up(1)
        except Exception as exc:  # any load failure keeps the old models serving
            log.error("models_reload_failed", error=str(exc))
            self.notifier.ready(self._status_line())
            return False, f"reload failed, old models kept: {exc}"
        for f in new.fallbacks:
            self.metrics.count_backend_fallback(f["model"], f["backend"])
        self.inference.request_swap(new)
        self.models = new
        self.reloads += 1
        log.info("models_reload_requested", models=new.describe())
        self.notifier.ready(self._status_line())
        return True, f"new models {new.pack.versions()} take over at the next batch"

    # -- watermark: what was surely handed to the PUB socket ------------------------------------
    def _watermark_path(self) -> Path:
        return self.journal.dir / "published.seq"

    def _write_watermark(self) -> None:
        seq = self.publisher.last_published_seq
        if seq == self._watermark:
            return
        if statefiles.write_watermark(self._watermark_path(), seq):
            self._watermark = seq

    # -- shutdown: phased and bounded ---------------------------------------------------------------
    def shutdown(self) -> None:
        if self.state == "stopped":
            return
        self.state = "draining"
        self.notifier.stopping("draining in-flight frames")
        log.info("agent_stopping", queued=len(self.frames))
        self.ingest.accepting.clear()  # 1. take no new frames
        self.ingest.stop(2.0)
        self.inference.stop(10.0)  # 2. drain queued frames through the models
        for s in self.coils.poll():
            self._emit_summary(s)
        for s in self.coils.close_all("shutdown"):  # 3. partial summaries for what is owed
            self._emit_summary(s)
        self.publisher.stop(5.0)  # 4. publish and journal everything queued
        if self.crops is not None:
            self.crops.stop(5.0)  # crops of the tracks just closed
        self._write_watermark()
        if self.publisher.error is None and not self.publisher.is_alive():
            self.recovery.clear(self.coils, self.journal.last_seq)  # nothing owed; seq floor and closed coils stay
        self._close_partial()
        self.state = "stopped"
        log.info("agent_stopped", last_seq=self.journal.last_seq if self.journal else None)

    def _close_partial(self) -> None:
        if self._control_watch is not None:
            self._control_watch.close()
        # Threads that started before a start-up failure own sockets: stop them, or the context
        # below could never terminate (a port in use would leave the agent waiting forever).
        for t in (self.ingest, self.inference, self.publisher):
            if t is not None and t.is_alive():
                t.stop(2.0)
        if self.crops is not None and self.crops.is_alive():
            self.crops.stop(2.0)
        if self.control is not None:
            self.control.close(linger=0)
        if self.journal is not None:
            self.journal.close()
        if self.models is not None:
            self.models.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.metrics.close()
        alive = [t.name for t in (self.ingest, self.publisher) if t is not None and t.is_alive()]
        if alive:  # their sockets are in use: terminating the context would wait for them forever
            log.error("context_not_terminated", threads=alive)
        else:
            self.ctx.destroy(linger=0)  # sockets a failed thread left open; closed ones keep their linger
        self.notifier.close()
        if self.state_lock is not None:
            self.state_lock.release()


def status_request(endpoint: str, cmd: str = "status", timeout_ms: int = 3000,
                   curve: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None) -> dict:
    """Ask a running agent over its control socket (`coilsight status`). curve: (operator
    secret key file, server public key file) for a CURVE control socket."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    if curve is not None:
        from agent.auth import make_curve_client

        try:
            make_curve_client(s, *curve)
        except BaseException:
            s.close()
            raise
    s.connect(endpoint)
    try:
        s.send(msgpack.packb({"cmd": cmd}))
        return msgpack.unpackb(s.recv(), raw=False)
    except zmq.Again:
        raise TimeoutError(f"no answer from {endpoint} within {timeout_ms} ms") from None
    finally:
        s.close()
