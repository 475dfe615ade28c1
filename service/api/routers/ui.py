"""`/ui`: the pathologist's viewer, static files shipped inside the package (no Node at run time).

The page holds no secret: it asks for an API key, keeps it in the tab's sessionStorage and sends it as a
bearer header on every API call (tiles included), so every tenant check of the API applies to the page too.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
STATIC_DIR = UI_DIR / "static"
# The page loads only its own scripts and styles; images may be blob: URLs made from authenticated fetches.
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ui_index() -> FileResponse:
    return FileResponse(
        UI_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


@router.get("/ui/")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


def mount_static(app) -> None:
    """Serve `service/api/ui/static` at /ui/static (app.js, styles, the npm-built vendor files)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR, check_dir=True), name="ui-static")
