"""People-facing views of a running agent: `coilsight status` and `coilsight subscribe --format table`.

Machines get JSON (`status --json`, `subscribe --format json`); people get a few aligned lines:
counts as integers, times rounded, no nested maps.
"""
from __future__ import annotations

import json
import sys
import time


def _n(value) -> str:
    """A count the metrics carry as a float (Prometheus) shown as the integer it is."""
    return str(int(value)) if isinstance(value, (int, float)) and float(value).is_integer() else f"{value}"


def _by_reason(by_reason: dict | None) -> str:
    return ", ".join(f"{k} {_n(v)}" for k, v in sorted((by_reason or {}).items())) or "none"


def _coil_line(s: dict) -> str:
    f, t = s["frames"], s.get("timing", {})
    state = ("complete" if s.get("complete") else "INCOMPLETE") if s.get("final") else "open"
    sent = f.get("sent")
    got = f"{f['received']} of {sent} frames" if sent is not None else f"{f['received']} frames so far"
    parts = [f"{s['coil']}: {state}" + (f" ({s['end_reason']})" if s.get("end_reason") else ""),
             f"{got}: {f['inspected']} inspected, {f['gated_out']} gated out, {f['rejected']} rejected"
             + (f" ({_by_reason(s.get('rejected_by_reason'))})" if f["rejected"] else ""),
             f"{s.get('defect_count', 0)} defects"]
    if f.get("missing"):
        parts.append(f"{f['missing']} missing")
    if f.get("pending"):
        parts.append(f"{f['pending']} pending")
    if t:
        parts.append(f"{t.get('wall_s', 0):.1f} s of {t.get('budget_s', 0):.0f} s budget")
    return "; ".join(parts)


def format_status(reply: dict, endpoint: str) -> str:
    h, m = reply.get("health", {}), reply.get("metrics", {})
    rows = [("agent", f"{h.get('state', '?')} at {endpoint}, up {_duration(h.get('uptime_s', 0))}"),
            ("profile", h.get("profile") or "-"),
            ("models", ", ".join(f"{role} {sha} on {h.get('backend', {}).get(role, '?')}"
                                 for role, sha in sorted((h.get("models") or {}).items())) or "-")]
    pass_rate = m.get("gate_pass_rate")
    rows.append(("queue", f"{_n(h.get('queue_depth', 0))} frame(s) waiting; {_n(h.get('inferred', 0))} inferred "
                          "since start" + (f", gate pass rate {pass_rate:.0%}" if pass_rate is not None else "")))
    rows.append(("rejected", _by_reason(h.get("rejected"))))
    for cam, c in sorted((h.get("cameras") or {}).items()):
        rows.append((f"camera {cam}", f"last seq {c.get('last_seq')}, {c.get('seq_gaps', 0)} missing by seq, "
                                      f"rejected: {_by_reason(c.get('rejected'))}"))
    coils = reply.get("coils") or {}
    if coils:
        for s in coils.values():
            rows.append(("open coil", _coil_line(s)))
    else:
        rows.append(("open coils", "none"))
    recent = reply.get("recent_summaries") or []
    for s in reversed(recent):
        rows.append(("last coils" if s is recent[-1] else "", _coil_line(s)))
    if not recent:
        rows.append(("last coils", "none since start"))
    rows.append(("journal", f"last seq {reply.get('last_seq')}, {_bytes(reply.get('journal_bytes', 0))}"
                            + (f", {h['journal_damage']} damaged record(s)" if h.get("journal_damage") else "")))
    if h.get("reloads"):
        rows.append(("reloads", _n(h["reloads"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


def format_event(topic: str, msg: dict) -> str:
    """One readable line per event (subscribe --format table)."""
    clock = time.strftime("%H:%M:%S", time.localtime(msg.get("ts_ns", 0) / 1e9))
    head = f"{clock} {msg.get('seq', ''):>6} {topic:<7}"
    if topic == "defect":
        return (f"{head} {msg['coil']} {msg['camera']} frame {msg['index']}: {msg['class']} "
                f"conf {msg['confidence']:.2f} at {msg['along_mm'] / 1000:.2f} m along, {msg['across_mm']:.0f} mm "
                f"across, {msg['width_mm']:.0f}x{msg['length_mm']:.0f} mm")
    if topic == "summary":
        kind = "final" if msg.get("final") else "provisional"
        grade = f"; grade {msg['grade']['grade']} ({msg['grade']['reason']})" if msg.get("grade") else ""
        return f"{head} {kind}: {_coil_line(msg)}{grade}"
    if topic == "track":
        cams = ", ".join(f"{c} {a}-{b}" for c, (a, b) in msg["frames"].items())
        return (f"{head} {msg['coil']} track {msg['track_id']}: {msg['class']} conf {msg['confidence']:.2f} at "
                f"{msg['along_mm'] / 1000:.2f} m along, {msg['across_mm']:.0f} mm across, "
                f"{msg['width_mm']:.0f}x{msg['length_mm']:.0f} mm, {msg['event_count']} events (frames {cams})")
    if topic == "periodic":
        return (f"{head} {msg['coil']}: {msg['class']} every {msg['pitch_mm']:.0f} mm at {msg['across_mm']:.0f} mm "
                f"across, {msg['count']} repeats (roll diameter {msg['roll_diameter_mm']:.0f} mm)")
    if topic == "health":
        return (f"{head} {msg.get('state')}: {msg.get('inferred')} inferred, queue {msg.get('queue_depth')}, "
                f"open coils {', '.join(msg.get('coils_open') or []) or 'none'}, rejected {_by_reason(msg.get('rejected'))}")
    return f"{head} {json.dumps(msg, default=str)}"


def run_subscribe(args) -> int:
    """Print events until --count, --timeout or Ctrl-C; say so on stderr when the agent is silent."""
    from agent.subscriber import Subscriber

    from agent.tools.camera_run import EXIT_REFUSED, ConnectWatch

    topics = tuple(args.topic or ("defect", "summary"))
    # the event socket's handshakes (CURVE keys, when given: agent/tools/curve_client.py); the replay
    # socket gets the same keys
    watch = ConnectWatch(getattr(args, "client_keys", None), immediate=False)
    sub = Subscriber(args.endpoint, args.replay, topics=topics, from_seq=args.from_seq, include_health=True,
                     socket_setup=watch)
    n, last_beat, silent, heard = 0, time.monotonic(), False, False
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        while deadline is None or time.monotonic() < deadline:
            step = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            for topic, msg in sub.messages(timeout_s=step):
                if topic == "health":
                    last_beat, heard = time.monotonic(), True
                    if silent:
                        print(f"coilsight subscribe: heartbeat from {args.endpoint} again", file=sys.stderr)
                        silent = False
                    if "health" not in topics:
                        continue
                line = format_event(topic, msg) if args.format == "table" else \
                    json.dumps({"topic": topic, **msg}, default=str)
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
                n += 1
                if args.count and n >= args.count:
                    return 0
            if not heard and watch.failed():  # refused in the handshake: retrying will not help
                print(f"coilsight subscribe: {watch.refused(args.endpoint)}", file=sys.stderr)
                return EXIT_REFUSED
            if not silent and time.monotonic() - last_beat > args.heartbeat_timeout:
                print(f"coilsight subscribe: no heartbeat from {args.endpoint} for {args.heartbeat_timeout:g} s "
                      "(is the agent running? give its --config or --endpoint)", file=sys.stderr)
                silent = True
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        watch.close()
    return 0 if heard else 1  # never heard the agent: nothing here proves the stream was empty
