"""CLI: `coilsight bridge` and `coilsight aggregate` (each its own process and systemd unit)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def _load(args: argparse.Namespace, command: str):
    from agent.config import ConfigError

    from agent.bridge.config import load_bridge_config

    try:
        return load_bridge_config(args.config)
    except ConfigError as exc:
        print(f"coilsight {command}: invalid config:", file=sys.stderr)
        exc.tell("  ")
        return None


def _run(args: argparse.Namespace, command: str) -> int:
    cfg = _load(args, command)
    if cfg is None:
        return 2
    if args.check:
        print(f"{args.config}: ok")
        return 0
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        print(f"coilsight {command}: paho-mqtt is not installed; install the 'mqtt' extra "
              f"(pip install 'coilsight[mqtt]')", file=sys.stderr)
        return 1
    import structlog

    from agent.logs import configure_logging

    structlog.reset_defaults()
    configure_logging(cfg.bridge.log_format, cfg.bridge.log_level, stream=sys.stderr)
    from agent.config import ConfigError

    from agent.bridge.aggregate import Aggregator
    from agent.bridge.forward import Bridge
    from agent.bridge.mqtt import MqttSetupError
    from agent.bridge.state import StateBusy

    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if command == "bridge":
            return Bridge(cfg, stop=stop).run()
        return Aggregator(cfg, stop=stop).run()
    except (ConfigError, MqttSetupError, StateBusy, ValueError) as exc:
        print(f"coilsight {command}: {exc}", file=sys.stderr)
        return 1


def register(sub: Any) -> None:
    b = sub.add_parser("bridge", help="forward an agent's events to an MQTT broker, at least once (QoS 1, "
                                      "resumes from its state file)")
    b.add_argument("--config", required=True, help="the bridge's TOML file (docs/deployment.md, Bridge)")
    b.add_argument("--check", action="store_true", help="check the config file and exit")
    b.set_defaults(func=lambda a: _run(a, "bridge"))
    a = sub.add_parser("aggregate", help="merge several boxes' summaries of one coil into one coil summary "
                                         "on the MQTT broker")
    a.add_argument("--config", required=True, help="TOML file with [bridge], [mqtt], [aggregate] and [[boxes]]")
    a.add_argument("--check", action="store_true", help="check the config file and exit")
    a.set_defaults(func=lambda a: _run(a, "aggregate"))
