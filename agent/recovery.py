"""Crash recovery: a coil checkpoint beside the journal, and the restore at start.

What a SIGKILL (or a power cut) takes away is the agent's memory: which coils are open, which
frame of each is in which state, and what sits in the publisher's queue. The journal keeps what
was published; this module keeps the rest, so that a restart neither loses events nor gets the
accounting wrong.

The rule a restart follows (``agent_restart`` is one of the end reasons of docs/protocol.md 2.2):

* A coil that was open **stays open** and continues: frames the cameras send after the restart
  belong to the same coil and are inspected as usual; one summary closes it at the end.
* Frames that were received but not yet through the models at the kill are ``lost`` (the agent
  cannot vouch for them), unless the journal holds their defect events (then they were
  inspected). Frames received after the last checkpoint and not in the journal show as
  ``missing`` or ``lost``: never as inspected. So the coil is never ``complete``.
* A coil that no camera continues after the restart closes at the idle timeout with
  ``end_reason: "agent_restart"``; a coil every camera had already ended closes at once.
* Defect events and final summaries that were produced but had not reached the journal are
  sent again (with new sequence numbers); the ones the journal holds are not. The checkpoint
  keeps what was produced in the last ``recent_s`` seconds and, when the journal lags further
  (a stalled disk), everything since the publisher's oldest message not yet journaled.
* The checkpoint's journal sequence number is a floor: a journal cut at a record boundary
  cannot make the agent reuse a sequence number (reported as ``missing_records`` damage).

Hook (agent/service.py), three calls::

    from agent import recovery
    # start(), after the publisher and the inference thread started, before ingest starts:
    self.recovery = recovery.Recovery(self.journal.dir / recovery.CHECKPOINT_NAME)
    for topic, body in self.recovery.restore(self.coils, self.journal):
        self._emit_summary(body) if topic == "summary" else self.publisher.submit(topic, body)
    # _tick():
    self.recovery.save(self.coils, self.journal.last_seq,
                       owed_since_ns=self.publisher.oldest_unjournaled_ns())
    # shutdown(), after self.publisher.stop(): everything owed is journaled
    self.recovery.clear(self.coils, self.journal.last_seq)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import msgpack
import structlog

from agent.coil import CoilRegistry
from agent.journal import Journal
from engines.atomic import write_json_atomic

log = structlog.get_logger(__name__)

CHECKPOINT_NAME = "coils.checkpoint.json"
FORMAT = 1


class Recovery:
    """Writes the coil checkpoint (atomically, at most every ``interval_s``) and restores it."""

    def __init__(self, path: str | Path, *, interval_s: float = 0.25, recent_s: float = 10.0,
                 clock=time.monotonic):
        self.path = Path(path)
        self.interval_s = interval_s
        self.recent_s = recent_s
        self.clock = clock
        self._last_save = float("-inf")
        self.saves = 0
        self.last_save_s = 0.0  # how long the last save took

    # -- while running -------------------------------------------------------------------------
    def save(self, registry: CoilRegistry, last_seq: int, *, owed_since_ns: int | None = None,
             force: bool = False) -> bool:
        """Checkpoint the registry; ``last_seq`` is the journal's last sequence number now;
        ``owed_since_ns`` the submit time of the publisher's oldest message not yet journaled
        (Publisher.oldest_unjournaled_ns): the checkpoint keeps what was produced since then, however
        long ago, and at least the last ``recent_s`` seconds."""
        now = self.clock()
        # At most every interval_s, and never more than ~5 % of the time: a long coil (hundreds of
        # thousands of frames) makes a save cost tens of ms, under the registry's lock.
        if not force and now - self._last_save < max(self.interval_s, 20.0 * self.last_save_s):
            return False
        self._last_save = now
        t0 = time.perf_counter()
        state = registry.export_state(recent_s=self.recent_s, owed_since_ns=owed_since_ns)
        doc = {"format": FORMAT, "wall_ns": time.time_ns(), "last_seq": int(last_seq), **state}
        write_json_atomic(self.path, doc, indent=None)  # a reader sees the old or the new checkpoint
        self.saves += 1
        self.last_save_s = time.perf_counter() - t0
        return True

    def clear(self, registry: CoilRegistry, last_seq: int) -> None:
        """After a clean shutdown: nothing is owed and no coil to restore (the partial summaries
        are journaled). Two things stay on record: the journal's last seq, so a journal cut at a
        record boundary cannot make seqs be reused, and the closed coils, so a camera that goes on
        with a coil summarised at shutdown gets ``stale_coil``, not a second summary."""
        closed = registry.export_state(recent_s=0.0)["closed"]
        doc = {"format": FORMAT, "wall_ns": time.time_ns(), "last_seq": int(last_seq), "coils": {},
               "current": {}, "closed": closed, "recent": []}
        write_json_atomic(self.path, doc, indent=None)

    # -- at start ------------------------------------------------------------------------------
    def load(self) -> dict | None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("checkpoint_unreadable", path=str(self.path), error=str(exc)[:200])
            return None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            log.error("checkpoint_unknown_format", path=str(self.path), format=str(doc.get("format"))[:20]
                      if isinstance(doc, dict) else None)
            return None
        return doc

    def restore(self, registry: CoilRegistry, journal: Journal) -> list[tuple[str, dict]]:
        """Rebuild the open coils; returns (topic, body) to send: defect events and summaries owed."""
        doc = self.load()
        if doc is None:
            return []
        journal.reserve_through(int(doc.get("last_seq", 0)), self.path.name)
        coils = registry.import_state(doc)
        recent = doc.get("recent", [])
        horizon = min([doc["wall_ns"], *(w for w, _, _ in recent)]) - 2_000_000_000
        journaled_defects, journaled_closed = _journal_tail(journal, horizon)
        closed_after = [c for c in journaled_closed if registry.recover_closed(c)]
        by_frame: dict[tuple[str, str, int], list[dict]] = {}
        for ev in journaled_defects.values():
            by_frame.setdefault((ev["coil"], ev["camera"], ev["index"]), []).append(ev)
        recovered = sum(registry.recover_frame(coil, cam, i, evs) for (coil, cam, i), evs in by_frame.items())
        owed: list[tuple[str, dict]] = []
        for _, topic, body in recent:
            if topic == "defect" and _defect_key(body) not in journaled_defects:
                owed.append((topic, body))
            elif topic == "summary" and body.get("final") and body["coil"] not in journaled_closed:
                owed.append((topic, body))
        settled = registry.close_settled()
        owed += [("summary", s) for s in settled]
        # A warning only when something was restored or owed; a clean restart is one info line.
        level = log.warning if coils or closed_after or recovered or owed else log.info
        level("coils_restored", coils=coils, closed_after_checkpoint=closed_after,
              frames_recovered_from_journal=recovered, resent=len(owed) - len(settled),
              closed_now=[s["coil"] for s in settled], checkpoint_seq=doc.get("last_seq"))
        return owed


def _defect_key(ev: dict) -> tuple:
    return (ev.get("coil"), ev.get("camera"), ev.get("index"), ev.get("class"), tuple(ev.get("bbox_px") or ()))


def _journal_tail(journal: Journal, horizon_ns: int, chunk: int = 1000) -> tuple[dict[tuple, dict], set[str]]:
    """Defect events (by identity) and coils with a final summary among the journal records
    published at or after ``horizon_ns``, read backwards from the newest."""
    defects: dict[tuple, dict] = {}
    closed: set[str] = set()
    hi = journal.last_seq
    while hi >= journal.first_seq:
        lo = max(journal.first_seq, hi - chunk + 1)
        records = journal.read(lo, hi, limit=chunk)
        oldest = None
        for _, topic, raw in records:
            body = msgpack.unpackb(raw, raw=False)
            ts = body.get("ts_ns", 0)
            oldest = ts if oldest is None else min(oldest, ts)
            if ts < horizon_ns:
                continue
            if topic == b"defect":
                defects[_defect_key(body)] = body
            elif topic == b"summary" and body.get("final"):
                closed.add(body["coil"])
        if oldest is not None and oldest < horizon_ns:
            break
        hi = lo - 1
    return defects, closed
