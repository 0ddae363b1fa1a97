"""The local service the browser extension talks to: `agent serve` (aiohttp).

It listens on 127.0.0.1 and ::1 only, on port 47830 (`--port`, `$AGENT_PORT`), with one user's key
unlocked in memory for as long as it runs. docs/design.md ("Local service") has the API and the
threat model; in short, every web page the user opens can send requests to a loopback server, so:

* the `Host` header must name the loopback (127.0.0.1, localhost, [::1], or a name given with
  `--host-check`) with the port the connection arrived on, which defeats DNS rebinding (a page on
  evil.example whose name now points at 127.0.0.1 still says `Host: evil.example:47830`);
* a request with a web page's `Origin` (http, https, null, file...) is refused outright; only
  `chrome-extension://` and `moz-extension://` origins are let through, and CORS headers are given
  only to origins that hold a live token (and, to pair, to any extension);
* everything but `GET /v1/status` needs the bearer token that pairing gave (`agent pair`,
  `POST /v1/pair`, agent/service/pairing.py), sent from the origin it was paired with;
* bodies, pixels and request rates are bounded, and inference runs in a worker pool behind a
  bounded queue: when the queue is full the answer is 503 with `Retry-After`, never a backlog.

Errors are JSON `{"code": ..., "message": ...}` with a 4xx/5xx status. One log line per request
(JSON: request id, method, path, status, duration, token id): never a query string, a body, a
token, a code or a file name.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from . import __version__, images, pipeline
from . import store as db
from .batching import Accelerator
from .keys import UserKeys
from .pipeline import ProtectOptions
from .store import DatabaseLockedError, ProvenanceError
from .service import jobs, models, pairing
from .service.home import LOCK_WAIT, AgentBusyError, ServiceError, database, resolve_user, unlock
from .service.protect import protect_bytes
from .surrogate import surrogate

DEFAULT_PORT = 47830
PORT_ENV = "AGENT_PORT"
API_VERSION = 1
LOOPBACK_HOSTS = ("127.0.0.1", "::1")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
RECORDS_LIMIT, RECORDS_MAX = 20, 100
MAX_JSON = 4096
MAX_NAME = 255
MAX_SITE = 2048
IMAGE_FIELD = "image"
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "HEIF": "image/heic"}
EXPOSED_HEADERS = "X-Agent-Record, X-Request-Id, Retry-After, X-Retry-After-Ms, X-Agent-Ticket"
ALLOWED_HEADERS = "Authorization, Content-Type, X-File-Name, X-Site, X-Agent-Ticket"
TICKET_HEADER = "X-Agent-Ticket"

log = logging.getLogger("agent.server")


@dataclass(frozen=True)
class ServerOptions:
    """Limits and sizes of the service. `workers` protect at once (torch already spreads one
    protection over the cores, so more than one mostly adds memory); `queue` more may wait; beyond
    that, 503. `rate` requests per second per token on average, `burst` at once. `device` runs the
    networks; `micro_batch` > 1 lets up to that many workers' images share one forward pass
    (`batching.py`; worth it on a GPU, where it wants as many workers)."""

    max_body: int = 64 * 1024 * 1024
    max_pixels: int = images.MAX_PIXELS
    workers: int = 1
    queue: int = 4
    rate: float = 4.0
    burst: int = 16
    shutdown_timeout: float = 60.0
    # a connection whose request headers are not complete this long after it opened (or after its
    # last answer) is closed; a body not complete this long after its headers gets 408
    header_timeout: float = 15.0
    body_timeout: float = 60.0
    hosts: tuple[str, ...] = ()  # host names accepted besides the loopback's own
    device: str = "cpu"
    micro_batch: int = 1
    micro_batch_wait: float = 0.005  # how long the first image of a batch waits for others

    def __post_init__(self) -> None:
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        for name in ("max_body", "max_pixels", "workers", "burst", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.queue < 0:
            raise ValueError(f"queue must not be negative, got {self.queue}")
        if not self.micro_batch_wait >= 0:
            raise ValueError(f"micro_batch_wait must not be negative, got {self.micro_batch_wait}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ApiError(Exception):
    """An answer other than success: becomes `{"code", "message"}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (HTTP's unit), and to the millisecond for clients that read
    X-Retry-After-Ms (the extension): a protection takes a fraction of a second."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "X-Retry-After-Ms": str(max(1, round(seconds * 1000)))}


class WaitingLine:
    """The clients the full queue turned away, first come first served. Each gets a ticket
    (X-Agent-Ticket); sent back with its request, the ticket goes in before everyone who came
    after it. A request without one from a client (a token) that holds a ticket takes the
    client's oldest: a client that does not send tickets back still keeps its place rather than
    queueing behind its own earlier tries. A ticket not used by its expiry (the wait it was
    told, plus a grace) is dropped, so a client that gave up holds nobody back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._held: dict[str, tuple[float, str | None]] = {}  # ticket -> (expiry, client), in arrival order

    def __len__(self) -> int:
        self._drop_expired()
        return len(self._held)

    def _drop_expired(self) -> None:
        now = self.clock()
        for ticket in [t for t, (expiry, _) in self._held.items() if expiry < now]:
            del self._held[ticket]

    def find(self, ticket: str | None, client: str | None = None) -> str | None:
        """The live ticket a request holds: its own, else its client's oldest, else None."""
        self._drop_expired()
        if ticket in self._held:
            return ticket
        return next((t for t, (_, owner) in self._held.items() if client is not None and owner == client), None)

    def position(self, ticket: str | None) -> int:
        """How many wait ahead of a live ticket (`find`); everyone in line for None."""
        tickets = list(self._held)
        return tickets.index(ticket) if ticket in self._held else len(tickets)

    def keep(self, ticket: str | None, client: str | None, expires_in: float) -> str:
        """The live ticket (a new one, last in line, for None), valid `expires_in` seconds more."""
        if ticket not in self._held:
            ticket = secrets.token_hex(8)
        self._held[ticket] = (self.clock() + expires_in, client)
        return ticket

    def leave(self, ticket: str | None) -> None:
        self._held.pop(ticket, None)


class TokenBucket:
    """Per-client rate limit: each key (a token id) earns `rate` requests a second up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._levels: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float | None:
        """None if a request may go ahead now, else the seconds until one may."""
        now = self.clock()
        level, then = self._levels.get(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - then) * self.rate)
        if level < 1.0:
            self._levels[key] = (level, now)
            return (1.0 - level) / self.rate
        self._levels[key] = (level - 1.0, now)
        return None


# ---------------------------------------------------------------- the checks every request passes

def _host_allowed(request: web.Request, names: frozenset[str]) -> bool:
    """The Host header names the loopback (or an allowed name) with the port this connection
    arrived on."""
    hosts = request.headers.getall("Host", [])
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if len(hosts) != 1 or not sockname:
        return False
    name, _, port = hosts[0].lower().rpartition(":")
    return name in names and port == str(sockname[1])


@web.middleware
async def _outermost(request: web.Request, handler) -> web.StreamResponse:
    """Request id, errors as JSON, CORS headers where an inner layer allowed them, the log line."""
    request_id = secrets.token_hex(8)
    started = time.perf_counter()
    aborted = False
    try:
        response = await handler(request)
    except ConnectionResetError:
        # the client hung up before its body arrived (aiohttp: "Connection lost"): its abort, not the
        # agent's failure; the answer goes nowhere (499, as proxies log it)
        aborted, response = True, web.Response(status=499)
    except ApiError as error:
        response = _error(error.status, error.code, error.message, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = _http_error(request, error)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s failed", request_id)
        response = _error(500, "internal", f"the agent failed on this request (request id {request_id}); "
                                           "its log says why")
    if response.status == 408:
        response.force_close()  # a client too slow to send its body is not kept alive
    response.headers["X-Request-Id"] = request_id
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.get(CORS):
        response.headers.update(_cors_headers(request[CORS]))
    token = request.get(TOKEN)
    line = {"request_id": request_id, "method": request.method, "path": request.path, "status": response.status,
            "ms": round((time.perf_counter() - started) * 1000, 1), "token": token.id if token is not None else None}
    log.info(json.dumps({**line, "client_aborted": True} if aborted else line))
    return response


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def _http_error(request: web.Request, error: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such route, wrong method, body over client_max_size) in our form."""
    if error.status == 413:
        message = f"the body is larger than the {request.app[STATE].options.max_body:,} bytes accepted"
    elif error.status == 404:
        message = f"no such endpoint: {request.path} (the API is under /v1)"
    elif error.status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = error.reason
    headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
    return _error(error.status, _HTTP_CODES.get(error.status, f"http_{error.status}"), message, headers)


def _cors_headers(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": EXPOSED_HEADERS}


@web.middleware
async def _gate(request: web.Request, handler) -> web.StreamResponse:
    """Host, Origin, CORS preflight, then the bearer token and its rate limit."""
    state: _State = request.app[STATE]
    if not _host_allowed(request, state.host_names):
        raise ApiError(403, "bad_host", "the Host header must name this machine's loopback (127.0.0.1, "
                                        "localhost or [::1]) with the agent's port")
    origins = request.headers.getall("Origin", [])
    if len(origins) > 1:
        raise ApiError(400, "bad_origin", "more than one Origin header")
    origin = origins[0] if origins else None
    if origin is not None and not pairing.is_extension_origin(origin):
        raise ApiError(403, "origin_forbidden", "web pages may not use the agent; only its browser extension may "
                                                "(origin chrome-extension://<id> or moz-extension://<uuid>)")
    if request.method == "OPTIONS":
        return await state.preflight(request, origin)
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    await state.authenticate(request, origin)
    return await handler(request)


# ---------------------------------------------------------------- the service

class _State:
    """What the handlers share: the unlocked keys, the log, the worker pool and its queue."""

    def __init__(self, home: Path, keys: UserKeys, options: ServerOptions):
        self.home, self.keys, self.options = Path(home), keys, options
        self.host_names = LOOPBACK_NAMES | {h.lower() for h in options.hosts}
        self.factory = None
        self.pool: ThreadPoolExecutor | None = None
        self.guard = pairing.FailureGuard()
        self.bucket = TokenBucket(options.rate, options.burst)
        self.admitted = 0  # protections running or waiting; only the event loop's thread touches it
        # running mean of a protection's duration, for Retry-After: a guess until the first one ends
        self.mean_seconds = 0.5
        self.measured = False
        self.line = WaitingLine()
        self.accelerator = Accelerator(options.device, options.micro_batch, options.micro_batch_wait)

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """The log (a home without one is refused: `agent init`) and the worker pool, for as long
        as the app runs; at the end aiohttp has already let the in-flight requests finish."""
        with database(self.home) as factory:
            self.factory = factory
            self.pool = ThreadPoolExecutor(self.options.workers, thread_name_prefix="agent-protect")
            try:
                yield
            finally:
                await asyncio.to_thread(self.pool.shutdown, wait=True)

    async def _db(self, function, *args, **kwargs):
        """Database work off the event loop: SQLite may wait for another process's lock."""
        return await asyncio.to_thread(functools.partial(function, self.factory, *args, **kwargs))

    async def _paired(self, origin: str | None) -> bool:
        return origin is not None and origin in await self._db(pairing.paired_origins, self.keys.user)

    async def preflight(self, request: web.Request, origin: str | None) -> web.Response:
        """CORS preflight: to pair, any extension; elsewhere, only an extension holding a token."""
        if origin is None or "Access-Control-Request-Method" not in request.headers:
            raise ApiError(400, "bad_preflight", "OPTIONS is only for a browser's CORS preflight")
        if request.path != PAIR_PATH and not await self._paired(origin):
            raise ApiError(403, "not_paired", "this extension is not paired with the agent: pair it first")
        request[CORS] = origin
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST",
                                                 "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                                                 "Access-Control-Max-Age": "600"})

    async def authenticate(self, request: web.Request, origin: str | None) -> None:
        """The bearer token, live, of this user and, when the request says its origin, paired with
        it. A request with no Origin cannot come from a web page (a page cannot send the token
        without CORS, which sends the Origin), so it is let through on the token alone."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "token_missing", "this endpoint needs `Authorization: Bearer <token>`; pair the "
                                                 "extension with `agent pair` to get one",
                           {"WWW-Authenticate": 'Bearer realm="agent"'})
        try:
            info = await self._db(pairing.verify_token, token.strip(), origin)
        except pairing.PairingError as error:
            if error.reason == "wrong_origin":
                raise ApiError(403, "origin_mismatch", str(error)) from None
            code = "token_revoked" if error.reason == "revoked" else "token_invalid"
            raise ApiError(401, code, str(error), {"WWW-Authenticate": 'Bearer realm="agent", error="invalid_token"'}
                           ) from None
        if info.user != self.keys.user:
            raise ApiError(401, "token_invalid", f"this token is of user {info.user!r}, and this agent serves "
                                                 f"{self.keys.user!r}")
        request[TOKEN] = info
        if origin is not None:
            request[CORS] = origin
        wait = self.bucket.take(info.id)
        if wait is not None:
            raise ApiError(429, "rate_limited", f"more than {self.options.burst} requests at once or "
                                                f"{self.options.rate:g} a second; slow down", _retry_after(wait))

    # ---- handlers

    async def status(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if await self._paired(origin):
            request[CORS] = origin
        model, running = await asyncio.to_thread(self._status_facts)
        return web.json_response({
            "api": API_VERSION, "version": __version__, "user": self.keys.user, "unlocked": True,
            "model": model, "jobs": running, "inference": self.accelerator.status(),
            "strengths": list(pipeline.STRENGTHS), "default_strength": pipeline.DEFAULT_STRENGTH,
            "max_body": self.options.max_body, "max_pixels": self.options.max_pixels,
        })

    def _status_facts(self) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The model the user protects with, and their fine-tuning jobs' progress (no folders)."""
        with self.factory() as session:
            model = models.active_model_info(session, self.keys.user)
        return model, jobs.active_jobs(self.home, self.keys.user)

    async def pair(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is None:
            raise ApiError(403, "origin_forbidden", "pairing is only for a browser extension, which says its Origin")
        request[CORS] = origin  # the extension must be able to read why pairing failed
        body = await _json_body(request)
        unknown = sorted(set(body) - {"code", "label"})
        if unknown:
            raise ApiError(400, "bad_request", f"unknown fields: {', '.join(unknown)} (expected code, label)")
        code, label = body.get("code"), body.get("label")
        if not isinstance(code, str) or not code.strip():
            raise ApiError(400, "bad_request", "`code` must be the code `agent pair` printed")
        try:
            issued = await self._db(pairing.redeem_code, code, origin, user=self.keys.user, guard=self.guard,
                                    label=label)
        except pairing.PairingError as error:
            status = 400 if error.reason in ("bad_label", "bad_origin") else 403
            raise ApiError(status, error.reason, str(error)) from None
        return web.json_response({"token": issued.token, "id": issued.info.id, "user": issued.info.user,
                                  "origin": issued.info.origin}, status=201)

    async def protect(self, request: web.Request) -> web.Response:
        file_name, site, options = _protect_request(request)
        data, part_name = await self._image_body(request)
        file_name = file_name or part_name
        token = request.get(TOKEN)
        self._admit(request.headers.get(TICKET_HEADER), token.id if token is not None else None)
        self.admitted += 1
        started = time.perf_counter()
        try:
            done = await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(
                protect_bytes, self.home, self.keys, data, file_name=file_name, site=site, options=options,
                max_pixels=self.options.max_pixels, factory=self.factory, prepare=self.accelerator.prepare))
        except images.TooManyPixelsError as error:
            raise ApiError(413, "too_many_pixels", str(error)) from None
        except images.ImageError as error:
            raise ApiError(400, "bad_image", str(error)) from None
        except (AgentBusyError, DatabaseLockedError) as error:
            raise ApiError(503, "busy", str(error), _retry_after(LOCK_WAIT)) from None
        else:
            took = time.perf_counter() - started
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * took if self.measured else took
            self.measured = True
        finally:
            self.admitted -= 1
        return web.Response(body=done.data, content_type=MEDIA_TYPES[done.format],
                            headers={"X-Agent-Record": done.record_id})

    def _admit(self, ticket: str | None, client: str | None) -> None:
        """Lets a protection in if there is room for it and for everyone waiting ahead of it; else
        503 with the wait until its turn and its ticket. Called on the event loop's thread only."""
        workers, free = self.options.workers, self.options.workers + self.options.queue - self.admitted
        ticket = self.line.find(ticket, client)
        ahead = self.line.position(ticket)
        if ahead < free:
            self.line.leave(ticket)
            return
        # the slots free up at `workers` per mean protection time; its turn comes when the ones
        # ahead of it and itself have found one. It is told half that: a client back early only
        # hears a shorter wait, but one back late leaves the slot its turn kept idle
        wait = 0.5 * self.mean_seconds * (ahead - free + 1) / workers
        ticket = self.line.keep(ticket, client, wait + max(2.0, 2 * self.mean_seconds))
        raise ApiError(503, "busy", "the agent is protecting as many images as it can queue; send the image again "
                                    "after Retry-After (X-Retry-After-Ms) with X-Agent-Ticket, and it keeps its place",
                       {**_retry_after(wait), TICKET_HEADER: ticket})

    async def _image_body(self, request: web.Request) -> tuple[bytes, str | None]:
        """The image: the whole body, or the `image` field of a multipart form (with its file name)."""
        limit = self.options.max_body
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "body_too_large", f"the body is larger than the {limit:,} bytes accepted")
        multipart = request.content_type == "multipart/form-data"
        if not (multipart or request.content_type.startswith("image/")
                or request.content_type == "application/octet-stream"):
            raise ApiError(415, "unsupported_media_type", f"send the image itself (Content-Type image/...) or a "
                                                          f"multipart form with an `{IMAGE_FIELD}` field, not "
                                                          f"{request.content_type}")
        timeout = self.options.body_timeout
        try:
            async with asyncio.timeout(timeout):
                data, name = await _multipart_image(request, limit) if multipart else (await request.read(), None)
        except TimeoutError:
            raise ApiError(408, "timeout", f"the body did not arrive within {timeout:g} s") from None
        if not data:
            raise ApiError(400, "bad_image", "the body is empty: send the image")
        return data, name

    async def records(self, request: web.Request) -> web.Response:
        limit, before = _records_query(request)
        page, next_cursor = await asyncio.to_thread(self._records_page, limit, before)
        return web.json_response({"records": page, "next_cursor": next_cursor})

    def _records_page(self, limit: int, before: int | None) -> tuple[list[dict[str, Any]], str | None]:
        """The user's records, newest first, `limit` at a time; the cursor is the last one's place
        in the user's chain. File names and sites decrypted (the key is unlocked)."""
        with self.factory() as session:
            records = db.list_records(session, self.keys.user)
        records.sort(key=lambda r: r.seq, reverse=True)
        if before is not None:
            records = [r for r in records if r.seq < before]
        page = []
        for record in records[:limit]:
            try:
                record = db.decrypt_record(record, self.keys)
            except ProvenanceError:
                pass  # answered with `decrypted: false`; `agent log verify` tells what happened
            page.append(record.to_dict())
        return page, str(records[limit - 1].seq) if len(records) > limit else None


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    query = request.rel_url.query
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ApiError(400, "bad_option", f"unknown options: {', '.join(unknown)} (known: {', '.join(allowed)})")
    repeated = sorted({key for key in query if len(query.getall(key)) > 1})
    if repeated:
        raise ApiError(400, "bad_option", f"options given more than once: {', '.join(repeated)}")
    return dict(query)


def _integer(query: dict[str, str], name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    if name not in query:
        return default
    text = query[name]
    if not text.isascii() or not text.isdigit() or (high is not None and int(text) > high) or int(text) < low:
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ApiError(400, "bad_option", f"{name} must be an integer {bound}, got {text!r}")
    return int(text)


def _protect_request(request: web.Request) -> tuple[str | None, str | None, ProtectOptions]:
    """The file name (`X-File-Name`, percent-encoded UTF-8), the site (`X-Site`) and the options
    (query: `max_side`, `strength`). Name and site travel in headers, not in the URL, where
    every tool that shows or keeps URLs would see them."""
    query = _query(request, ("max_side", "strength"))
    strength = query.get("strength", pipeline.DEFAULT_STRENGTH)
    if strength not in pipeline.STRENGTHS:
        raise ApiError(400, "bad_option", f"strength must be one of {', '.join(pipeline.STRENGTHS)}, got {strength!r}")
    max_side = _integer(query, "max_side", ProtectOptions().max_side, 0)
    try:
        # 0: the full size, as `agent protect --max-side 0`
        options = ProtectOptions(max_side=max_side or None, strength=strength)
    except ValueError as error:
        raise ApiError(400, "bad_option", f"max_side: {error} (0 keeps the full size)") from None
    return _file_name(request.headers.get("X-File-Name")), _site(request.headers.get("X-Site")), options


def _file_name(encoded: str | None) -> str | None:
    if encoded is None:
        return None
    try:
        name = unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        name = ""
    if not name or len(name) > MAX_NAME or not name.isprintable() or any(c in name for c in "/\\"):
        raise ApiError(400, "bad_file_name", f"X-File-Name must be a file name (no folders) of 1 to {MAX_NAME} "
                                             "characters, percent-encoded UTF-8")
    return name


def _site(text: str | None) -> str | None:
    """The page the image is for, as its origin (`https://example.com`); it goes into the record."""
    if text is None:
        return None
    try:
        url = URL(text)
        ok = (len(text) <= MAX_SITE and url.scheme in ("http", "https") and bool(url.host) and not url.user
              and url.path in ("", "/") and not url.query_string and not url.fragment)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ApiError(400, "bad_site", "X-Site must be the page's origin, e.g. https://example.com")
    return str(url.origin())


def _records_query(request: web.Request) -> tuple[int, int | None]:
    query = _query(request, ("limit", "cursor"))
    return (_integer(query, "limit", RECORDS_LIMIT, 1, RECORDS_MAX),
            _integer(query, "cursor", None, 1))


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send JSON (Content-Type application/json)")
    if request.content_length is None:
        raise ApiError(411, "length_required", "send a Content-Length")
    if request.content_length > MAX_JSON:
        raise ApiError(413, "body_too_large", f"the body is larger than the {MAX_JSON:,} bytes accepted here")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


async def _multipart_image(request: web.Request, limit: int) -> tuple[bytes, str | None]:
    """The one `image` field of a multipart form, read in chunks up to `limit` bytes in all."""
    try:
        reader = await request.multipart()
        found: tuple[bytes, str | None] | None = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name != IMAGE_FIELD or found is not None:
                raise ApiError(400, "bad_form", f"the form must hold exactly one field, `{IMAGE_FIELD}`, with the "
                                                "image")
            chunks, size = [], 0
            while chunk := await part.read_chunk():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"the image is larger than the {limit:,} bytes accepted")
                chunks.append(chunk)
            name = os.path.basename(part.filename) if part.filename else None
            found = (b"".join(chunks), name or None)
    except (ValueError, AssertionError, HttpProcessingError) as error:  # aiohttp's words for a malformed form
        raise ApiError(400, "bad_form", f"not a readable multipart form ({error})") from None
    if found is None:
        raise ApiError(400, "bad_form", f"the form has no `{IMAGE_FIELD}` field")
    return found


STATUS_PATH, PAIR_PATH, PROTECT_PATH, RECORDS_PATH = "/v1/status", "/v1/pair", "/v1/protect", "/v1/records"
PUBLIC_PATHS = frozenset({STATUS_PATH, PAIR_PATH})
STATE = web.AppKey("agent_state", _State)
CORS = web.RequestKey("agent_cors", str)  # the origin this answer may carry CORS headers for
TOKEN = web.RequestKey("agent_token", pairing.TokenInfo)


def make_app(home: Path, keys: UserKeys, options: ServerOptions | None = None) -> web.Application:
    """The service for `keys`' user (unlocked) and the log in `home`; `serve` runs it, tests drive
    it with aiohttp's test client."""
    options = ServerOptions() if options is None else options
    state = _State(home, keys, options)
    app = web.Application(middlewares=[_outermost, _gate], client_max_size=options.max_body)
    app[STATE] = state
    app.cleanup_ctx.append(state.lifetime)
    app.router.add_get(STATUS_PATH, state.status)
    app.router.add_post(PAIR_PATH, state.pair)
    app.router.add_post(PROTECT_PATH, state.protect)
    app.router.add_get(RECORDS_PATH, state.records)
    return app


# ---------------------------------------------------------------- running it

def resolve_port(port: int | None = None) -> int:
    """`port`, else $AGENT_PORT, else 47830."""
    if port is None:
        text = os.environ.get(PORT_ENV, "").strip()
        if not text:
            return DEFAULT_PORT
        if not text.isdigit():
            raise ServiceError(f"${PORT_ENV} must be a port number, got {text!r}")
        port = int(text)
    if not 1 <= port <= 65535:
        raise ServiceError(f"the port must be from 1 to 65535, got {port}")
    return port


def serve(home: Path, user: str | None, passphrase: str, *, port: int | None = None,
          options: ServerOptions | None = None, on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Unlocks the user's keys, then serves on 127.0.0.1 and ::1 (127.0.0.1 alone where the machine
    has no IPv6 loopback) until SIGTERM or SIGINT; in-flight requests are finished first.
    `on_ready(urls)` is called once it listens."""
    home = Path(home)
    port = resolve_port(port)
    options = ServerOptions() if options is None else options
    for name in options.hosts:
        _check_loopback_name(name)
    keys = unlock(home, resolve_user(home, user), passphrase)
    # loaded before listening, so that the first photo does not wait for them
    pipeline.default_model()
    surrogate()
    asyncio.run(_serve(make_app(home, keys, options), port, options, on_ready))


def _check_loopback_name(name: str) -> None:
    """A name added to the Host check must lead to the loopback alone (an /etc/hosts alias): a
    name that resolves elsewhere, or that someone else's DNS answers for, would reopen rebinding."""
    try:
        found = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError) as error:
        raise ServiceError(f"--host-check {name}: the name does not resolve here ({error})") from None
    addresses = {entry[4][0] for entry in found}
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside:
        raise ServiceError(f"--host-check {name}: it resolves to {', '.join(outside)}, not only to the "
                                   "loopback; only loopback names may be accepted")


def runner_settings(options: ServerOptions) -> dict[str, Any]:
    """How `agent serve` runs the app (aiohttp's `AppRunner` arguments). access_log=None: aiohttp's
    access log would write query strings (file names, sites). aiohttp has no timeout for request
    headers, but closes a connection that has sent no complete request for `keepalive_timeout`
    since it opened or since its last answer: that is the header timeout. After an answer to a
    request whose body did not all arrive, aiohttp reads on for `lingering_time` so that the client
    sees the answer rather than a reset; 2 s (not 10) is enough on the loopback, and cuts a slow
    client off soon after its 408."""
    return {"access_log": None, "handle_signals": False, "shutdown_timeout": options.shutdown_timeout,
            "keepalive_timeout": options.header_timeout, "lingering_time": 2.0}


async def _serve(app: web.Application, port: int, options: ServerOptions,
                 on_ready: Callable[[list[str]], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, **runner_settings(options))
    await runner.setup()
    try:
        urls = []
        for host in LOOPBACK_HOSTS:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as error:
                if host == "::1" and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.info(json.dumps({"event": "no_ipv6_loopback", "detail": str(error)}))
                    continue
                if error.errno == errno.EADDRINUSE:
                    raise ServiceError(f"port {port} on {host} is in use (another `agent serve`?); choose "
                                               f"another with --port or ${PORT_ENV}") from None
                raise ServiceError(f"cannot listen on {host} port {port}: {error.strerror}") from None
            urls.append(f"http://{'[::1]' if host == '::1' else host}:{port}")
        log.info(json.dumps({"event": "listening", "urls": urls, "user": app[STATE].keys.user}))
        if on_ready is not None:
            on_ready(urls)
        await stop.wait()
        log.info(json.dumps({"event": "stopping", "in_flight": app[STATE].admitted}))
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


__all__ = ["DEFAULT_PORT", "PORT_ENV", "ServerOptions", "TokenBucket", "WaitingLine", "make_app", "resolve_port", "runner_settings",
           "serve"]
