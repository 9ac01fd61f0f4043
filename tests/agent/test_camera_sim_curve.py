"""camera-sim, subscribe and status against a real CURVE agent on loopback (issue 20 item 13): they take
the endpoints and the agent's public key from the agent's config, their own keys from --key (camera-sim's
verdict: --events-key), and when the agent refuses them in the handshake they say why (exit 3), never
"no agent"."""
from __future__ import annotations

import shutil

import pytest
from test_agent_auth import roles  # noqa: F401  (the fixture: server key, role keys, allow-lists)
from test_first_hour import (  # noqa: F401  (logs_on_stderr: the autouse fixture, logs off stdout here too)
    camera_sim,
    frames_folder,
    logs_on_stderr,
    write_config,
)

from agent import auth


@pytest.fixture
def curve_agent(running_agent, roles, tmp_path):  # noqa: F811
    agent = running_agent(auth=roles["auth"])
    return agent, write_config(agent, tmp_path / "agent.toml"), frames_folder(tmp_path / "frames")


def test_keys_from_the_config_and_the_options_get_the_coil_inspected(curve_agent, roles, capsys):  # noqa: F811
    agent, cfg, folder = curve_agent
    # the agent's public key is found next to its secret key (auth.credentials_dir): no --server-key
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder),
                                   "--key", str(roles["secret"]["cam0"]), "--events-key", str(roles["secret"]["sub0"]))
    assert code == 0, err
    assert result["verdict"] == "inspected" and result["received"] == 3 and result["rejected"] == 0
    assert "no agent" not in err


def test_a_curve_agent_without_keys_is_a_usage_error_naming_what_to_pass(curve_agent, capsys):
    agent, cfg, folder = curve_agent
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--folder", str(folder))
    assert (code, result) == (2, None)
    assert f"the agent uses CURVE (auth.enabled in {cfg}): pass --key CAMERA.key_secret" in err
    assert "--events-key SUBSCRIBER.key_secret" in err


def test_refusals_are_named_not_no_agent(curve_agent, roles, tmp_path, capsys):  # noqa: F811
    agent, cfg, folder = curve_agent
    ingest, events = agent.cfg.ingest.endpoint, agent.cfg.publish.endpoint
    _, stranger = auth.generate_keys(tmp_path / "strangers", "cam9", "camera")
    common = ["--folder", str(folder), "--connect-timeout", "2"]

    # a camera key the agent does not list
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--key", str(stranger),
                                   "--events-key", str(roles["secret"]["sub0"]), *common)
    assert (code, result) == (3, None), err
    assert (f"the agent at {ingest} refused this camera's CURVE key {stranger} (ZAP status 400): its public key is "
            f"not on the agent's camera allow-list, auth.cameras_dir ({roles['dirs']['camera']})") in err
    assert "no agent" not in err

    # a good camera key, but the verdict's subscriber key is the camera key (not on the subscriber list)
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--key", str(roles["secret"]["cam0"]), *common)
    assert (code, result) == (3, None), err
    assert f"the agent at {events} refused this subscriber's CURVE key {roles['secret']['cam0']}" in err
    assert "--no-verdict sends without it" in err

    # no --config, no keys: plain ZeroMQ against a CURVE agent
    code, result, err = camera_sim(capsys, "--endpoint", ingest, "--events", events, *common)
    assert (code, result) == (3, None), err
    assert f"the agent at {ingest} uses CURVE and this camera does not: pass --key CAMERA.key_secret" in err

    # another server's public key
    other = tmp_path / "other"
    other_pub, _ = auth.generate_keys(other, "server")
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--key", str(roles["secret"]["cam0"]),
                                   "--events-key", str(roles["secret"]["sub0"]), "--server-key", str(other_pub), *common)
    assert (code, result) == (3, None), err
    assert f"the CURVE handshake with {ingest} failed" in err and f"{other_pub} is not this agent's public key" in err


def test_a_key_against_a_plain_agent_says_the_agent_has_no_curve(running_agent, roles, tmp_path, capsys):  # noqa: F811
    agent = running_agent()
    cfg = write_config(agent, tmp_path / "agent.toml")
    code, result, err = camera_sim(capsys, "--config", str(cfg), "--key", str(roles["secret"]["cam0"]),
                                   "--server-key", str(roles["server"]), "--connect-timeout", "2",
                                   "--folder", str(frames_folder(tmp_path / "f")))
    assert (code, result) == (3, None), err
    # libzmq reports either the mechanism mismatch or (racing it) a closed connection: both say so
    assert (f"the agent at {agent.cfg.ingest.endpoint} does not use CURVE, this camera does (--key)" in err
            or f"the CURVE handshake with {agent.cfg.ingest.endpoint} failed" in err and
            "or the agent does not use CURVE" in err), err


def test_bad_key_options_are_usage_errors(tmp_path, roles, capsys):  # noqa: F811
    folder = frames_folder(tmp_path / "f")
    code, _, err = camera_sim(capsys, "--key", str(roles["secret"]["cam0"]), "--folder", str(folder))
    assert code == 2 and "--key and --server-key go together" in err
    loose = tmp_path / "loose.key_secret"
    shutil.copy(roles["secret"]["cam0"], loose)
    loose.chmod(0o644)
    code, _, err = camera_sim(capsys, "--key", str(loose), "--server-key", str(roles["server"]), "--folder", str(folder))
    assert code == 2 and f"CURVE secret key file {loose} is readable by others" in err


# --- the other clients of a CURVE agent: subscribe (item 13) and status take the same keys -----------


def test_subscribe_and_status_with_keys_and_the_agents_config(curve_agent, roles, capsys):  # noqa: F811
    from agent.cli import main

    agent, cfg, _ = curve_agent
    assert main(["subscribe", "--config", str(cfg), "--key", str(roles["secret"]["sub0"]), "--topic", "health",
                 "--count", "1", "--timeout", "10"]) == 0
    out, err = capsys.readouterr()
    assert '"topic": "health"' in out and '"state": "ready"' in out, err

    # a camera key on the subscriber socket: refused, and said so at once
    assert main(["subscribe", "--config", str(cfg), "--key", str(roles["secret"]["cam0"]), "--timeout", "10"]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert (f"coilsight subscribe: the agent at {agent.cfg.publish.endpoint} refused this subscriber's CURVE key "
            f"{roles['secret']['cam0']} (ZAP status 400)") in err

    assert main(["subscribe", "--config", str(cfg), "--timeout", "1"]) == 2
    assert "pass --key SUBSCRIBER.key_secret (a subscriber key whose public half is in auth.subscribers_dir" in \
        capsys.readouterr().err

    # status: the operator key, the agent's public key found from the config
    assert main(["status", "--config", str(cfg), "--key", str(roles["secret"]["op0"])]) == 0
    assert "ready" in capsys.readouterr().out


def test_engines_reload_with_the_operator_key(curve_agent, roles, capsys):  # noqa: F811
    from agent.cli import main

    agent, cfg, _ = curve_agent
    assert main(["engines", "reload", "--config", str(cfg)]) == 2  # CURVE on a tcp:// control socket: a key
    assert "pass --key OPERATOR.key_secret (an operator key whose public half is in auth.operators_dir" in \
        capsys.readouterr().err
    assert main(["engines", "reload", "--config", str(cfg), "--key", str(roles["secret"]["op0"])]) == 0, \
        capsys.readouterr().err
    # a subscriber key on the control socket gets no answer, and the message says why that may be
    assert main(["engines", "reload", "--config", str(cfg), "--key", str(roles["secret"]["sub0"])]) == 1
    assert "no answer also means the agent refused the key: is it on auth.operators_dir?" in capsys.readouterr().err
