"""`coilsight web`: the operator page as its own process (uvicorn), beside the agent."""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web", help="serve the operator page: live coil, past coils, image upload (its own process)",
        description="Serves the page for a running agent: the live strip map over Server-Sent Events from the "
        "agent's event stream, past coils from its journal (read-only), an image upload through the same pack. "
        "Localhost by default; see docs/deployment.md, 'The web page'. Needs the web extra.")
    p.add_argument("--config", type=Path, help="the agent's config: endpoints, state dir, pack and [web] are read "
                                               "from it (default: built-in defaults)")
    p.add_argument("--host", help="address to listen on (default: web.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on; 0 = any free port (default: web.port, 8470)")
    p.add_argument("--no-upload", action="store_true", help="turn the image upload off (web.upload = false)")
    p.add_argument("--token-file", help="file holding the page's access token (web.token_file)")
    p.add_argument("--state-dir", help="the agent's state dir (journal, crops), if not its config's")
    p.set_defaults(func=cmd_web)


def _socket_setup(settings):
    if settings.subscriber_curve is None:
        return None
    from agent.auth import make_curve_client

    secret, server = settings.subscriber_curve

    def setup(sock) -> None:
        make_curve_client(sock, secret, server)

    return setup


def cmd_web(args: argparse.Namespace) -> int:
    from agent.web import WebExtraMissing, require_web_extra

    try:
        require_web_extra()
    except WebExtraMissing as exc:
        print(f"coilsight web: {exc}", file=sys.stderr)
        return 2
    from agent.config import ConfigError, config_from_dict, load_config, with_overrides
    from agent.web.settings import WebSettingsError, web_settings

    try:
        cfg = load_config(args.config) if args.config else config_from_dict({}, "<defaults>")
        if args.state_dir:
            cfg = with_overrides(cfg, agent={"state_dir": args.state_dir})
        settings = web_settings(cfg, host=args.host, port=args.port, upload=False if args.no_upload else None,
                                token_file=args.token_file)
        if settings.subscriber_curve is not None:  # fail now on a bad key file, not in the feed thread
            import zmq

            from agent.auth import AuthError, make_curve_client

            probe = zmq.Context.instance().socket(zmq.SUB)
            try:
                make_curve_client(probe, *settings.subscriber_curve)
            except AuthError as exc:
                raise WebSettingsError(f"web.subscriber_key: {exc}") from None
            finally:
                probe.close(0)
    except ConfigError as exc:
        exc.tell()
        return 2
    except WebSettingsError as exc:
        print(f"coilsight web: {exc}", file=sys.stderr)
        return 2
    from agent.logs import configure_logging

    configure_logging(cfg.agent.log_format, cfg.agent.log_level, stream=sys.stderr)
    import uvicorn

    from agent.web.app import create_app

    family = socket.AF_INET6 if ":" in settings.host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError as exc:
        sock.close()
        print(f"coilsight web: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    sock.listen(64)
    port = sock.getsockname()[1]
    from agent.web.control import control_functions

    status, crop = control_functions(settings)
    app, _ = create_app(settings, status=status, crop=crop, socket_setup=_socket_setup(settings))
    host = f"[{settings.host.strip('[]')}]" if family == socket.AF_INET6 else settings.host
    print(f"coilsight web: serving http://{host}:{port}/ for agent {cfg.agent.name} "
          f"(events {cfg.publish.endpoint}, upload {'on' if settings.upload else 'off'}, "
          f"token {'required' if settings.token else 'none'})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
    return 0
