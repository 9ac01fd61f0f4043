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

from agent import statefiles
from agent.coil import CoilRegistry
from agent.journal import Journal
from agent.metrics import RateLimitedLog
from agent.statefiles import StateReport
from engines.atomic import write_atomic

log = structlog.get_logger(__name__)

CHECKPOINT_NAME = "coils.checkpoint.json"
FORMAT = 1
# Without a checkpoint, how far back start-up looks in the journal for coils never summarised.
ORPHAN_SCAN_RECORDS = 20_000


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
        self.write_errors = 0
        self._errors_log = RateLimitedLog(log, per_s=0.2, burst=2)

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
        if not self._write(json.dumps(doc, separators=(",", ":"))):
            return False
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
        self._write(json.dumps(doc))

    def _write(self, text: str) -> bool:
        """Atomically (a reader sees the old or the new checkpoint, never half of one). A full disk
        is logged at a bounded rate and the last checkpoint stays: the agent goes on."""
        try:
            write_atomic(self.path, text, durable=False)  # main loop: never blocks on a stalled fsync
        except OSError as exc:
            self.write_errors += 1
            self._errors_log.error("checkpoint_not_written", path=str(self.path), error=exc.strerror,
                                   failures=self.write_errors)
            return False
        return True

    # -- at start ------------------------------------------------------------------------------
    def load(self, journal_last_seq: int = statefiles.MAX_SEQ, report: StateReport | None = None) -> dict | None:
        """The checkpoint, validated field by field (agent/statefiles.py); None when there is none. A
        bad one (garbage, wrong shape, an implausible seq) is moved aside and reported, never fatal."""
        return statefiles.load_checkpoint(self.path, journal_last_seq, report or StateReport(), fmt=FORMAT)

    def restore(self, registry: CoilRegistry, journal: Journal,
                report: StateReport | None = None) -> list[tuple[str, dict]]:
        """Rebuild the open coils; returns (topic, body) to send: defect events and summaries owed.

        Coils the checkpoint does not know (they started after it was written, or it was missing
        or moved aside) are found in the journal: every coil with a defect event there and no final
        summary is reopened (``orphan``), so it closes with a summary like any other restored coil."""
        doc = self.load(journal.last_seq, report)
        if doc is not None:
            journal.reserve_through(doc["last_seq"], self.path.name)
            coils = registry.import_state(doc)
            recent = doc["recent"]
            horizon = min([doc["wall_ns"], *(w for w, _, _ in recent)]) - 2_000_000_000
            journaled_defects, journaled_closed = _journal_tail(journal, horizon)
        else:  # no checkpoint to bound the look back: the newest records only
            coils, recent = [], []
            journaled_defects, journaled_closed = _journal_tail(journal, 0, max_records=ORPHAN_SCAN_RECORDS)
        closed_after = [c for c in journaled_closed if registry.recover_closed(c)]
        orphans = _adopt_orphans(registry, journaled_defects.values(), journaled_closed)
        if doc is None and not orphans:
            return []
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
        level = log.warning if coils or orphans or closed_after or recovered or owed else log.info
        level("coils_restored", coils=coils, orphans=orphans, closed_after_checkpoint=closed_after,
              frames_recovered_from_journal=recovered, resent=len(owed) - len(settled),
              closed_now=[s["coil"] for s in settled],
              checkpoint_seq=doc["last_seq"] if doc is not None else None)
        return owed


def _adopt_orphans(registry: CoilRegistry, defects, journaled_closed: set[str]) -> list[str]:
    """Coils with defect events in the journal that the registry neither holds open nor knows as
    closed, and that have no final summary there: the agent died between their first event and
    their summary with no checkpoint in between. Reopened as restored coils (frames without an
    event in the journal are reported missing: the agent cannot vouch for them), so a camera that
    goes on continues them and one that does not closes them as ``agent_restart``."""
    open_now = set(registry.open_coils())
    found: dict[str, dict] = {}
    for ev in defects:
        coil = ev["coil"]
        if coil in open_now or coil in journaled_closed or registry.is_closed(coil):
            continue
        c = found.setdefault(coil, {"started_wall_ns": ev.get("ts_ns") or 0, "cameras": {}, "defects_by_class": {},
                                    "n_defects": 0, "worst": [], "provisional_sent": False, "end_reason": None,
                                    "length_mm": None})
        started = ev.get("recv_ts_ns") or ev.get("ts_ns")
        if isinstance(started, int) and 0 < started < c["started_wall_ns"]:
            c["started_wall_ns"] = started
        c["cameras"].setdefault(ev["camera"], {"states": {}, "ended": False, "sent": None, "end_reason": None,
                                               "max_pos_mm": 0.0, "duplicates": 0, "rejected_by_reason": {}})
    if found:
        registry.import_state({"coils": found})
        log.error("orphan_coils_reopened", coils=sorted(found))
    return sorted(found)


def _defect_key(ev: dict) -> tuple:
    return (ev.get("coil"), ev.get("camera"), ev.get("index"), ev.get("class"), tuple(ev.get("bbox_px") or ()))


def _journal_tail(journal: Journal, horizon_ns: int, chunk: int = 1000,
                  max_records: int | None = None) -> tuple[dict[tuple, dict], set[str]]:
    """Defect events (by identity) and coils with a final summary among the journal records
    published at or after ``horizon_ns`` (and among the newest ``max_records``), read backwards
    from the newest. Walks the records the journal holds, not the seq numbers: a seq floor far above
    the last record (a watermark from a damaged file) must not turn into a long empty loop."""
    defects: dict[tuple, dict] = {}
    closed: set[str] = set()
    seqs = journal.record_seqs()
    hi = len(seqs)
    while hi > 0:
        lo = max(0, hi - chunk)
        records = journal.read(seqs[lo], seqs[hi - 1], limit=chunk)
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
        if max_records is not None and len(seqs) - lo >= max_records:
            break
        hi = lo
    return defects, closed
