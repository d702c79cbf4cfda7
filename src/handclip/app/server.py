"""The app from its config: folders, caps and the address checked first, then the Studio, the page, and the
FastAPI application that serves it (the same one in-process tests drive with a TestClient)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from handclip.app.settings import Folders, Limits, check_host, configure_environment
from handclip.errors import HandCLIPError

log = logging.getLogger(__name__)


def folders_of(cfg: DictConfig) -> Folders:
    """The galleries offered (``galleries``, else the ``gallery0`` folders of the splits under ``paths.data_dir``,
    and always the app's own ``<out>/gallery``), the models root and the output folder."""
    out = Path(str(cfg.out)).expanduser().resolve()
    given = [Path(str(g)).expanduser().resolve() for g in (cfg.galleries or [])]
    for g in given:
        if g.exists() and not g.is_dir():
            raise HandCLIPError(f"galleries: {str(g)!r} is a file; expected a gallery folder")
    if not given:
        data = Path(str(cfg.paths.data_dir)).expanduser()
        given = sorted(p.resolve() for p in data.glob("*/gallery0") if p.is_dir()) if data.is_dir() else []
    own = out / "gallery"
    return Folders(galleries=list(dict.fromkeys([*given, own])), models_root=Path(str(cfg.models_root)).expanduser()
                   .resolve(), out=out)


def limits_of(cfg: DictConfig) -> Limits:
    return Limits(max_file_bytes=int(cfg.max_file_mb * 2**20), max_files=int(cfg.max_files),
                  max_batch_files=int(cfg.max_batch_files))


def theme():
    """gradio's default look with the system's fonts: nothing fetched from a font CDN."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def create_app(cfg: DictConfig):
    """(FastAPI app, Studio, Blocks) as configured; the address and login checked first."""
    login = check_host(str(cfg.host), cfg.auth)
    folders, limits = folders_of(cfg), limits_of(cfg)
    configure_environment(folders)  # before gradio is imported
    import gradio as gr
    from fastapi import FastAPI

    from handclip.app.engine import Studio
    from handclip.app.ui import build

    studio = Studio(folders, limits, zero_shot=(str(cfg.model.model_name), cfg.model.pretrained),
                    device=str(cfg.device), backend=str(cfg.backend), seed=int(cfg.seed), top_k=int(cfg.top_k),
                    target_fmr=cfg.target_fmr)
    page = build(studio)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app = gr.mount_gradio_app(
        app, page, path="", server_name=str(cfg.host), server_port=int(cfg.port), auth=login,
        allowed_paths=folders.allowed(), blocked_paths=folders.blocked(), max_file_size=limits.max_file_bytes,
        footer_links=["settings"], run_history=False, show_error=False, ssr_mode=False, pwa=False,
        mcp_server=False, enable_monitoring=False, theme=theme())
    return app, studio, page


def serve(cfg: DictConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    app, studio, _ = create_app(cfg)
    if not studio.models:
        log.warning("no model found under %s: train one, or run `make demo` (then `make app`)", studio.folders
                    .models_root)
    print(f"HandCLIP Studio on http://{cfg.host}:{cfg.port} (models: {len(studio.models)}, galleries: "
          f"{len(studio.folders.galleries)}); Ctrl+C stops it", flush=True)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level="warning")
