"""Coilsight agent: the long-running inspection service, and its command line.

A frame's walk through this package: ``ingest`` (validate hostile input, account, decode) ->
``batcher`` (bounded per-camera queues) -> ``inference`` (workers running the engines runner:
gate, then segmentation, then post-processing) -> ``coil`` (accounting, deadline) and ``summary``
(the coil's summary document) -> ``publish`` with ``journal`` (durable, sequence numbers) and
``recovery`` (crash checkpoint). Around them: ``service`` (threads, main loop, shutdown), ``config``,
``protocol``, ``auth`` (CURVE), ``metrics`` (Prometheus), ``sdnotify``, ``logs``, ``subscriber``
(a client of the stream) and ``cli``/``commands``.

``agent.tools`` (camera-sim, demo, bench) drive the service from outside; the service never
imports them. May import: ``engines`` (and the tools and the CLI also ``training``,
``calibration``, ``metrics``). Nothing imports ``agent`` but its own CLI.
"""
__version__ = "0.1.0"
