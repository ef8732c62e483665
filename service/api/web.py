"""The web page: ``/`` serves the single-page app; ``/static/<name>`` serves only the files shipped beside it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SHIPPED = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """A fixed set of names known at startup, so no request path can reach outside the folder."""
    if name not in SHIPPED:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
    return FileResponse(SHIPPED[name], headers={"Cache-Control": "no-cache"})
