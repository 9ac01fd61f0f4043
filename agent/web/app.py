"""The page's HTTP side: a Starlette application over the live feed, the journal and the inspector.

Routes (docs/deployment.md, "The web page"):
  GET  /                 the page (agent/web/static/index.html)
  GET  /static/{name}    app.js, style.css: a fixed set read at start, never a path on disk
  GET  /events           Server-Sent Events: a snapshot of the current coil, then each change
  GET  /api/live         the same snapshot as JSON
  GET  /api/coils        past coils (final summaries from the journal), newest first
  GET  /api/coils/{coil} one past coil's summary
  GET  /crops/{coil}/{id}.png  a defect crop the agent named in an event
  GET  /report/{coil}    the coil report (agent/tools/report.py, when installed)
  POST /api/inspect      body: one PNG or JPEG -> events and overlay (403 when web.upload is false)
  GET  /healthz /readyz /version
  GET|POST /login        the token form, when the page has a token
Every request passes agent/web/guard.py first: body limits, the loopback Host check, the token.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from agent.web.guard import COOKIE, Guard, error_response, same, session_value
from agent.web.history import CropStore, JournalHistory
from agent.web.live import Hub, LiveFeed, LiveState
from agent.web.settings import WebSettings
from agent.web.upload import Inspector, UploadRejected, decode_upload

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# the coil report is one self-contained page: embedded PNGs and an inline style sheet, no script
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
log = structlog.get_logger(__name__)


def _version() -> str:
    from agent.cli import _version as v

    return v()


class WebApp:
    """The state behind the routes: settings, live state, feed, journal history, inspector."""

    def __init__(self, settings: WebSettings, *, status: Callable[[], dict] | None = None,
                 crop: Callable[[str, int], bytes | None] | None = None,
                 socket_setup: Callable[[Any], None] | None = None, start_feed: bool = True,
                 inspector: Inspector | None = None):
        self.s = settings
        cfg = settings.cfg
        self.crops = CropStore(settings.crops_dir, fetch=crop)
        self.state = LiveState(cfg.coil.budget_s, self.crops)
        self.hub = Hub()
        self.history = JournalHistory(settings.journal_dir)
        self.status = status
        self.feed = LiveFeed(events_endpoint=cfg.publish.endpoint, replay_endpoint=cfg.publish.replay_endpoint,
                             state=self.state, hub=self.hub, status=status, socket_setup=socket_setup)
        self.start_feed = start_feed
        self.inspector = inspector
        self._inspector_lock = threading.Lock()
        self.classes = self._classes()
        self.reports = importlib.util.find_spec("agent.tools.report") is not None  # `coilsight report`
        self._report_lock = threading.Lock()
        self.static = {name: (STATIC / name).read_bytes() for name in (*STATIC_FILES, "index.html", "login.html")}

    def _classes(self) -> list[str]:
        """The pack's classes (legend, colours) and frame width (the strip's width on the map)."""
        self.frame_width_px = None
        try:
            from engines.modelpack import load_model_pack

            pack = load_model_pack(self.s.cfg.models_dir(), verify_hashes=False)
        except Exception:  # the page still shows events (their class names) without the pack
            return []
        self.frame_width_px = pack.width
        return list(pack.classes)

    def inspector_or_none(self) -> Inspector | None:
        """The pack, opened at the first upload (a read-only page never opens it)."""
        with self._inspector_lock:
            if self.inspector is None and self.s.upload:
                self.inspector = Inspector(self.s.cfg.models_dir(), self.s.cfg.models.calibration or None,
                                           max_events=self.s.cfg.coil.max_events_per_frame)
        return self.inspector

    # -- routes -------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.static["index.html"])

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return error_response(404, "no such file")
        return Response(self.static[name], media_type=STATIC_FILES[name])

    async def login(self, request: Request) -> Response:
        if self.s.token is None:
            return RedirectResponse("/", status_code=303)
        if request.method == "GET":
            return HTMLResponse(self.static["login.html"])
        body = await request.body()
        given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not same(given.strip(), self.s.token):
            await asyncio.sleep(0.5)  # slows guessing
            return error_response(401, "wrong token")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, session_value(self.s.token), httponly=True, samesite="strict", path="/")
        return resp

    def config_view(self) -> dict:
        cfg = self.s.cfg
        return {"agent": cfg.agent.name, "profile": cfg.agent.profile, "classes": self.classes,
                "budget_s": cfg.coil.budget_s, "upload": self.s.upload, "max_upload_bytes": self.s.max_upload_bytes,
                "reports": self.reports,
                "frame_width_px": self.frame_width_px,
                "cameras": [{"id": c.id, "offset_x_mm": c.offset_x_mm, "mm_per_px_x": c.mm_per_px_x}
                            for c in cfg.cameras]}

    async def live(self, request: Request) -> Response:
        return JSONResponse({**self.state.snapshot(), "config": self.config_view()})

    async def events(self, request: Request) -> Response:
        q = self.hub.add()
        first = json.dumps({**self.state.snapshot(), "config": self.config_view()}, default=str)

        async def stream():
            try:
                yield f"event: snapshot\ndata: {first}\n\n"
                # a page cut off for being slow gets what was queued for it, then the stream ends
                # and its EventSource reconnects to a fresh snapshot
                while not (self.hub.is_cut(q) and q.empty()):
                    try:
                        yield await asyncio.wait_for(q.get(), timeout=15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                self.hub.remove(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def coils(self, request: Request) -> Response:
        await self._refresh_history()
        from agent.web.live import page_summary

        return JSONResponse({"coils": [page_summary(s) for s in self.history.coils()],
                             "damaged_records": self.history.damaged})

    async def coil(self, request: Request) -> Response:
        await self._refresh_history()
        s = self.history.coil(request.path_params["coil"])
        if s is None:
            return error_response(404, "no final summary of that coil in the journal")
        from agent.web.live import page_summary

        worst = []
        for w in s.get("worst") or []:
            if isinstance(w, dict):
                item = {k: w.get(k) for k in ("class", "confidence", "across_mm", "along_mm", "width_mm",
                                              "length_mm", "index", "camera")}
                url = self.crops.note(s.get("coil"), w["crop"]) if "crop" in w else None
                if url:
                    item["crop_url"] = url
                worst.append(item)
        return JSONResponse({**page_summary(s), "worst": worst, "density_per_m": s.get("density_per_m")})

    async def _refresh_history(self) -> None:
        """Read what the journal gained since the last request (a stat per segment when nothing did)."""
        await run_in_threadpool(self.history.refresh)

    async def report(self, request: Request) -> Response:
        """The coil report of `coilsight report` (agent/tools/report.py), for a coil the journal holds."""
        if not self.reports:
            return error_response(404, "coil reports are not installed here (agent/tools/report.py)")
        await self._refresh_history()
        s = self.history.coil(request.path_params["coil"])
        if s is None:  # the name used below is the journal's, never the request's
            return error_response(404, "no final summary of that coil in the journal")
        try:
            page = await run_in_threadpool(self._render_report, s["coil"])
        except Exception as exc:  # matplotlib missing (report extra), a damaged journal: one line
            log.warning("web_report_failed", coil=s["coil"], error=str(exc))
            return error_response(503, f"the report of {s['coil']} could not be made: {exc}")
        return HTMLResponse(page, headers={"content-security-policy": REPORT_CSP})

    def _render_report(self, coil: str) -> str:
        import tempfile

        from agent.tools.report import make_report

        with self._report_lock, tempfile.TemporaryDirectory(prefix="coilsight-web-report-") as tmp:
            _, page = make_report(self.s.journal_dir, coil, Path(tmp) / "report", crops=self.s.crops_dir)
            return page.read_text(encoding="utf-8")

    async def crop(self, request: Request) -> Response:
        data = await run_in_threadpool(self.crops.read, request.path_params["coil"], request.path_params["crop"])
        if data is None:
            return error_response(404, "no such crop")
        # a crop never changes: the page redraws its table without asking again
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=86400, immutable"})

    async def inspect(self, request: Request) -> Response:
        if not self.s.upload:
            return error_response(403, "uploads are off on this page (web.upload = false)")
        body = await request.body()
        if not body:
            return error_response(400, "empty body: POST the image's bytes (PNG or JPEG)")
        try:
            image = await run_in_threadpool(decode_upload, body, self.s.max_upload_pixels)
        except UploadRejected as exc:
            return error_response(exc.status, str(exc))
        try:
            insp = await run_in_threadpool(self.inspector_or_none)
        except Exception as exc:  # the pack does not load: say so, the rest of the page works
            log.error("web_pack_not_loaded", error=str(exc))
            return error_response(503, f"the model pack could not be opened: {exc}")
        if not insp.lock.acquire(blocking=False):
            return error_response(503, "another image is being inspected; try again in a moment")
        name = request.headers.get("x-file-name", "upload")[:128]
        try:
            result = await run_in_threadpool(insp.inspect, image, name)
        except ValueError as exc:  # RunnerError: this image breaks the pack's contract (size, channels)
            return error_response(422, f"the pack cannot inspect this image: {exc}")
        finally:
            insp.lock.release()
        return JSONResponse({"ok": True, "name": name, "shape": list(result.shape), "gate_score": result.gate_score,
                             "passed": result.passed, "events": result.events, "profile": insp.pack.profile,
                             "overlay_png": base64.b64encode(result.overlay_png).decode("ascii")})

    async def healthz(self, request: Request) -> Response:
        snap = self.state.snapshot()
        return JSONResponse({"ok": True, "page_clients": self.hub.clients,
                             "heartbeat_age_s": snap["heartbeat_age_s"], "feed_errors": self.feed.errors})

    async def readyz(self, request: Request) -> Response:
        if self.status is None:
            return error_response(503, "no way to ask the agent: its control socket needs web.operator_key (CURVE)")
        try:
            reply = await run_in_threadpool(self.status)
        except Exception as exc:
            return error_response(503, f"agent not reachable at {self.s.cfg.control.endpoint}: {exc}")
        h = reply.get("health") or {}
        checks = {"agent_reachable": bool(reply.get("ok")), "models_loaded": bool(h.get("models")),
                  "ingest_bound": h.get("state") == "ready"}
        ok = all(checks.values())
        return JSONResponse({"ok": ok, "checks": checks, "state": h.get("state"), "profile": h.get("profile")},
                            status_code=200 if ok else 503)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"coilsight": _version(), "protocol": 1, "agent": self.s.cfg.agent.name,
                             "profile": self.s.cfg.agent.profile})

    # -- lifecycle ----------------------------------------------------------------------------
    async def startup(self) -> None:
        self.hub.attach(asyncio.get_running_loop())
        if self.start_feed:
            self.feed.start()

    async def shutdown(self) -> None:
        self.feed.stop()
        if self.inspector is not None:
            self.inspector.close()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index), Route("/static/{name}", self.static_file),
            Route("/login", self.login, methods=["GET", "POST"]), Route("/events", self.events),
            Route("/api/live", self.live), Route("/api/coils", self.coils), Route("/api/coils/{coil}", self.coil),
            Route("/crops/{coil}/{crop}.png", self.crop), Route("/report/{coil}", self.report), Route("/api/inspect", self.inspect, methods=["POST"]),
            Route("/healthz", self.healthz), Route("/readyz", self.readyz), Route("/version", self.version),
        ]


def create_app(settings: WebSettings, **kwargs: Any) -> tuple[Any, WebApp]:
    """The ASGI app (Guard around Starlette) and the WebApp behind it."""
    web = WebApp(settings, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await web.startup()
        try:
            yield
        finally:
            await web.shutdown()

    app = Starlette(routes=web.routes(), lifespan=lifespan)
    return Guard(app, settings), web
