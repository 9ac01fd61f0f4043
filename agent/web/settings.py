"""What the page serves and how it is guarded, from the agent's config plus `coilsight web` flags.

Rules (docs/deployment.md, "The web page"):
- loopback by default; another address is the operator's choice (``--host`` or ``web.host``);
- with CURVE on (``auth.enabled``) a page off loopback needs an access token (``web.token_file``):
  whoever may not connect to the agent's sockets must not read its events through the page either;
- off loopback, uploads (which run the models on this box) need a token too, CURVE or not; a page
  off loopback without a token only reads (``web.upload = false``, ``--no-upload``);
- a token file that anyone on the box can read, or that is shorter than 16 characters, is refused;
- with CURVE on, the page's own sockets need its keys: a subscriber key for the event stream and
  the replay socket, an operator key for a tcp:// control socket (/readyz and coil progress).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config, is_loopback

MIN_TOKEN_CHARS = 16


class WebSettingsError(ValueError):
    """The page cannot start with these settings; the message says what to change."""


@dataclass(frozen=True)
class WebSettings:
    cfg: Config
    host: str
    port: int
    upload: bool
    max_upload_bytes: int
    max_upload_pixels: int
    token: str | None
    subscriber_curve: tuple[str, str] | None  # (secret key file, server public key file)
    operator_curve: tuple[str, str] | None
    state_dir: Path

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal" / self.cfg.agent.name

    @property
    def crops_dir(self) -> Path:
        return self.state_dir / "crops"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def read_token(path: str) -> str:
    """The token in ``path`` (one line; surrounding whitespace ignored). A relative name is looked
    up in $CREDENTIALS_DIRECTORY when systemd set it (LoadCredential=)."""
    p = Path(path)
    if not p.is_absolute() and os.environ.get("CREDENTIALS_DIRECTORY"):
        p = Path(os.environ["CREDENTIALS_DIRECTORY"]) / p
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise WebSettingsError(f"web.token_file: cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WebSettingsError(f"web.token_file: {p} is not UTF-8 text") from None
    if st.st_mode & stat.S_IROTH:
        raise WebSettingsError(f"web.token_file: {p} is readable by every user (mode {stat.S_IMODE(st.st_mode):o}); "
                               f"chmod o-rwx it (0600 or 0640 root:coilsight)")
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise WebSettingsError(f"web.token_file: {p} must hold one token of at least {MIN_TOKEN_CHARS} characters "
                               f"without spaces (e.g. `openssl rand -hex 24 > {p}`)")
    return text


def web_settings(cfg: Config, *, host: str | None = None, port: int | None = None, upload: bool | None = None,
                 token_file: str | None = None) -> WebSettings:
    """The page's settings: ``cfg.web`` with the command line's overrides, checked."""
    w = cfg.web
    host = host if host is not None else w.host
    port = port if port is not None else w.port
    if not 0 <= port <= 65_535:
        raise WebSettingsError(f"--port: must be 0-65535, got {port}")
    token_file = token_file if token_file is not None else w.token_file
    token = read_token(token_file) if token_file else None
    if cfg.auth.enabled and not is_loopback(host) and token is None:
        raise WebSettingsError(
            f"the page on {host} with auth.enabled (CURVE) needs an access token: set web.token_file (or "
            f"--token-file) to a file holding one, or keep the page on 127.0.0.1")
    upload = w.upload if upload is None else upload
    if upload and not is_loopback(host) and token is None:
        # without CURVE the page reads nothing the agent's own sockets do not already give away, but
        # an upload runs the models on this box: not for whoever reaches the address
        raise WebSettingsError(
            f"the page on {host} takes uploads (web.upload) without an access token: anyone who reaches "
            f"{host}:{port} could run the models on this box; set web.token_file (or --token-file), or "
            f"web.upload = false (or --no-upload), or keep the page on 127.0.0.1")
    sub_curve = op_curve = None
    if cfg.auth.enabled:
        if not (w.subscriber_key and w.server_key):
            raise WebSettingsError("auth.enabled: the page subscribes like any subscriber: set web.subscriber_key "
                                   "(a subscriber secret key) and web.server_key (the agent's server.key)")
        sub_curve = (w.subscriber_key, w.server_key)
        if cfg.control.endpoint.startswith("tcp://") and w.operator_key:
            op_curve = (w.operator_key, w.server_key)
    return WebSettings(cfg=cfg, host=host, port=port, upload=upload,
                       max_upload_bytes=w.max_upload_bytes, max_upload_pixels=w.max_upload_pixels, token=token,
                       subscriber_curve=sub_curve, operator_curve=op_curve, state_dir=cfg.state_path())
