"""The interactive API documentation (``/docs``, ``/redoc``), served without internet.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and fonts from Google): blank on a machine without
internet. Here their scripts come from the fastapi-offline package, mounted under ``/docs/assets``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = "/docs/assets"


def add_docs(app: FastAPI, reads: list) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts served from the fastapi-offline package, so they
    work without internet. When reads need the key (``reads`` not empty), the pages are not served (a browser
    cannot send the key header for them) and ``/openapi.json`` needs the key like every read."""
    if reads:

        @app.get("/openapi.json", include_in_schema=False, dependencies=reads)
        async def openapi_schema() -> JSONResponse:
            return JSONResponse(app.openapi())

        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=files("fastapi_offline") / "static"), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=None,
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
