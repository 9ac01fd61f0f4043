"""Prometheus metrics for the agent, and a rate limiter for logging inside loops.

Everything lives in the registry owned by one `Metrics` object (never the process-global
one), so tests and a second agent in the same process do not share counters. `serve()`
exposes it over HTTP for Prometheus; `snapshot()` gives the same figures as a plain dict
for `coilsight status`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger(__name__)

NAMESPACE = "coilsight"
FRAME_STATES = ("inspected", "gated_out", "rejected", "shed", "missing", "lost")
STAGES = ("receive", "decode", "gate", "seg", "postprocess", "publish")
# From a fast decode (~100 us) to a slow CPU segmentation batch (seconds).
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The agent's metrics. Label values for `state` and `stage` are checked, since a typo
    there would silently start a new series nobody graphs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r, ns = self.registry, NAMESPACE
        self.frames = Counter("frames", "Frames by camera and what became of them",
                              ["camera", "state"], namespace=ns, registry=r)
        self.rejected = Counter("rejected", "Frames rejected at ingest, by reason",
                                ["reason"], namespace=ns, registry=r)
        self.stage_seconds = Histogram("stage_seconds", "Time per pipeline stage and batch",
                                       ["stage"], namespace=ns, registry=r, buckets=STAGE_BUCKETS)
        # one labelled child per stage, looked up once: observed several times per frame
        self._stage = {stage: self.stage_seconds.labels(stage=stage) for stage in STAGES}
        self.gate_pass_rate = Gauge("gate_pass_rate", "Share of frames the gate sent to segmentation",
                                    namespace=ns, registry=r)
        self.queue_depth = Gauge("queue_depth", "Items waiting in each hand-over queue",
                                 ["queue"], namespace=ns, registry=r)
        self.backend_info = Gauge("backend_info", "1 for the backend serving each model",
                                  ["model", "backend"], namespace=ns, registry=r)
        self.backend_fallbacks = Counter("backend_fallbacks", "Backends of the chain that did not load a model "
                                         "(the reason is in the log line backend_not_loaded)",
                                         ["model", "backend"], namespace=ns, registry=r)
        self.coil_deadline_slack = Gauge("coil_deadline_slack_seconds",
                                         "Seconds left before the open coil's summary deadline",
                                         namespace=ns, registry=r)
        self.journal_bytes = Gauge("journal_bytes", "Size of the event journal on disk",
                                   namespace=ns, registry=r)
        self.journal_writable = Gauge("journal_writable", "1 while the journal writes; 0 while the disk refuses "
                                      "and events are held in memory", namespace=ns, registry=r)
        self.journal_writable.set(1)
        self.journal_held_records = Gauge("journal_held_records", "Published events held in memory, not yet "
                                          "written to the journal", namespace=ns, registry=r)
        self.events_published = Counter("events_published", "Messages published, by topic",
                                        ["topic"], namespace=ns, registry=r)
        self.loop_errors = Counter("loop_errors", "Failures a thread's loop survived (agent/guard.py), by "
                                   "thread and exception kind", ["thread", "kind"], namespace=ns, registry=r)
        self.replies_dropped = Counter("replies_dropped", "Replies not sent because the peer was gone or "
                                       "not reading, by socket", ["socket"], namespace=ns, registry=r)
        self._backends: dict[str, str] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- recording -------------------------------------------------------------------
    def count_frames(self, camera: str, state: str, n: int = 1) -> None:
        if state not in FRAME_STATES:
            raise ValueError(f"frame state {state!r} is not one of {', '.join(FRAME_STATES)}")
        self.frames.labels(camera=camera, state=state).inc(n)

    def count_rejected(self, reason: str, n: int = 1) -> None:
        self.rejected.labels(reason=reason).inc(n)

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage.get(stage)
        if child is None:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        child.observe(seconds)

    @contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stage[stage].observe(time.perf_counter() - start)

    def set_gate_pass_rate(self, rate: float) -> None:
        self.gate_pass_rate.set(rate)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(queue=queue).set(depth)

    def set_backend(self, model: str, backend: str) -> None:
        """Record which backend serves `model`, clearing the one it replaced (engine reload)."""
        old = self._backends.get(model)
        if old is not None and old != backend:
            self.backend_info.remove(model, old)
        self._backends[model] = backend
        self.backend_info.labels(model=model, backend=backend).set(1)

    def count_backend_fallback(self, model: str, backend: str) -> None:
        """One backend of the chain was skipped for ``model`` (at start-up or an engine reload)."""
        self.backend_fallbacks.labels(model=model, backend=backend).inc()

    def set_deadline_slack(self, seconds: float) -> None:
        self.coil_deadline_slack.set(seconds)

    def set_journal_bytes(self, n: int) -> None:
        self.journal_bytes.set(n)

    def set_journal_alarm(self, alarm: dict | None) -> None:
        """agent.journal.Journal.alarm(): None while writable."""
        self.journal_writable.set(0 if alarm else 1)
        self.journal_held_records.set(alarm["held_records"] if alarm else 0)

    def count_published(self, topic: str, n: int = 1) -> None:
        self.events_published.labels(topic=topic).inc(n)

    def count_loop_error(self, thread: str, kind: str) -> None:
        self.loop_errors.labels(thread=thread, kind=kind).inc()

    def count_reply_dropped(self, socket: str, n: int = 1) -> None:
        self.replies_dropped.labels(socket=socket).inc(n)

    # --- reading ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The registry's current figures as a JSON-friendly dict (for `coilsight status`)."""
        return _snapshot(self.registry.collect())

    # --- HTTP --------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 9464) -> int:
        """Serve /metrics from a daemon thread; returns the bound port (port 0 = ephemeral)."""
        if self._server is not None:
            raise RuntimeError(f"metrics server already serving on port {self._server.server_port}")
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        bound = int(self._server.server_port)
        log.info("metrics_serving", host=host, port=bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None


def _snapshot(families: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {"frames": {}, "rejected": {}, "stages": {}, "queue_depth": {},
                            "backends": {}, "backend_fallbacks": {}, "events_published": {}, "loop_errors": {},
                            "replies_dropped": {}, "gate_pass_rate": None,
                            "coil_deadline_slack_seconds": None, "journal_bytes": None,
                            "journal_writable": None, "journal_held_records": None}
    prefix = NAMESPACE + "_"
    for family in families:
        for s in family.samples:
            sample, labels, value = s.name.removeprefix(prefix), s.labels, s.value
            if sample == "frames_total":
                snap["frames"].setdefault(labels["camera"], {})[labels["state"]] = value
            elif sample == "rejected_total":
                snap["rejected"][labels["reason"]] = value
            elif sample == "events_published_total":
                snap["events_published"][labels["topic"]] = value
            elif sample == "loop_errors_total":
                snap["loop_errors"].setdefault(labels["thread"], {})[labels["kind"]] = value
            elif sample == "replies_dropped_total":
                snap["replies_dropped"][labels["socket"]] = value
            elif sample in ("stage_seconds_count", "stage_seconds_sum"):
                key = "count" if sample.endswith("count") else "sum_s"
                snap["stages"].setdefault(labels["stage"], {})[key] = value
            elif sample == "queue_depth":
                snap["queue_depth"][labels["queue"]] = value
            elif sample == "backend_fallbacks_total":
                snap["backend_fallbacks"].setdefault(labels["model"], {})[labels["backend"]] = value
            elif sample == "backend_info" and value:
                snap["backends"][labels["model"]] = labels["backend"]
            elif sample in ("gate_pass_rate", "coil_deadline_slack_seconds", "journal_bytes", "journal_writable",
                            "journal_held_records"):
                snap[sample] = value
    for stage in snap["stages"].values():
        stage["mean_s"] = stage["sum_s"] / stage["count"] if stage.get("count") else None
    return snap


def scrape_snapshot(host: str, port: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """`Metrics.snapshot()` of a running agent, read from its /metrics endpoint
    (for `coilsight status` in another process)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"cannot read agent metrics from {url}: {reason}") from exc
    return _snapshot(text_string_to_metric_families(text))


class RateLimiter:
    """Token bucket: `burst` events at once, then `per_s` per second on average.

    `allow()` says whether to act (log) now; when it does, `suppressed` tells how many
    calls were refused since the last allowed one, so the log line can say so.
    """

    def __init__(self, per_s: float, burst: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        if per_s <= 0:
            raise ValueError(f"RateLimiter per_s={per_s} must be positive")
        if burst < 1:
            raise ValueError(f"RateLimiter burst={burst} must be at least 1")
        self.per_s, self.burst, self._clock = per_s, burst, clock
        self._tokens = float(burst)
        self._last = clock()
        self._refused = 0
        self.suppressed = 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_s)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self.suppressed, self._refused = self._refused, 0
                return True
            self._refused += 1
            return False


class RateLimitedLog:
    """A structlog logger whose events go out at a bounded rate, with `suppressed=N` added."""

    def __init__(self, logger: Any, per_s: float = 1.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._limiter = RateLimiter(per_s, burst, clock)

    def _emit(self, method: str, event: str, **kw: Any) -> bool:
        if not self._limiter.allow():
            return False
        if self._limiter.suppressed:
            kw["suppressed"] = self._limiter.suppressed
        getattr(self._log, method)(event, **kw)
        return True

    def info(self, event: str, **kw: Any) -> bool:
        return self._emit("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> bool:
        return self._emit("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> bool:
        return self._emit("error", event, **kw)
