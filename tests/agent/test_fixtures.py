"""The test fixtures that start agents survive a port taken between free_port() and the bind."""
from __future__ import annotations

import socket

import conftest


def test_free_port_never_hands_out_a_port_twice():
    ports = [conftest.free_port() for _ in range(50)]
    assert len(set(ports)) == 50


def test_a_port_taken_before_the_agent_binds_it_is_replaced_by_a_fresh_one(running_agent, monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    real, first = conftest.free_port, [taken]
    monkeypatch.setattr(conftest, "free_port", lambda: first.pop() if first else real())
    try:
        agent = running_agent()  # the first config's ingest port is held by someone else
    finally:
        held.close()
    assert f":{taken}" not in agent.cfg.ingest.endpoint and agent.ingest.bound_endpoint == agent.cfg.ingest.endpoint
    assert agent.state == "ready"
