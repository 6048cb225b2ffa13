"""The baseline: a bare Starlette endpoint that does nothing, served with the same uvicorn settings."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def noop(request: Request) -> Response:
    await request.body()
    return Response(b'{"status":"accepted"}', media_type="application/json")


app = Starlette(routes=[Route("/webhooks/consignease", noop, methods=["POST"])])
