"""`coilsight web`: the operator page, in its own process beside the agent.

The agent never imports this package: no HTTP code runs in the inference process, and the agent's
unit keeps its hardening. The page is a client of the agent like any other: it subscribes to the
event stream (gap repair through the replay socket, agent/subscriber.py), asks the control socket
for readiness, and reads the journal and the defect crops read-only.

Modules: ``settings`` (what the page serves and how it is guarded), ``live`` (event stream ->
the current coil and the Server-Sent Events fan-out), ``history`` (past coils from the journal
files, crops by validated id), ``upload`` (content checks and the inspect adapter), ``app``
(the Starlette application), ``commands`` (the `coilsight web` sub-command).

Starlette and uvicorn come with the ``web`` extra: ``pip install 'coilsight[web]'``.
"""
from __future__ import annotations

WEB_EXTRA_HINT = "coilsight web needs Starlette and uvicorn: install the web extra (pip install 'coilsight[web]')"


class WebExtraMissing(RuntimeError):
    """Starlette, uvicorn or python-multipart is not installed."""


def require_web_extra() -> None:
    """Raise WebExtraMissing with one clear line when the web extra is not installed."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a broken or blocked install counts as absent
            return True

    missing = [m for m in ("starlette", "uvicorn", "multipart") if absent(m)]
    if missing:
        raise WebExtraMissing(f"{WEB_EXTRA_HINT}; missing: {', '.join(missing)}")
