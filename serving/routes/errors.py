"""The app's error handling: bad input is a 4xx naming the field, never a 500."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chronorisk.errors import ChronoriskError, InputError
from chronorisk.serving import schemas as S
from chronorisk.serving.routes.common import error_body


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        fields = []
        for err in exc.errors()[:50]:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            fields.append({"field": S.field_path(err.get("loc", ())), "problem": msg})
        first = fields[0] if fields else {"field": "body", "problem": "invalid"}
        return JSONResponse(
            error_body(f"{first['field']}: {first['problem']}", fields), status_code=422
        )

    @app.exception_handler(InputError)
    async def _input(_request: Request, exc: InputError):
        return JSONResponse(error_body(str(exc), [{"field": exc.field, "problem": exc.problem}]), status_code=422)

    @app.exception_handler(ChronoriskError)
    async def _user(_request: Request, exc: ChronoriskError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/ui"):
            from chronorisk.serving.web.pages import error_page

            return error_page(request, exc.status_code, str(exc.detail))
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

