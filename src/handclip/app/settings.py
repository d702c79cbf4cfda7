"""What the server may do, checked before gradio or torch loads: the address it binds (loopback unless asked, and
then only with ``auth``), the upload caps, and the folders it may serve files from."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)

#: Hosts that reach only this machine.
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """``user:password`` -> (user, password); None stays None; anything else is refused (the value is not echoed)."""
    if auth is None or str(auth) == "":
        return None
    user, sep, password = str(auth).partition(":")
    if not sep or not user or not password:
        raise HandCLIPError("auth: expected USER:PASSWORD (both non-empty), e.g. auth='${oc.env:HANDCLIP_AUTH}'")
    return user, password


def check_host(host: str, auth: str | None) -> tuple[str, str] | None:
    """The login pair; loopback needs none. Another address is served only with ``auth`` set, with a warning."""
    host = str(host)
    login = parse_auth(auth)
    if is_loopback(host):
        return login
    if login is None:
        raise HandCLIPError(f"host={host} would let other machines reach the app (biometric data); it is served on "
                            "another address than loopback (127.0.0.1) only with auth=USER:PASSWORD set")
    log.warning("serving on %s: other machines can reach HandCLIP Studio (login required; use HTTPS through a "
                "reverse proxy on an untrusted network)", host)
    return login


@dataclass
class Limits:
    """Upload caps: bytes per file, files per request (Identify/Enrol and Batch), and the smallest image side."""

    max_file_bytes: int = 20 * 2**20
    max_files: int = 20
    max_batch_files: int = 500
    min_side: int = 16


@dataclass
class Folders:
    """The app's own folders: the galleries it offers, where it looks for models and evaluation results, and its
    output folder (requests, results, gradio's upload cache). Only these are served."""

    galleries: list[Path]
    models_root: Path
    out: Path
    extra: list[Path] = field(default_factory=list)

    @property
    def cache(self) -> Path:
        return self.out / "gradio-cache"

    def evaluations(self) -> list[Path]:
        """The folders of evaluation results (``eval/`` under the models root, the demo's included)."""
        return sorted({p for p in [self.models_root / "eval", *self.models_root.glob("*/eval")] if p.is_dir()})

    def allowed(self) -> list[str]:
        """Served folders: the galleries, the app's output folder, the evaluation results (never the checkpoints)."""
        return [str(p.resolve()) for p in (*self.galleries, self.out, *self.evaluations(), *self.extra)]

    def blocked(self) -> list[str]:
        """Never served although under an allowed folder: the run's Hydra settings and log of the app."""
        return [str((self.out / ".hydra").resolve()), str((self.out / "app.log").resolve())]


def configure_environment(folders: Folders) -> None:
    """Before gradio is imported: no analytics, no update check, uploads cached under the app's output folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(folders.cache)
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    folders.cache.mkdir(parents=True, exist_ok=True)
