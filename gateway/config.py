"""routes.yaml: parsing, ${VAR} interpolation and schema validation.

This module knows the shape of the file only. Checks that need the plugins (provider and action names,
each action's own `with:` schema, filters, event names) happen when routes are compiled (gateway.routing).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.addresses import ForwardedHeader, parse_networks
from gateway.http_client import header_control_character, url_text_problem

DEFAULT_CONFIG_PATH = "routes.yaml"
CONFIG_ENV_VAR = "HOOKYARD_CONFIG"


class ConfigError(Exception):
    """The config is invalid; `errors` has one line per problem, each naming its place."""

    def __init__(
        self,
        errors: list[str],
        partial: PartialConfig | None = None,
        tree: dict[str, Any] | None = None,
        unexpanded: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        # What did validate, so that the checks needing plugins can report their errors in the same run.
        self.partial = partial
        # The file as read: the errors of those checks are put in the file's order with these by it.
        self.tree = tree
        # The places whose ${VAR} could not be expanded: what those checks say of them is left out.
        self.unexpanded = unexpanded

    def follows_from_unexpanded(self, error: str) -> bool:
        """Whether `error` is about a value whose ${VAR} could not be expanded, or about the list holding it:
        the empty text left in its place is no reason of its own (`secrets: at least one secret is
        required`, `secrets[0] has an empty password`), and would point away from the variable to set."""
        return _follows_from(error, self.unexpanded)


def _follows_from(error: str, unexpanded: Collection[str]) -> bool:
    # The list holding the value, and an action's `with:` holding it: an action checks its options together
    # (`give a bearer token or oauth client credentials`), and so reads the empty text as no value at all.
    places = {
        *unexpanded,
        *(re.sub(r"\[\d+\]$", "", place) for place in unexpanded),
        *(re.sub(r"(\.with)\.[^.\[]+$", r"\1", place) for place in unexpanded),
    }
    return any(error.startswith((f"{place}: ", f"{place} ")) for place in places)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`5s`, `2m`, `1h`, `250ms` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{_yaml_boolean(value)}, not a duration")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer past the largest float (YAML reads 310 digits as one)
            seconds = math.inf
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        # YAML's null is a key with nothing after it: said so, not in Python's words (None).
        written = "empty (null)," if value is None else f"{value!r} is"
        raise ValueError(f"{written} not a duration; use e.g. 500ms, 5s, 2m, 1h or a number of seconds")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a finite, non-negative duration")
    return seconds


def parse_positive_duration(value: Any) -> float:
    """A duration that must not be 0: a timeout, a lease or a polling interval of 0 would expire at once,
    every time, and the loop that waits on it would spin."""
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError(f"{value!r}: must be longer than 0")
    return seconds


def parse_retention(value: Any) -> float | None:
    """A duration longer than 0, or `off` (None: nothing is deleted). YAML reads a bare off (or no, false)
    as a boolean; from a ${VAR} it comes as text."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "false", "no")):
        return None
    if value is True:
        raise ValueError(
            f"{_yaml_boolean(True)}, not a duration; give one such as 7d, or off to keep every event"
        )
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError(
            f"{value!r} would delete events as soon as their deliveries end; give a duration such as 7d, "
            "or off to keep every event"
        )
    return seconds


_DURATION_TEXT = {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"}
# The same with a digit other than 0 in it: `0s` or `0.0ms` is refused when the config loads, as 0 is.
_POSITIVE_DURATION_TEXT = {"type": "string", "pattern": r"^\s*(?=[\d.]*[1-9])\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"}
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, _DURATION_TEXT]}),
]
PositiveDuration = Annotated[
    float,
    BeforeValidator(parse_positive_duration),
    WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0}, _POSITIVE_DURATION_TEXT]}),
]
Retention = Annotated[
    float | None,
    BeforeValidator(parse_retention),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                _POSITIVE_DURATION_TEXT,
                {"enum": [False, "off", "false", "no"]},
            ]
        }
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="wrap")
    @classmethod
    def _as_yaml_typed_it(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """Refuse a boolean where a number is wanted and a number where a boolean is: pydantic would take
        `port: true` as 1, `events: [yes]` as [1] and `insecure: 1` as true. Text still converts, as a
        ${VAR} always expands to text."""
        field = cls.model_fields[info.field_name or ""]
        reads_itself = any(isinstance(item, _VALIDATORS) for item in field.metadata)
        wrong = [] if reads_itself else _misread(value, field.annotation, ())
        if not wrong:
            return handler(value)
        # The other entries are still validated: `events: [1.5, yes]` is two errors in one round, not two
        # rounds of one. What pydantic says of a misread entry itself (yes taken as 1) is left out.
        misread = [error["loc"] for error in wrong]
        try:
            handler(value)
        except ValidationError as exc:
            wrong += [
                InitErrorDetails(
                    type=PydanticCustomError(error["type"], error["msg"]),
                    loc=error["loc"],
                    input=error["input"],
                )
                for error in exc.errors()
                if not any(error["loc"][: len(loc)] == loc for loc in misread)
            ]
        # Raised as a ValidationError, each error with its place inside the field (`events[0]`), in the
        # order of the entries.
        wrong.sort(key=lambda error: _entry(error["loc"]))
        raise ValidationError.from_exception_data(cls.__name__, wrong)


# A type that brings one of these reads its input itself (a duration refuses a boolean with its own words).
_VALIDATORS = (BeforeValidator, PlainValidator, WrapValidator)


def _entry(loc: tuple[str | int, ...]) -> int:
    return loc[0] if loc and isinstance(loc[0], int) else -1


def _misread(value: Any, annotation: Any, loc: tuple[str | int, ...]) -> list[InitErrorDetails]:
    branches = _branches(annotation)
    if isinstance(value, list | dict):
        container = list if isinstance(value, list) else dict
        inner = [get_args(branch)[-1] for branch in branches if get_origin(branch) is container]
        if len(inner) != 1:
            return []  # not a container here: pydantic says so
        items = enumerate(value) if isinstance(value, list) else value.items()
        return [error for key, item in items for error in _misread(item, inner[0], (*loc, key))]
    kinds = {kind for branch in branches for kind in _kinds(branch)}
    if Any in kinds:
        return []
    if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
        message = f"{_yaml_boolean(value)}, not {_numbers(branches)}"
    elif isinstance(value, int | float) and not isinstance(value, bool) and kinds - {type(None)} == {bool}:
        message = f"the number {value}, not a boolean: write true or false"
    else:
        return []
    return [InitErrorDetails(type=PydanticCustomError("yaml_type", message), loc=loc, input=value)]


def _numbers(branches: list[Any]) -> str:
    """What a place that takes numbers takes. Quoting the word helps only where any text is taken: where the
    text is one of a few words (retry_on's `5xx`), the quoted word is refused all the same."""
    if str in branches:
        return "a number or text: quote it"
    words = [
        repr(choice)
        for branch in branches
        if get_origin(branch) is Literal
        for choice in get_args(branch)
        if isinstance(choice, str)
    ]
    return ", ".join(["a number", *words[:-1]]) + (f" or {words[-1]}" if words else "")


def _branches(annotation: Any) -> list[Any]:
    """`int | Literal["5xx"] | None` -> [int, Literal["5xx"], None]; Annotated types without a validator of
    their own are read as the type they annotate."""
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType:
        return [branch for arg in get_args(annotation) for branch in _branches(arg)]
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        return [Any] if any(isinstance(item, _VALIDATORS) for item in metadata) else _branches(base)
    return [annotation]


def _kinds(branch: Any) -> set[Any]:
    if get_origin(branch) is Literal:
        return {type(choice) for choice in get_args(branch)}
    return {branch}


def _network(entry: str) -> str:
    parse_networks([entry])
    return entry


# A CIDR, an address or a preset; each entry of a list is checked on its own, so every bad one is named by
# its index in one run (`allow_ips[2]: …`).
NetworkEntry = Annotated[str, AfterValidator(_network)]


def _unpadded_secret(secret: str) -> str:
    # A secret read from a file often keeps its newline, and then no signature ever matches: every webhook
    # is refused invalid_signature with nothing to say why. The secret is not shown. An empty entry
    # (`${OPTIONAL_KEY:-}` unset) is no secret at all, and dropped by the source.
    if secret.strip() and secret != secret.strip():
        raise ValueError("begins or ends with whitespace, such as a newline kept from a file: remove it")
    return secret


# Each entry checked on its own, so every padded one is named by its index (`secrets[2]: …`).
SecretEntry = Annotated[str, AfterValidator(_unpadded_secret)]


class Listener(Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class TLS(Strict):
    """Serve HTTPS on the webhook listener; the files are read again whenever the config is reloaded."""

    cert: str
    key: str


class IngressListener(Listener):
    # Proxies (CIDRs or presets) whose forwarding header is believed.
    trusted_proxies: list[NetworkEntry] = Field(default_factory=list)
    # The one header those proxies write; the other is the client's own and is never read.
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    tls: TLS | None = None
    # On SIGTERM, keep answering this long after /readyz turns 503, while the load balancer notices.
    drain_delay: Duration = 0.0
    # Connections open at once; past it, a new one is answered 503 and closed. Without a bound, a flood of
    # connections would take every file descriptor, and the store and the ops listener would fail with it.
    max_connections: int = Field(default=1024, gt=0)


class OpsListener(Listener):
    # Loopback by default: health, metrics and the admin API are not for the network unless asked.
    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535)
    # The admin API's bearer token; required unless the listener is bound to loopback.
    admin_token: str | None = Field(default=None, validate_default=True)

    @field_validator("admin_token")
    @classmethod
    def _required_off_loopback(cls, token: str | None, info: ValidationInfo) -> str | None:
        host = info.data.get("host")
        if token is not None and not token.strip():
            token = None  # `${HOOKYARD_ADMIN_TOKEN:-}` with the variable unset
        if token is not None and token != token.strip():
            # A token read from a file often keeps its newline: the bearer token sent (stripped, as any
            # header value is) would never match it, and every call would be 401. The token is not shown.
            raise ValueError("begins or ends with whitespace, such as a newline kept from a file: remove it")
        if token is not None and header_control_character(token) is not None:
            # Two lines of a file: no client can send it (a request header cannot hold a line break, and the
            # ops listener refuses any other control character), so every call would be 401.
            raise ValueError(
                "holds a line break or another control character, which no request header can carry: "
                "remove it"
            )
        if token is None and host is not None and not is_loopback(host):
            raise ValueError(
                f"required when the ops listener is not bound to loopback (ops.host is {host!r}): "
                'set admin_token: "${HOOKYARD_ADMIN_TOKEN}", or bind ops.host to 127.0.0.1'
            )
        return token


def _addresses(host: str) -> set[str] | None:
    """The addresses a listener on `host` binds, as far as the config can tell: None for every address.
    `localhost` binds both loopbacks; an address is compared as an address (`0:0:0:0:0:0:0:1` is ::1)."""
    if host.lower() == "localhost":
        return {"127.0.0.1", "::1"}
    try:
        address = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return {host.lower()} if host else None  # a name: compared as written
    return None if address in ("0.0.0.0", "::") else {address}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":  # host names are not case-sensitive
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack socket reports it
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


SQLITE_URL_FORMS = "sqlite:///relative/path.db or sqlite:////absolute/path.db"


def is_sqlite_url(url: str) -> bool:
    return url.partition(":")[0].lower() == "sqlite"  # a URL's scheme is not case-sensitive


def sqlite_path(url: str) -> str:
    """The file a SQLite URL names, as storage.url and the store action read it: sqlite:///relative/path.db
    or sqlite:////absolute/path.db. ValueError, not repeating the URL, for one that names no file: no
    path, or a directory (ending in '/', '.' or '..'), which SQLite fails on only when it opens it."""
    if not is_sqlite_url(url):
        raise ValueError(f"not a SQLite URL: {SQLITE_URL_FORMS}")
    rest = url.partition(":")[2]
    path = rest.removeprefix("///") if rest.startswith("///") else ""
    if path.rpartition("/")[2] in ("", ".", ".."):
        raise ValueError(f"names no file: {SQLITE_URL_FORMS}")
    return path


class StorageConfig(Strict):
    url: str = "sqlite:///./var/hookyard.db"
    # An event is deleted, with its deliveries and attempts, once every delivery is final (delivered, dead,
    # skipped) and the last ended this long ago; None (off) keeps every event. 7 days: longer than the
    # providers' own retries (Stripe's run for up to 3 days), so a late resend of an id is still a duplicate,
    # and a week to notice and replay a dead delivery.
    retention: Retention = 7 * 86400.0

    @field_validator("url")
    @classmethod
    def _supported(cls, url: str) -> str:
        problem = url_text_problem(url)
        if problem is not None:
            raise ValueError(problem)  # not the URL: `check` refuses a postgresql:// one, password and all
        if not is_sqlite_url(url):
            raise ValueError("only sqlite:///path/to/file.db is supported for the gateway's own store")
        # `serve` and the operator commands would fail on one that names no file (with a traceback, or
        # `cannot open /`), after `check` said it was fine.
        try:
            sqlite_path(url)
        except ValueError as exc:
            raise ValueError(f"{url!r} {exc}") from None  # a SQLite URL holds no password
        return url


class Limits(Strict):
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    max_headers: int = Field(default=100, gt=0)
    max_header_bytes: int = Field(default=16 * 1024, gt=0)
    # A body that takes longer than this to arrive is cut off with 408 (slow clients hold workers).
    read_timeout: PositiveDuration = 10.0
    # A keep-alive connection with no request for this long is closed. Behind a load balancer that reuses
    # its connections, set it above the balancer's own idle timeout, so the gateway never closes one the
    # balancer is about to send on. Not 0: the connection would close under a client about to reuse it.
    idle_timeout: PositiveDuration = 5.0
    # Webhook requests in progress at once; past it, 503 at once instead of a growing pile.
    max_concurrent_requests: int = Field(default=512, gt=0)


def _failing_status(status: int | str) -> int | str:
    # A 2xx is delivered before retry_on is read, and no answer has a status past 599: such an entry (a
    # typo such as 5003) would be taken and never match. Checked entry by entry, so that a wrong word in
    # another entry does not keep it from being read.
    if isinstance(status, int) and not 300 <= status <= 599:
        raise ValueError(f"{status}: not a status an attempt fails with; give 300 to 599, '4xx' or '5xx'")
    return status


RetryStatus = Annotated[int | Literal["5xx", "4xx"], AfterValidator(_failing_status)]
_RETRY_ON: list[RetryStatus] = [408, 429, "5xx"]


class RetryPolicy(Strict):
    """When a failed attempt is tried again: after each delay of the schedule in turn, then dead."""

    schedule: list[Duration] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 3600.0])
    jitter: float = Field(default=0.1, ge=0, le=1)
    # HTTP statuses worth another attempt; any other non-2xx answer ends the delivery dead at once.
    retry_on: list[RetryStatus] = Field(default_factory=lambda: list(_RETRY_ON))

    def retries_status(self, status: int) -> bool:
        family = f"{status // 100}xx"
        return status in self.retry_on or family in self.retry_on


class Defaults(Strict):
    retry: RetryPolicy = RetryPolicy()
    timeout: PositiveDuration = 30.0


class DeliveryEngine(Strict):
    """How the delivery workers run."""

    concurrency: int = Field(default=64, ge=1)
    # A claimed delivery is invisible to other workers this long; after a crash it is claimed again.
    lease: PositiveDuration = 120.0
    poll_interval: PositiveDuration = 1.0
    # On SIGTERM, running deliveries get this long to finish; the rest are released for the next start.
    # With the listeners' own drains (gateway.app) the whole shutdown stays within about 15 s.
    shutdown_timeout: Duration = 8.0


class Reload(Strict):
    """Hot reload: the config file is watched (by content, so a ConfigMap's symlink swap is seen) and
    re-read on SIGHUP; an invalid new config is refused and the old one keeps serving."""

    watch: bool = True
    interval: PositiveDuration = 2.0


class LogConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class Source(Strict):
    path: str
    provider: str
    secrets: list[SecretEntry] = Field(default_factory=list)
    tolerance: Duration = 300.0
    insecure: bool = False
    # enforce: reject bad signatures. log-only (for migrations): log and count them, accept the event
    # marked unverified.
    verify: Literal["enforce", "log-only"] = "enforce"
    # Networks (CIDRs, addresses or presets such as `svix`) allowed to send to this source; empty = all.
    allow_ips: list[NetworkEntry] = Field(default_factory=list)
    # Provider-specific settings, validated by the provider itself.
    options: dict[str, Any] = Field(default_factory=dict)
    # secrets[i] is the file's secrets[_secret_places[i]]: the empty entries are dropped.
    _secret_places: tuple[int, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _places_of_secrets(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        source = handler(data)
        written = data.get("secrets") if isinstance(data, dict) else None
        if isinstance(written, list):
            source._secret_places = tuple(
                index for index, secret in enumerate(written) if isinstance(secret, str) and secret.strip()
            )
        return source

    def secret_place(self, index: int) -> int:
        """Where secrets[index] is in the file, for errors a reader can find (`secrets[2]`)."""
        places = self._secret_places
        return places[index] if 0 <= index < len(places) else index

    @field_validator("tolerance")
    @classmethod
    def _at_least_a_second(cls, tolerance: float) -> float:
        # Signed timestamps are whole seconds and `now` is not: below 1 s, genuine webhooks with a perfect
        # clock are refused (at 0, every one of them) as timestamp_out_of_tolerance.
        if tolerance < 1:
            raise ValueError(
                f"{tolerance:g}s refuses genuine webhooks: signed timestamps are whole seconds; "
                "use at least 1s (the default is 5m)"
            )
        return tolerance

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with /")
        # Matched against the path as decoded from the request line: a query, a fragment or a %-escape
        # in it could never match.
        if any(char in path for char in "?#%"):
            raise ValueError(f"path {path!r}: write it without ?, # or %-escapes")
        return path

    @field_validator("secrets")
    @classmethod
    def _drop_empty(cls, secrets: list[str]) -> list[str]:
        # `${OPTIONAL_KEY:-}` expands to "" when unset: such a slot is simply not configured.
        return [secret for secret in secrets if secret.strip()]


class ActionConfig(Strict):
    id: str | None = None
    use: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    after: str | None = None
    when: Literal["success", "failure", "always"] | None = None
    retry: RetryPolicy | None = None
    timeout: PositiveDuration | None = None
    concurrency: int | None = Field(default=None, ge=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("id")
    @classmethod
    def _named(cls, name: str | None) -> str | None:
        # `id: ""` (or a `${VAR:-}` left empty) would key the action by its `use` without a word: an
        # `after:` or a `replay --action` naming the id meant would not find it.
        if name is not None and not name.strip():
            raise ValueError("is empty: give the action an id, or leave id out to key it by its use")
        return name

    @property
    def key(self) -> str:
        return self.id or self.use


class Route(Strict):
    name: str
    source: str
    events: list[str | int] = Field(default_factory=lambda: list[str | int](["*"]), min_length=1)
    filter: dict[str, Any] | None = None
    actions: list[ActionConfig] = Field(min_length=1)

    @field_validator("events", mode="before")
    @classmethod
    def _some_events(cls, events: Any) -> Any:
        # Before the list's own check (min_length, kept for the JSON schema), which says it in pydantic's
        # words. An empty list would route nothing; what was meant is most often every event.
        if events == []:
            raise ValueError(
                "an empty list matches no event: leave events out to match every event, or list the types to match"
            )
        return events

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        # It labels the route's metrics and logs, and names it to `replay --route`.
        if not name.strip():
            raise ValueError("is empty: give the route a name")
        return name


class Config(Strict):
    listen: IngressListener = IngressListener()
    ops: OpsListener = OpsListener()
    storage: StorageConfig = StorageConfig()
    limits: Limits = Limits()
    defaults: Defaults = Defaults()
    delivery: DeliveryEngine = DeliveryEngine()
    log: LogConfig = LogConfig()
    reload: Reload = Reload()
    sources: dict[str, Source] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)

    @field_validator("sources")
    @classmethod
    def _named(cls, sources: dict[str, Source]) -> dict[str, Source]:
        # A source's name labels its metrics: an empty one reads as `source=""`, the label of requests to a
        # path no source has.
        if any(not name.strip() for name in sources):
            raise ValueError("a source name is empty: give each source a name")
        return sources

    @model_validator(mode="after")
    def _listeners_apart(self) -> Self:
        # `serve` would fail to bind the second one; `check` should say so first. Port 0 picks a free port.
        listen, ops = self.listen, self.ops
        listen_on, ops_on = _addresses(listen.host), _addresses(ops.host)
        same_host = listen_on is None or ops_on is None or bool(listen_on & ops_on)
        if listen.port and listen.port == ops.port and same_host:
            message = (
                f"listen and ops both use port {listen.port} on {listen.host} and {ops.host}: give ops "
                "another port"
            )
            # At ops.port, as every error names its place (a ValueError here would name none).
            clash = PydanticCustomError("listeners_apart", message)
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type=clash, loc=("ops", "port"), input=ops.port)]
            )
        return self


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_config(
    path: str | Path, environ: dict[str, str] | None = None, *, allow_empty: bool = True
) -> Config:
    """Read, interpolate and validate a config file; raises ConfigError listing every problem.

    allow_empty: False for a hot reload, where an empty file (or one of only comments) is one caught as it is
    written in place (a write truncates it first), not a config with no sources to switch to."""
    return load_config_tree(path, environ, allow_empty=allow_empty)[0]


def load_config_tree(
    path: str | Path, environ: dict[str, str] | None = None, *, allow_empty: bool = True
) -> tuple[Config, dict[str, Any]]:
    """load_config, and the file as read: what in_file_order puts later checks' errors in order by."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        # A file saved in another encoding: an error naming the file, not a traceback (and, on a hot
        # reload, not an exception that would end the watcher).
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8"]) from None
    if not allow_empty and not text.strip():
        raise ConfigError([f"{path}: the file is empty"])
    return _parse_config_tree(text, environ, str(path), allow_empty=allow_empty)


# How _interpolate says a variable is unset: `PLACE: environment variable NAME is not set (…)`.
_UNSET = re.compile(r"(?P<place>[^:]+): environment variable (?P<name>\w+) is not set ")


def load_config_for(path: str | Path, needs: Collection[str]) -> tuple[Config, dict[str, str]]:
    """The config as far as the places in `needs` go (`storage`, `sources.consignly`, `listen`), for the
    commands that need nothing else (listing and replaying stored events, signing a source's test event).
    A ${VAR} left unset outside them, which an operator's shell need not hold (another source's secret,
    the admin token, a chat webhook's URL), is no error here: the answer is the parts of the config that
    are valid, defaults standing in for the rest, with those variables by name, each with the place it is
    in (never a value). Anything else wrong with the file, a variable unset in one of `needs` included,
    raises the ConfigError load_config does."""
    try:
        return load_config(path), {}
    except ConfigError as exc:
        if exc.partial is None:
            raise
        unset: dict[str, str] = {}
        places: set[str] = set()
        for error in exc.errors:
            match = _UNSET.match(error)
            if match is not None and not _inside(match["place"], needs):
                unset.setdefault(match["name"], match["place"])
                places.add(match["place"])
        # What is left is wrong whatever the environment holds, or is about a place that is needed.
        if any(not _follows_from(error, places) for error in exc.errors):
            raise
        return exc.partial.config, unset


def _inside(place: str, sections: Collection[str]) -> bool:
    """Whether a place as format_location writes it is one of `sections` or inside one. (A source whose
    name has a dot reads as inside another's: `sources.a.b.secrets[0]` as in `sources.a`; that only makes
    an unset variable an error where it need not be.)"""
    return any(place == section or place.startswith((f"{section}.", f"{section}[")) for section in sections)


# The tags that make a value of a kind no setting takes, with what each makes. PyYAML's safe loader makes them
# all, and pydantic takes some without a word: `!!binary` bytes as the text they decode to (a secret, a URL),
# a `!!set` as a list in no order; in a plugin's options or a filter they would reach code that expects JSON.
_UNTAKEN_TAGS = {
    "tag:yaml.org,2002:binary": ("bytes", "write the text it encodes"),
    "tag:yaml.org,2002:timestamp": ("a date", "write the date as quoted text"),
    "tag:yaml.org,2002:set": ("a set", "write a list"),
    "tag:yaml.org,2002:omap": ("a list of pairs", "write a mapping"),
    "tag:yaml.org,2002:pairs": ("a list of pairs", "write a mapping"),
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key written twice in one mapping is an error: PyYAML would keep the last
    one without a word (a copied source whose name was left unchanged would replace the first); and so is a
    tag of _UNTAKEN_TAGS, written in the file (a date YAML reads as such untagged is left to validation,
    which says where text is wanted)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if not self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            written = getattr(event, "tag", None) or ""
            untaken = _UNTAKEN_TAGS.get(written)
            if untaken is not None:
                made, instead = untaken
                tag = "!!" + written.removeprefix("tag:yaml.org,2002:")
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"the tag {tag} makes {made}, which no setting takes: {instead}",
                    event.start_mark,
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then an explicit key: overriding a merged key is what merges are for
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable: the base constructor reports it
            if first is not None:
                # Where it was first written: of two copies of a source, the one to rename may be either.
                raise yaml.constructor.ConstructorError(
                    "first written", first, f"duplicate key {key!r}", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """PyYAML's error on one line, its place as a line and column of the file. Its own text spans several
    lines, quotes the file's lines and names the file `<unicode string>`: `hookyard check` prints one
    error a line, and the reload log keeps the errors in one field."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark, context = exc.problem_mark, exc.context_mark
        if _at_a_tab(mark):
            # PyYAML says `found character '\t' that cannot start any token`: a tab is invisible in most
            # editors, and an indentation that looks right gives no clue to it.
            return (
                f"line {mark.line + 1}, column {mark.column + 1}: a tab, where YAML takes only spaces "
                "(to indent, and after a key's colon): replace it with spaces"
            )
        message = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and context is not None and (context.line, context.column) != (mark.line, mark.column):
            message += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
        elif exc.context:
            message += f" ({exc.context})"
        return message
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        # A character YAML does not allow (a NUL, say): given by its position in the text.
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return f"line {line}, column {column}: character #x{exc.character:04x} is not allowed in YAML"
    return " ".join(str(exc).split())


def _at_a_tab(mark: yaml.Mark) -> bool:
    buffer = mark.buffer
    return isinstance(buffer, str) and buffer[mark.pointer : mark.pointer + 1] == "\t"


def parse_config(text: str, *, environ: dict[str, str] | None = None, origin: str = "<config>") -> Config:
    return _parse_config_tree(text, environ, origin)[0]


def _parse_config_tree(
    text: str, environ: dict[str, str] | None, origin: str, *, allow_empty: bool = True
) -> tuple[Config, dict[str, Any]]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError([f"{origin}: not valid YAML: {_yaml_error(exc, text)}"]) from None
    if raw is None and not allow_empty:
        # Only comments: the first lines of a file being written in place, as empty as an empty file.
        raise ConfigError([f"{origin}: the file holds no config, only comments"])
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{origin}: the top level must be a mapping"])
    _check_expanded_size(raw, origin)
    errors: list[str] = []
    expanded = _interpolate(raw, os.environ if environ is None else environ, (), errors)
    expanded_badly = frozenset(error.partition(": ")[0] for error in errors)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        # A value whose ${VAR} could not be expanded is wrong for that reason alone: what validation says
        # of the text left in its place (`only sqlite:///… is supported`) would point away from it.
        shape = [
            e
            for e in format_validation_errors(exc, model=Config)
            if e.partition(": ")[0] not in expanded_badly
        ]
        raise ConfigError(
            in_file_order(errors + shape, expanded), _validated_parts(expanded), expanded, expanded_badly
        ) from None
    if errors:
        partial = PartialConfig(config, tuple(range(len(config.routes))))
        raise ConfigError(errors, partial, expanded, expanded_badly)
    return config, expanded


def in_file_order(errors: list[str], tree: dict[str, Any]) -> list[str]:
    """The errors in the order of the places they name in the file, whatever found them: pydantic reports
    a mapping's fields in the order its model declares them and unknown keys last, and the checks run one
    after another. A key that is missing comes after those its mapping has, and an error naming no place
    of the file after all the others; errors at one place keep their order."""
    return sorted(errors, key=lambda error: _position(error.partition(": ")[0], tree))


def _position(place: str, tree: Any) -> tuple[int, ...]:
    """Where a place as format_location writes it is in the tree: the index of each key among its
    mapping's keys (the file's order: YAML mappings load in order) and of each list entry."""
    position: list[int] = []
    node, rest = tree, place
    while rest:
        step = _step(node, rest)
        if step is None:
            # Not in the file: after everything the nearest place that is holds.
            position.append(len(node) if isinstance(node, dict | list) else 0)
            break
        index, child, length = step
        position.append(index)
        node, rest = child, rest[length:].removeprefix(".")
    return tuple(position)


def _step(node: Any, rest: str) -> tuple[int, Any, int] | None:
    """(index, value, length of its name in `rest`) of the entry of `node` that `rest` begins with."""
    if isinstance(node, list):
        match = re.match(r"\[(\d+)\]", rest)
        if match is None or int(match[1]) >= len(node):
            return None
        return int(match[1]), node[int(match[1])], match.end()
    if not isinstance(node, dict):
        return None
    # The longest name that matches: a key may hold a dot (`with: {a.b: 1}`).
    found = [
        (index, value, len(str(key)))
        for index, (key, value) in enumerate(node.items())
        if rest == str(key) or rest.startswith((f"{key}.", f"{key}["))
    ]
    return max(found, key=lambda entry: entry[2], default=None)


# A config file holds hundreds of values; YAML aliases could make it expand to billions.
MAX_CONFIG_VALUES = 100_000


def _check_expanded_size(raw: Any, origin: str) -> None:
    """Refuse a tree that YAML aliases make endless (an anchor used inside itself) or huge ("billion
    laughs": each level ten aliases of the one before), before anything walks it: the walk would fail
    with a RecursionError, or take the event loop for minutes during a hot reload."""
    count, path = 0, set()
    stack: list[tuple[Any, bool]] = [(raw, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            path.discard(id(node))
            continue
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                [f"{origin}: more than {MAX_CONFIG_VALUES:,} values once its YAML aliases are expanded"]
            )
        if isinstance(node, dict | list):
            if id(node) in path:
                raise ConfigError(
                    [f"{origin}: a YAML alias is used inside what it names: the config never ends"]
                )
            path.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in (node.values() if isinstance(node, dict) else node))


@dataclass(frozen=True)
class PartialConfig:
    """The parts of an invalid config that are valid on their own; defaults stand in for the rest."""

    config: Config
    # config.routes[i] is routes[route_places[i]] of the file, so later errors name the right place.
    route_places: tuple[int, ...]
    # Sources in the file whose own shape is invalid: routes naming them are checked, not built.
    unchecked_sources: frozenset[str] = frozenset()


def _validated_parts(expanded: dict[str, Any]) -> PartialConfig | None:
    def valid(part: dict[str, Any]) -> bool:
        try:
            Config.model_validate(part)
        except ValidationError:
            return False
        return True

    sections = {
        key: value
        for key, value in expanded.items()
        if key in Config.model_fields and key not in ("sources", "routes") and valid({key: value})
    }
    sources, routes = expanded.get("sources"), expanded.get("routes")
    sources = sources if isinstance(sources, dict) else {}
    routes = routes if isinstance(routes, list) else []
    good_sources = {name: item for name, item in sources.items() if valid({"sources": {name: item}})}
    places = tuple(index for index, route in enumerate(routes) if valid({"routes": [route]}))
    unchecked = {name for name in sources if name not in good_sources}
    if "sources" in expanded and not isinstance(expanded["sources"], dict):
        unchecked |= {
            route["source"]
            for route in routes
            if isinstance(route, dict) and isinstance(route.get("source"), str)
        }
    try:
        config = Config.model_validate(
            {**sections, "sources": good_sources, "routes": [routes[index] for index in places]}
        )
    except ValidationError:  # pragma: no cover - each part validated on its own
        return None
    return PartialConfig(config, places, frozenset(map(str, unchecked)))


def format_validation_errors(
    exc: ValidationError, prefix: tuple[str | int, ...] = (), model: type[BaseModel] | None = None
) -> list[str]:
    """One line per error, each naming its place (`prefix` before the places of `model`'s own fields); an
    unknown key that is a typo of one `model` takes there says which."""
    lines: list[str] = []
    errors = exc.errors()
    unions = _union_misses(errors)
    for error in errors:
        loc = prefix + tuple(error["loc"])
        place = format_location(loc)
        message = error["msg"].removeprefix("Value error, ")
        miss = unions.get(tuple(error["loc"][:-1])) if _is_branch(error["loc"]) else None
        if miss is not None:
            # A value of none of the kinds a union takes: one line, not one per kind, each wrong on its own.
            message = miss
        elif len(loc) >= 2 and loc[-1] == "[key]" and error["type"] == "string_type":
            # A name YAML read as something else: `no:` or `on:` is a boolean, `2026-01-01:` a date.
            # pydantic would say `sources[0].[key]: Input should be a valid string`.
            place, message = format_location(loc[:-2]), _not_text(error["input"])
        elif error["type"] == "invalid_key":
            # The same of a key of a section (`listen: {on: …}`, `1:` at the top level): pydantic said
            # `listen[1]: Keys should be strings`, the key put as an index of the mapping it is in.
            place, message = format_location(loc[:-1]), _not_text(error["input"])
        elif error["type"] == "string_type" and not isinstance(error["input"], list | dict | None):
            # A value YAML read as something else (`127`, `off`, `2026-01-01`), here and in a plugin's
            # options alike. Its kind, not the value: it may be a secret.
            message = f"{_read_as(error['input'])}, not text: quote it"
        elif error["type"] in _SCALARS:
            # pydantic says `Input should be a valid integer, unable to parse string as an integer`. The
            # value is not shown, as for text: a plugin's option may hold a secret.
            kind, unreadable = _SCALARS[error["type"]]
            message = f"must be {kind}" + (
                f"; the text given does not read as {unreadable}"
                if unreadable
                else f", not {_kind_of(error['input'])}"
            )
        elif error["type"] == "int_from_float":
            message = "must be an integer, not a number with a fraction"
        elif error["type"] in _SHAPES:
            # pydantic says `Input should be a valid dictionary or instance of Route`: a class name that is
            # nowhere in the file. The value is not shown: it may be a secret (`secrets: s3cret`).
            message = f"must be {_SHAPES[error['type']]}, not {_kind_of(error['input'])}"
        elif error["type"] == "too_short" and error["input"] == []:
            message = "an empty list: give at least one"
        elif error["type"] == "missing":
            message = "field required"
        elif error["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(loc[-1]), _keys_at(model, tuple(error["loc"][:-1])))
        line = f"{place}: {message}" if place else message
        if line not in lines:
            lines.append(line)
    return lines


def did_you_mean(word: str, choices: Collection[str]) -> str:
    """` (did you mean NAME?)` for the choice closest to a word that is none of them, or nothing: a typo
    (`limts:`, `use: forwrd`) is most often why a key or a name is unknown."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _keys_at(model: type[BaseModel] | None, loc: tuple[str | int, ...]) -> list[str]:
    """The keys of the mapping at `loc` of `model`'s input, as the file writes them (`with`, not `with_`);
    none where the place is not a model's mapping (a union's branch, whose name pydantic puts in loc)."""
    annotation: Any = model
    try:
        for step in loc:
            annotation = _inside_of(annotation, step)
        return [
            field.alias or name
            for branch in _members(annotation)
            if isinstance(branch, type) and issubclass(branch, BaseModel)
            for name, field in branch.model_fields.items()
        ]
    except Exception:  # a plugin's Options may be typed in ways not foreseen: the hint is only a hint
        return []


def _inside_of(annotation: Any, step: str | int) -> Any:
    """The annotation of what `step` names inside a value of `annotation`: a model's field, a mapping's
    value, a list's entry."""
    for branch in _members(annotation):
        if isinstance(branch, type) and issubclass(branch, BaseModel) and isinstance(step, str):
            for name, field in branch.model_fields.items():
                if step in (name, field.alias):
                    return field.annotation
        elif get_origin(branch) is dict and isinstance(step, str) and len(get_args(branch)) == 2:
            return get_args(branch)[1]
        elif get_origin(branch) is list and isinstance(step, int) and len(get_args(branch)) == 1:
            return get_args(branch)[0]
    return None


def _members(annotation: Any) -> list[Any]:
    """`A | B | None` -> [A, B, None], Annotated types read as the type they annotate."""
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    return [annotation]


# What a branch of a union takes, by the type of error pydantic gives for a value it does not take.
_KINDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "string_type": "text",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
}


def _is_branch(loc: Any) -> bool:
    """The error is one branch of a union refusing the value at loc[:-1]."""
    return bool(loc) and isinstance(loc[-1], str) and _UNION_BRANCHES.match(loc[-1]) is not None


def _union_misses(errors: list[Any]) -> dict[tuple[Any, ...], str]:
    """`must be an integer, '5xx' or '4xx'` for each place whose value no branch of its union took, by the
    place (the errors' loc without the branch). A place where a branch said more than "not my kind" is left
    out: that branch's own words are clearer."""
    by_place: dict[tuple[Any, ...], list[Any]] = {}
    for error in errors:
        if _is_branch(error["loc"]):
            by_place.setdefault(tuple(error["loc"][:-1]), []).append(error)
    misses = {}
    for place, refusals in by_place.items():
        types = [error["type"] for error in refusals]
        if len(refusals) < 2 or not all(kind in _KINDS or kind == "literal_error" for kind in types):
            continue
        kinds = [
            error["msg"].removeprefix("Input should be ")
            if error["type"] == "literal_error"
            else _KINDS[error["type"]]
            for error in refusals
        ]
        text = ", ".join(kinds[:-1]) + (", " if " or " in kinds[-1] else " or ") + kinds[-1]
        if "literal_error" not in types:
            # Its kind, not the value (it may be a secret). Not where a kind is a word: the value is text then.
            text += f", not {_kind_of(refusals[0]['input'])}"
        misses[place] = f"must be {text}"
    return misses


# A value of the wrong kind where one kind is taken: (what is taken, what text given does not read as).
_SCALARS = {
    "int_type": ("an integer", ""),
    "float_type": ("a number", ""),
    "bool_type": ("true or false", ""),
    "int_parsing": ("an integer", "one"),
    "float_parsing": ("a number", "one"),
    "bool_parsing": ("true or false", "either"),
}

_SHAPES = {
    "model_type": "a mapping (key: value)",
    "dict_type": "a mapping (key: value)",
    "list_type": "a list",
}


def _kind_of(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _yaml_boolean(value: bool) -> str:
    return f"the boolean {str(value).lower()} (as YAML reads yes, no, on and off)"


def _read_as(value: Any) -> str:
    return _yaml_boolean(value) if isinstance(value, bool) else _kind_of(value)


def _not_text(key: Any) -> str:
    if isinstance(key, bool):
        kind = _yaml_boolean(key)
    elif isinstance(key, int | float):
        kind = f"the number {key}"
    elif key is None:
        kind = "null (~, null, or nothing before the colon)"  # not Python's NoneType
    else:
        kind = f"a {type(key).__name__} ({key})"
    return f"a name that YAML reads as {kind}, not text: quote it"


# The names pydantic gives to the branches of a union: not places in the file.
_UNION_BRANCHES = re.compile(r"^(str|int|float|bool|literal\[.*\]|function-.*)$")


def format_location(loc: tuple[str | int, ...]) -> str:
    """('routes', 1, 'actions', 0, 'with', 'url') -> routes[1].actions[0].with.url"""
    text = ""
    for part in loc:
        if isinstance(part, str) and _UNION_BRANCHES.match(part):
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + ("with" if part == "with_" else str(part))
    return text


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
# `${NAME` with no `}` after it: a typo that would otherwise be taken as literal text, which for a token
# or a secret means a value anyone can guess.
_UNCLOSED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?=[^}]*$)")
# `${NAME` followed by anything but `}` or `:-`: a shell form this does not support (`${NAME-default}`,
# `${NAME:?message}`, `${NAME:=default}`), which would otherwise be kept as literal text, as above.
_UNSUPPORTED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*+(?!\}|:-)")
# A reference in a default (`${NAME:-${OTHER}}`): nested defaults are not supported, as above.
_NESTED = re.compile(r"\$\{[A-Za-z_]")


def _interpolate(value: Any, environ: Any, loc: tuple[str | int, ...], errors: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of the parsed tree (not in the raw text, so that
    a value can never change the YAML structure)."""
    if isinstance(value, dict):
        return {key: _interpolate(item, environ, (*loc, key), errors) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, environ, (*loc, index), errors) for index, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if _UNCLOSED.search(value):
        # The value is not shown: it may be a secret.
        errors.append(
            f"{format_location(loc)}: a ${{NAME}} reference is not closed with }} (text that must hold "
            "such a thing can come from a variable, whose value is taken as it is)"
        )
        return value
    if _UNSUPPORTED.search(value):
        errors.append(
            f"{format_location(loc)}: only ${{NAME}} and ${{NAME:-default}} are supported (not the shell's "
            "${NAME-default}, ${NAME:?message} or ${NAME:=default})"
        )
        return value
    if any(_NESTED.search(match.group(2) or "") for match in _VARIABLE.finditer(value)):
        # The default ends at the first `}`: the shell's `${TOKEN:-${FALLBACK}}` would be the text
        # `${FALLBACK}`, whatever the environment holds.
        errors.append(
            f"{format_location(loc)}: the default of a ${{NAME:-default}} cannot hold another ${{NAME}} "
            "(nested defaults are not supported): give the value of the one in the default as the default itself"
        )
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        # As in the shell: `:-` uses the default when the variable is unset or empty.
        if environ.get(name):
            return str(environ[name])
        if default is not None:
            return default
        if name in environ:
            return ""
        errors.append(f"{format_location(loc)}: environment variable {name} is not set (and has no default)")
        return ""

    return _VARIABLE.sub(substitute, value)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of routes.yaml, for editors."""
    schema = Config.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Hookyard routes.yaml"
    return schema
