"""The admin API from the outside: the same methods as gateway.operations.Operations, over HTTP, so the
CLI works the same against a running gateway as against the database."""

from __future__ import annotations

from dataclasses import fields
from typing import Any
from urllib.parse import quote

import httpx

from gateway.admin import NO_ENDPOINT
from gateway.http_client import shown_url_with_path
from gateway.operations import OperationError
from gateway.replay import ReplayPage
from gateway.sender import unproxied_if_loopback

# What an event's detail always holds (gateway.operations.detail_view), and a replay's page: the fields of
# the ReplayPage the endpoint answers with, but `pending`, which a gateway of an earlier version does not
# answer (the CLI then counts none).
DETAIL_FIELDS = ("id", "source", "type", "deliveries")
PAGE_FIELDS = tuple(field.name for field in fields(ReplayPage) if field.name != "pending")


def _segment(event_id: str) -> str:
    """An event id as one segment of a URL's path. quote() leaves `.` as it is, and a URL resolves a `.` or
    `..` segment away: `/admin/events/..` would ask for `/admin` (`../replay`, for the bulk replay). Any
    sender can choose such an id; escaped, the dots stay in the id (the server decodes them back)."""
    segment = quote(event_id, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def _from_an_endpoint(body: Any, status: int) -> bool:
    """An error an admin endpoint answered: `{"error": "…"}` and nothing else (the webhook listener's has
    `detail` too), and not the router's 404 for a path that is no endpoint."""
    if not isinstance(body, dict) or list(body) != ["error"] or not isinstance(body["error"], str):
        return False
    return not (status == 404 and body["error"].startswith(NO_ENDPOINT + " "))


class RemoteOperations:
    def __init__(
        self, url: str, token: str | None = None, timeout: float = 60.0, given_as: str = "--admin-url"
    ) -> None:
        """given_as: where the user gave the URL (`--admin-url`, `$HOOKYARD_ADMIN_URL`), to name in errors."""
        self.given_as = given_as
        self.timeout = timeout
        # As the user gave it, path and all, without its credentials: what errors name.
        self.shown_url = shown_url_with_path(url.rstrip("/"))
        # The admin API's own paths begin with /admin: a base URL that ends so asks for /admin/admin/….
        self.ends_in_admin = httpx.URL(url).path.rstrip("/").endswith("/admin")
        # As UTF-8 bytes, as the gateway reads it: httpx encodes a str value as ASCII, and a token beyond
        # ASCII (which ops.admin_token may be) would end the command with a UnicodeEncodeError.
        headers = {b"authorization": f"Bearer {token.strip()}".encode()} if token else {}
        self.client = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, mounts=unproxied_if_loopback(url)
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _call(self, method: str, path: str, answers: tuple[str, ...], **kwargs: Any) -> dict[str, Any]:
        """`answers`: the fields the endpoint's answer always has. A 200 without them (a sink's empty one,
        another app's JSON or text) is not from the ops listener, and would end the command on a missing
        field, or show the answer as if it were an event."""
        try:
            response = await self.client.request(method, path, **kwargs)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            # Reached, but not answered in time (whose text is empty): a replay may have been done.
            late = (
                f"the admin API at {self.shown_url} did not answer {method} {path} within {self.timeout:g} s"
            )
            if method == "POST":
                late += "; it may have been done all the same"
            raise OperationError(504, late) from exc
        except httpx.LocalProtocolError:
            # Not its text: that repeats the header it refused, which may be the token's.
            raise OperationError(
                400,
                f"a request to the admin API at {self.shown_url} could not be sent: a header cannot be"
                " carried",
            ) from None
        except httpx.HTTPError as exc:
            raise OperationError(
                503,
                f"cannot reach the admin API at {self.shown_url}: {str(exc) or type(exc).__name__}",
            ) from None
        try:
            body: Any = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested past what Python's json reads
            body = None
        if not response.is_success:
            if not _from_an_endpoint(body, response.status_code):
                raise OperationError(502, self._not_the_ops_listener(response))  # not ours: a bad gateway
            raise OperationError(response.status_code, body["error"])
        if not isinstance(body, dict) or any(name not in body for name in answers):
            raise OperationError(502, self._not_the_ops_listener(response))
        return body

    def _not_the_ops_listener(self, response: httpx.Response) -> str:
        """What the answer shows, no more: another listener, a proxy, or a base URL with a path of its own
        (GET /admin/admin/events) all look so. The path asked for is shown whole, and the URL as given,
        without its credentials."""
        tried = response.request.url.raw_path.partition(b"?")[0].decode("ascii")
        text = " ".join(response.text[:200].split()) or "with no body"
        hint = ": give the ops listener's own URL, without /admin" if self.ends_in_admin else ""
        return (
            f"{self.given_as} {self.shown_url} does not answer as Hookyard's ops listener: "
            f"{response.request.method} {tried} answered {response.status_code} {text}{hint}"
        )

    async def list_events(self, **filters: Any) -> dict[str, Any]:
        params = {name: value for name, value in filters.items() if value is not None}
        return await self._call("GET", "/admin/events", ("events", "next_cursor"), params=params)

    async def show_event(self, event_id: str, source: str | None = None) -> dict[str, Any]:
        params = {"source": source} if source else {}
        return await self._call("GET", f"/admin/events/{_segment(event_id)}", DETAIL_FIELDS, params=params)

    async def replay_event(
        self,
        event_id: str,
        source: str | None = None,
        action: str | None = None,
        route: str | None = None,
    ) -> dict[str, Any]:
        fields = (("source", source), ("action", action), ("route", route))
        # An empty one too (`--action "$ACTION"`, the variable unset): left out, it would replay every
        # delivery of the event, where on the database it names none.
        body = {name: value for name, value in fields if value is not None}
        return await self._call("POST", f"/admin/events/{_segment(event_id)}/replay", PAGE_FIELDS, json=body)

    async def replay(self, **request: Any) -> dict[str, Any]:
        body = {name: value for name, value in request.items() if value is not None}
        # A page also answers the window it was run on (see Operations.replay); a gateway before that
        # did not, and the CLI then fixes the window itself: not required here.
        return await self._call("POST", "/admin/replay", PAGE_FIELDS, json=body)
