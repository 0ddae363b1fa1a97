"""The local service (agent/server.py) through aiohttp's test client: every endpoint and every
refusal (Host, Origin, token, size, pixels, bad image, bad options, rate, queue), CORS, logs and
graceful shutdown; then a real `agent serve` process over HTTP, stopped with SIGTERM."""

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from conftest import SAMPLE
from PIL import Image

from agent import keys as keystore
from agent import store as db
from agent import server
from agent.pipeline import DEFAULT_MODEL_PATH
from agent.server import STATE, ServerOptions, TokenBucket, WaitingLine, make_app, resolve_port, runner_settings
from agent.service import pairing
from agent.service.home import ServiceError, home_lock
from agent.service.log import verify_log
from agent.service.pairing import FailureGuard
from agent.service.protect import protect_bytes
from agent.service.recover import recover_paths
from agent.service.users import add_user, init_user

PW = "correct horse"
KDF = 2**14  # the store's minimum: fast unlocks in tests
CHROME = "chrome-extension://" + "abcdefghijklmnopabcdefghijklmnop"
OTHER = "chrome-extension://" + "ponmlkjihgfedcbaponmlkjihgfedcba"
FIREFOX = "moz-extension://0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
aio = pytest.mark.asyncio


def photo(fmt: str = "PNG", size: tuple[int, int] = (64, 48), **save) -> bytes:
    with Image.open(SAMPLE) as image:
        picture = image.convert("RGB").crop((100, 50, 100 + size[0], 50 + size[1]))
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    init_user(home, "alice", PW, kdf_n=KDF)
    return home


@pytest.fixture
def keys(home):
    return keystore.unlock(keystore.key_store(home), "alice", PW)


@pytest.fixture
def factory(home):
    factory = db.open_database(db.database_path(home))
    yield factory
    factory.kw["bind"].dispose()


def token_for(factory, origin: str = CHROME, user: str = "alice") -> str:
    code = pairing.create_code(factory, user)
    return pairing.redeem_code(factory, code.code, origin, user=user, guard=FailureGuard()).token


def auth(token: str, origin: str | None = CHROME, **more) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", **more}
    if origin is not None:
        headers["Origin"] = origin
    return headers


@pytest.fixture
def serve(aiohttp_client, home, keys):
    async def start(**options):
        return await aiohttp_client(make_app(home, keys, ServerOptions(**options)))
    return start


async def problem(response, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert body["message"]
    return body["message"]


# ---------------------------------------------------------------- status, Host, Origin

@aio
async def test_status_shows_the_active_model_and_fine_tuning_progress(serve, home, tmp_path):
    from PIL import Image

    from agent.service import jobs

    photos = tmp_path / "mine"
    photos.mkdir()
    for i in range(12):
        Image.new("RGB", (64, 48), (20 * i, 90, 200 - 10 * i)).save(photos / f"p{i}.png")
    job = jobs.submit_finetune(home, "alice", [photos], epochs=1)
    client = await serve()
    body = await (await client.get("/v1/status")).json()
    assert [(j["id"], j["state"]) for j in body["jobs"]] == [(job["id"], "queued")]
    assert str(photos) not in json.dumps(body)  # the folders are the user's business
    assert body["model"]["name"] == "default"


@aio
async def test_status_says_who_and_what_without_secrets(serve, factory):
    client = await serve()
    response = await client.get("/v1/status")
    assert response.status == 200
    body = await response.json()
    assert body["user"] == "alice" and body["unlocked"] is True and body["api"] == 1
    assert body["model"] == {"name": "default", "sha256": db.file_sha256(DEFAULT_MODEL_PATH)}
    assert body["jobs"] == []
    assert body["strengths"] == ["low", "medium", "high"] and body["default_strength"] == "medium"
    text = json.dumps(body)
    assert "key" not in text.replace("unlocked", "") and PW not in text
    assert response.headers["X-Request-Id"] and response.headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in response.headers
    # an extension that is not paired learns nothing through CORS; a paired one may read it
    response = await client.get("/v1/status", headers={"Origin": CHROME})
    assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
    token_for(factory, CHROME)
    response = await client.get("/v1/status", headers={"Origin": CHROME})
    assert response.headers["Access-Control-Allow-Origin"] == CHROME and response.headers["Vary"] == "Origin"


@aio
@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1", "127.0.0.1:1",
                                  "localhost:{port}0", "127.0.0.2:{port}", "localhost.:{port}", "0.0.0.0:{port}",
                                  "[::1]", "localhost:{port}@evil.example"])
async def test_a_host_other_than_the_loopback_with_our_port_is_refused(serve, host):
    client = await serve()
    response = await client.get("/v1/status", headers={"Host": host.format(port=client.port)})
    await problem(response, 403, "bad_host")


@aio
@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
async def test_the_loopback_names_with_our_port_are_accepted(serve, host):
    client = await serve()
    response = await client.get("/v1/status", headers={"Host": host.format(port=client.port)})
    assert response.status == 200


@aio
async def test_an_extra_host_name_is_accepted_when_configured(serve):
    client = await serve(hosts=("agent.localhost",))
    assert (await client.get("/v1/status", headers={"Host": f"agent.localhost:{client.port}"})).status == 200


@aio
@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost:3000", "null", "file://",
                                    f"http://127.0.0.1:{47830}", "chrome-extension://not-an-id"])
async def test_web_page_origins_are_refused_everywhere(serve, factory, origin):
    client = await serve()
    token = token_for(factory)
    for method, path in (("GET", "/v1/status"), ("POST", "/v1/pair"), ("POST", "/v1/protect"),
                         ("GET", "/v1/records"), ("OPTIONS", "/v1/pair")):
        response = await client.request(method, path, headers=auth(token, origin))
        await problem(response, 403, "origin_forbidden")
        assert "Access-Control-Allow-Origin" not in response.headers


# ---------------------------------------------------------------- pairing

@aio
async def test_pairing_over_http_gives_a_token_bound_to_the_extension(serve, factory):
    client = await serve()
    code = pairing.create_code(factory, "alice").code
    response = await client.post("/v1/pair", json={"code": code.lower(), "label": "Chrome 130"},
                                 headers={"Origin": CHROME})
    assert response.status == 201
    assert response.headers["Access-Control-Allow-Origin"] == CHROME
    body = await response.json()
    assert body["user"] == "alice" and body["origin"] == CHROME and body["token"].startswith(body["id"] + ".")
    assert [(t.id, t.label) for t in pairing.list_tokens(factory)] == [(body["id"], "Chrome 130")]
    assert (await client.get("/v1/records", headers=auth(body["token"]))).status == 200
    # used once
    response = await client.post("/v1/pair", json={"code": code}, headers={"Origin": CHROME})
    await problem(response, 403, "bad_code")
    assert response.headers["Access-Control-Allow-Origin"] == CHROME  # so the extension can say why


@aio
async def test_pairing_refuses_what_is_not_an_extension_asking_properly(serve, factory):
    client = await serve()
    code = pairing.create_code(factory, "alice").code
    await problem(await client.post("/v1/pair", json={"code": code}), 403, "origin_forbidden")
    await problem(await client.post("/v1/pair", data=code, headers={"Origin": CHROME}), 415,
                  "unsupported_media_type")
    await problem(await client.post("/v1/pair", data="{not json", headers={"Origin": CHROME,
                                                                            "Content-Type": "application/json"}),
                  400, "bad_json")
    await problem(await client.post("/v1/pair", json=[code], headers={"Origin": CHROME}), 400, "bad_json")
    await problem(await client.post("/v1/pair", json={"code": code, "admin": True}, headers={"Origin": CHROME}),
                  400, "bad_request")
    await problem(await client.post("/v1/pair", json={"code": 12345678}, headers={"Origin": CHROME}),
                  400, "bad_request")
    await problem(await client.post("/v1/pair", json={"code": code, "label": "x" * 300}, headers={"Origin": CHROME}),
                  400, "bad_label")
    await problem(await client.post("/v1/pair", json={"code": code, "pad": "x" * 5000}, headers={"Origin": CHROME}),
                  413, "body_too_large")
    # none of that used the code up
    assert (await client.post("/v1/pair", json={"code": code}, headers={"Origin": CHROME})).status == 201


@aio
async def test_guessing_codes_cancels_them_all(serve, factory):
    client = await serve()
    code = pairing.create_code(factory, "alice").code
    for attempt in range(pairing.MAX_FAILURES):
        response = await client.post("/v1/pair", json={"code": f"ZZZZ-ZZZ{attempt + 2}"}, headers={"Origin": OTHER})
        expected = "codes_invalidated" if attempt == pairing.MAX_FAILURES - 1 else "bad_code"
        await problem(response, 403, expected)
    await problem(await client.post("/v1/pair", json={"code": code}, headers={"Origin": CHROME}), 403, "bad_code")


@aio
async def test_preflight_for_pairing_any_extension_elsewhere_only_a_paired_one(serve, factory):
    client = await serve()
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    response = await client.options("/v1/pair", headers={"Origin": FIREFOX, **preflight})
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == FIREFOX
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    await problem(await client.options("/v1/protect", headers={"Origin": FIREFOX, **preflight}), 403, "not_paired")
    await problem(await client.options("/v1/protect", headers=preflight), 400, "bad_preflight")
    token = token_for(factory, FIREFOX)
    response = await client.options("/v1/protect", headers={"Origin": FIREFOX, **preflight})
    assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == FIREFOX
    pairing.revoke_token(factory, token.split(".")[0])
    await problem(await client.options("/v1/protect", headers={"Origin": FIREFOX, **preflight}), 403, "not_paired")


# ---------------------------------------------------------------- the token

@aio
async def test_every_endpoint_but_status_and_pair_needs_a_live_token_of_this_user_from_its_origin(
        serve, home, factory):
    client = await serve()
    token = token_for(factory, CHROME)
    for method, path in (("POST", "/v1/protect"), ("GET", "/v1/records"), ("GET", "/v1/nothing")):
        response = await client.request(method, path, headers={"Origin": CHROME})
        await problem(response, 401, "token_missing")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        await problem(await client.request(method, path, headers={"Authorization": token, "Origin": CHROME}),
                      401, "token_missing")
        token_id, secret = token.split(".")
        for wrong in (f"{token_id}.{secret[::-1]}", "garbage", f"{'a' * 16}.{secret}"):
            await problem(await client.request(method, path, headers=auth(wrong)), 401, "token_invalid")
        message = await problem(await client.request(method, path, headers=auth(token, OTHER)), 403,
                                "origin_mismatch")
        assert "another extension" in message
    # no Origin at all: not a web page (a page cannot send the token without CORS saying its origin)
    assert (await client.get("/v1/records", headers=auth(token, None))).status == 200
    # another user's token does not open this user's service
    add_user(home, "bob", "bob's words", kdf_n=KDF)
    await problem(await client.get("/v1/records", headers=auth(token_for(factory, CHROME, "bob"))), 401,
                  "token_invalid")
    # revoked: refused at once
    pairing.revoke_token(factory, token.split(".")[0])
    await problem(await client.get("/v1/records", headers=auth(token)), 401, "token_revoked")


@aio
async def test_unknown_paths_and_methods_answer_json(serve, factory):
    client = await serve()
    token = token_for(factory)
    await problem(await client.get("/v1/nothing", headers=auth(token)), 404, "not_found")
    response = await client.get("/v1/protect", headers=auth(token))
    await problem(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    await problem(await client.post("/v1/status"), 405, "method_not_allowed")


# ---------------------------------------------------------------- protect

@aio
async def test_protect_a_raw_png_returns_a_png_and_logs_a_signed_record(serve, factory, home, keys):
    client = await serve()
    original = photo("PNG")
    response = await client.post("/v1/protect", data=original, headers=auth(
        token_for(factory), **{"Content-Type": "image/png", "X-File-Name": "caf%C3%A9%20photo.png",
                               "X-Site": "https://social.example/"}))
    assert response.status == 200, await response.text()
    assert response.content_type == "image/png"
    assert response.headers["Access-Control-Allow-Origin"] == CHROME
    assert "X-Agent-Record" in response.headers["Access-Control-Expose-Headers"]
    data = await response.read()
    assert data != original and decoded(data).size == (64, 48)
    record_id = response.headers["X-Agent-Record"]
    with factory() as session:
        [record] = db.list_records(session, "alice", keys=keys)
    assert record.id == record_id and record.source == "extension"
    assert record.file_name == "café photo.png" and record.site == "https://social.example"
    assert record.protected_sha256 == hashlib.sha256(data).hexdigest()
    assert verify_log(home).ok


@aio
async def test_protect_multipart_jpeg_keeps_the_format_and_the_file_name(serve, factory, keys):
    client = await serve()
    form = aiohttp.FormData()
    form.add_field("image", photo("JPEG", quality=92), filename="holiday.jpg", content_type="image/jpeg")
    response = await client.post("/v1/protect", data=form, headers=auth(token_for(factory)))
    assert response.status == 200, await response.text()
    assert response.content_type == "image/jpeg" and decoded(await response.read()).format == "JPEG"
    with factory() as session:
        [record] = db.list_records(session, "alice", keys=keys)
    assert record.file_name == "holiday.jpg" and record.site is None and record.params["quality"] >= 92


@aio
async def test_protect_options_max_side_and_strength(serve, factory):
    client = await serve()
    headers = auth(token_for(factory), **{"Content-Type": "image/png"})
    response = await client.post("/v1/protect?max_side=32", data=photo(), headers=headers)
    assert response.status == 200 and decoded(await response.read()).size == (32, 24)
    response = await client.post("/v1/protect?max_side=0&strength=low", data=photo(size=(80, 40)),
                                 headers=headers)
    assert response.status == 200 and decoded(await response.read()).size == (80, 40)
    low = np.asarray(decoded(await response.read()), dtype=int)
    response = await client.post("/v1/protect?max_side=0&strength=high", data=photo(size=(80, 40)), headers=headers)
    high = np.asarray(decoded(await response.read()), dtype=int)
    original = np.asarray(decoded(photo(size=(80, 40))), dtype=int)
    # high moves the photo further than low; the record says which was used
    assert np.abs(high - original).mean() > np.abs(low - original).mean()
    with factory() as session:
        strengths = {r.params["strength"] for r in db.list_records(session, "alice")}
    assert strengths == {"medium", "low", "high"}
    message = await problem(await client.post("/v1/protect?strength=standard", data=photo(), headers=headers),
                            400, "bad_option")
    assert "low, medium, high" in message
    for query in ("max_side=abc", "max_side=8", "max_side=-1", "max_side=1e3", "max_side=32&max_side=64",
                  "quality=90", "name=a.png"):
        await problem(await client.post(f"/v1/protect?{query}", data=photo(), headers=headers), 400, "bad_option")


@aio
@pytest.mark.parametrize("name", ["", "a%2Fb.png", "..%5Cx.png", "%FF.png", "line%0Abreak.png", "x" * 300])
async def test_protect_refuses_a_bad_file_name(serve, factory, name):
    client = await serve()
    response = await client.post("/v1/protect", data=photo(), headers=auth(
        token_for(factory), **{"Content-Type": "image/png", "X-File-Name": name}))
    await problem(response, 400, "bad_file_name")


@aio
@pytest.mark.parametrize("site", ["social.example", "ftp://social.example", "https://social.example/path",
                                  "https://user@social.example", "https://social.example/?q=1", "javascript:1",
                                  "https://"])
async def test_protect_refuses_a_site_that_is_not_an_origin(serve, factory, site):
    client = await serve()
    response = await client.post("/v1/protect", data=photo(), headers=auth(
        token_for(factory), **{"Content-Type": "image/png", "X-Site": site}))
    await problem(response, 400, "bad_site")


@aio
async def test_protect_refuses_bad_images_and_bodies(serve, factory):
    client = await serve()
    token = token_for(factory)

    async def post(data, content_type="image/png"):
        return await client.post("/v1/protect", data=data, headers=auth(token, **{"Content-Type": content_type}))

    await problem(await post(b""), 400, "bad_image")
    await problem(await post(b"definitely not an image"), 400, "bad_image")
    await problem(await post(photo()[:200]), 400, "bad_image")  # truncated
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    message = await problem(await post(gif.getvalue(), "image/gif"), 400, "bad_image")
    assert "not supported" in message
    await problem(await post(photo(), "text/plain"), 415, "unsupported_media_type")
    await problem(await post(b'{"image": 1}', "application/json"), 415, "unsupported_media_type")
    form = aiohttp.FormData()
    form.add_field("photo", photo(), filename="a.png")
    await problem(await client.post("/v1/protect", data=form, headers=auth(token)), 400, "bad_form")
    form = aiohttp.FormData()
    form.add_field("image", photo(), filename="a.png")
    form.add_field("image", photo(), filename="b.png")
    await problem(await client.post("/v1/protect", data=form, headers=auth(token)), 400, "bad_form")
    await problem(await post(b"--x\r\nno end", "multipart/form-data; boundary=x"), 400, "bad_form")
    with factory() as session:
        assert db.list_records(session) == []


@aio
async def test_protect_refuses_a_body_over_the_limit_raw_chunked_or_multipart(serve, factory):
    client = await serve(max_body=2000)
    token = token_for(factory)
    big = photo(size=(200, 150))
    assert len(big) > 2000
    message = await problem(await client.post("/v1/protect", data=big, headers=auth(
        token, **{"Content-Type": "image/png"})), 413, "body_too_large")
    assert "2,000 bytes" in message

    async def chunks():
        for start in range(0, len(big), 500):
            yield big[start:start + 500]

    await problem(await client.post("/v1/protect", data=chunks(), headers=auth(token, **{"Content-Type": "image/png"})),
                  413, "body_too_large")
    form = aiohttp.FormData()
    form.add_field("image", big, filename="big.png")
    await problem(await client.post("/v1/protect", data=form, headers=auth(token)), 413, "body_too_large")


@aio
async def test_protect_refuses_too_many_pixels_before_decoding(serve, factory):
    client = await serve(max_pixels=64 * 48 - 1)
    message = await problem(await client.post("/v1/protect", data=photo(), headers=auth(
        token_for(factory), **{"Content-Type": "image/png"})), 413, "too_many_pixels")
    assert "64×48" in message
    # decompression bombs: a few bytes that claim a huge canvas, above the agent's limit (100 MP)
    # and above the one where Pillow refuses to open a file at all
    client = await serve()
    for side in (12_000, 20_000):
        await problem(await client.post("/v1/protect", data=png_bomb(side, side), headers=auth(
            token_for(factory), **{"Content-Type": "image/png"})), 413, "too_many_pixels")


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"".join([b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
                     chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))), chunk(b"IEND", b"")])


@aio
async def test_mangled_bodies_headers_and_options_never_get_a_500(serve, factory):
    client = await serve(max_body=200_000, rate=1000.0, burst=1000)
    token = token_for(factory)
    rng = random.Random(5)
    good = {"PNG": photo("PNG"), "JPEG": photo("JPEG"), "WEBP": photo("WEBP")}
    types = ["image/png", "image/jpeg", "application/octet-stream", "multipart/form-data", "multipart/form-data; "
             "boundary=zz", "text/plain", "", "image/", "application/json"]
    queries = ["", "max_side=16", "max_side=0", "max_side=999999999999999999999", "strength=", "max_side=%00",
               "max_side=٣٢", "a=b&max_side=64", "strength=high&max_side=48", "strength=standard"]
    seen = set()
    for _ in range(40):
        body = bytearray(rng.choice(list(good.values())))
        for _ in range(rng.randrange(4)):  # flip bytes, cut, or append junk
            action = rng.randrange(3)
            if action == 0 and body:
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
            elif action == 1:
                body = body[:rng.randrange(len(body) + 1)]
            else:
                body += bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        headers = auth(token, **{"Content-Type": rng.choice(types)})
        if rng.random() < 0.3:
            headers["X-File-Name"] = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(12)))
        if rng.random() < 0.3:
            headers["X-Site"] = rng.choice(["https://a.example", "https://a.example:99999", "http://[::1]", "https://é"])
        try:
            response = await client.post(f"/v1/protect?{rng.choice(queries)}", data=bytes(body), headers=headers)
        except ValueError:  # a header value the client itself refuses to send
            continue
        assert response.status in (200, 400, 413, 415), await response.text()
        seen.add(response.status)
        if response.status != 200:
            await problem(response, response.status, (await response.json())["code"])
    assert {200, 400, 415} <= seen


@aio
async def test_each_token_is_rate_limited_with_retry_after(serve, factory):
    client = await serve(rate=0.01, burst=2)
    token, other = token_for(factory, CHROME), token_for(factory, FIREFOX)
    for _ in range(2):
        assert (await client.get("/v1/records", headers=auth(token))).status == 200
    response = await client.get("/v1/records", headers=auth(token))
    await problem(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 50
    assert (await client.get("/v1/records", headers=auth(other, FIREFOX))).status == 200  # its own bucket
    assert (await client.get("/v1/status")).status == 200


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(3)] == [None, None, None]
    assert bucket.take("a") == pytest.approx(0.5)
    assert bucket.take("b") is None
    now[0] = 0.5
    assert bucket.take("a") is None and bucket.take("a") == pytest.approx(0.5)
    now[0] = 100.0
    assert [bucket.take("a") for _ in range(4)][3] is not None  # refilled to the burst, not beyond


@pytest.fixture
def blocked(monkeypatch):
    """protect_bytes held until `release` is set (the real one runs then): a slow inference."""
    release, entered = threading.Event(), threading.Event()
    real = protect_bytes

    def slow(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(server, "protect_bytes", slow)
    yield release, entered
    release.set()


@aio
async def test_a_full_queue_answers_503_with_retry_after_and_never_blocks_the_loop(serve, factory, blocked):
    release, entered = blocked
    client = await serve(workers=1, queue=1)
    headers = auth(token_for(factory), **{"Content-Type": "image/png"})
    running = asyncio.create_task(client.post("/v1/protect", data=photo(), headers=headers))
    waiting = asyncio.create_task(client.post("/v1/protect", data=photo(), headers=headers))
    state = client.app[STATE]
    while state.admitted < 2:
        await asyncio.sleep(0.01)
    assert entered.is_set()
    # the event loop still answers while the worker is busy
    assert (await client.get("/v1/status")).status == 200
    response = await client.post("/v1/protect", data=photo(), headers=headers)
    await problem(response, 503, "busy")
    assert int(response.headers["Retry-After"]) >= 1
    release.set()
    assert [(await r).status for r in (running, waiting)] == [200, 200]
    assert state.admitted == 0
    assert (await client.post("/v1/protect", data=photo(), headers=headers)).status == 200


def test_the_waiting_line_is_first_come_first_served_and_forgets_who_gave_up():
    now = [0.0]
    line = WaitingLine(clock=lambda: now[0])
    first = line.keep(None, "a", 1.0)
    second = line.keep(None, "b", 5.0)
    assert [line.position(line.find(t)) for t in (first, second, "stranger", None)] == [0, 1, 2, 2]
    assert line.find(None, "b") == second  # a client that does not send its ticket back keeps its place
    assert line.keep(first, "a", 1.0) == first and line.position(first) == 0  # coming back keeps the place
    now[0] = 2.0  # the first gave up
    assert line.find(first) is None and line.position(second) == 0 and len(line) == 1
    line.leave(second)
    assert len(line) == 0


@aio
async def test_clients_that_honour_retry_after_are_served_in_turn(serve, factory, monkeypatch):
    """Issue 18: at 8 clients that wait out X-Retry-After-Ms and send their ticket back, p95 ≤ 3 × p50."""
    def quick(*args, **kwargs):
        time.sleep(0.03)
        return SimpleNamespace(data=photo(), format="PNG", record_id="r")

    monkeypatch.setattr(server, "protect_bytes", quick)
    client = await serve(workers=1, queue=2, rate=1000.0, burst=1000)
    latencies, turned_away = [], 0

    async def one(token: str) -> None:
        nonlocal turned_away
        headers, started = auth(token, **{"Content-Type": "image/png"}), time.perf_counter()
        while True:
            response = await client.post("/v1/protect", data=photo(), headers=headers)
            if response.status == 200:
                latencies.append(time.perf_counter() - started)
                return
            await problem(response, 503, "busy")
            turned_away += 1
            headers = {**headers, "X-Agent-Ticket": response.headers["X-Agent-Ticket"]}
            assert int(response.headers["Retry-After"]) >= 1
            await asyncio.sleep(int(response.headers["X-Retry-After-Ms"]) / 1000)

    async def customer(token: str) -> None:
        for _ in range(4):
            await one(token)

    await one(token_for(factory))  # a warm-up, as bench/serve.py's: the first protection measures how long one takes
    latencies.clear()
    await asyncio.gather(*(customer(token_for(factory)) for _ in range(8)))
    latencies.sort()
    p50, p95 = latencies[len(latencies) // 2 - 1], latencies[round(0.95 * len(latencies)) - 1]
    assert len(latencies) == 32 and turned_away > 0 and p95 <= 3 * p50, (p50, p95)


@aio
async def test_another_agent_writing_answers_503(serve, factory, home):
    client = await serve()
    headers = auth(token_for(factory), **{"Content-Type": "image/png"})
    with home_lock(home):  # as a batch of `agent protect` in another process holds it
        response = await client.post("/v1/protect", data=photo(), headers=headers)
    await problem(response, 503, "busy")
    assert response.headers["Retry-After"] == "1"


# ---------------------------------------------------------------- records

@aio
async def test_records_are_the_users_own_newest_first_paged_and_decrypted(serve, factory, home):
    client = await serve()
    token = token_for(factory)
    for n in range(3):
        response = await client.post("/v1/protect", data=photo(size=(40 + 8 * n, 32)), headers=auth(
            token, **{"Content-Type": "image/png", "X-File-Name": f"p{n}.png"}))
        assert response.status == 200
    add_user(home, "bob", "bob's words", kdf_n=KDF)
    bob = keystore.unlock(keystore.key_store(home), "bob", "bob's words")
    protect_bytes(home, bob, photo(), file_name="bobs.png")

    response = await client.get("/v1/records?limit=2", headers=auth(token))
    assert response.status == 200
    body = await response.json()
    assert [r["file_name"] for r in body["records"]] == ["p2.png", "p1.png"]
    assert all(r["user"] == "alice" and r["decrypted"] and r["source"] == "extension" for r in body["records"])
    assert body["next_cursor"] is not None
    body = await (await client.get(f"/v1/records?limit=2&cursor={body['next_cursor']}", headers=auth(token))).json()
    assert [r["file_name"] for r in body["records"]] == ["p0.png"] and body["next_cursor"] is None
    body = await (await client.get("/v1/records", headers=auth(token))).json()
    assert len(body["records"]) == 3 and body["next_cursor"] is None
    for query in ("limit=0", "limit=101", "limit=x", "cursor=-1", "cursor=abc", "offset=2"):
        await problem(await client.get(f"/v1/records?{query}", headers=auth(token)), 400, "bad_option")


# ---------------------------------------------------------------- slow and vanishing clients

@contextlib.asynccontextmanager
async def production(home, keys, options: ServerOptions):
    """The app as `agent serve` runs it (aiohttp's test server cancels a handler whose client hangs
    up; `agent serve` does not), on a free loopback port."""
    runner = web.AppRunner(make_app(home, keys, options), **runner_settings(options))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def raw(port: int, text: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(text)
    await writer.drain()
    return reader, writer


def upload_head(port: int, token: str, length: int) -> bytes:
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "image/png", "Content-Length": str(length), **auth(token)}
    return ("POST /v1/protect HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


@aio
async def test_a_client_that_hangs_up_mid_upload_is_logged_as_an_abort_not_a_500(home, keys, factory, caplog):
    caplog.set_level(logging.INFO)
    async with production(home, keys, ServerOptions()) as port:
        _, writer = await raw(port, upload_head(port, token_for(factory), 100_000) + photo()[:100])
        writer.close()
        for _ in range(100):
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "agent.server"]
            if lines:
                break
            await asyncio.sleep(0.02)
    assert [(line["path"], line["status"], line.get("client_aborted")) for line in lines] == [("/v1/protect", 499, True)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@aio
async def test_slow_clients_are_cut_off(home, keys, factory):
    async with production(home, keys, ServerOptions(header_timeout=0.5, body_timeout=0.5)) as port:
        # a body that stops arriving: 408
        reader, writer = await raw(port, upload_head(port, token_for(factory), 100_000) + photo()[:100])
        answer = await asyncio.wait_for(reader.read(), 5)  # and the connection closes
        assert answer.startswith(b"HTTP/1.1 408") and b'"timeout"' in answer
        writer.close()
        # headers that never end: the connection is closed
        reader, writer = await raw(port, f"POST /v1/protect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


# ---------------------------------------------------------------- logs and shutdown

@aio
async def test_one_json_log_line_per_request_and_no_secrets_in_it(serve, factory, caplog):
    caplog.set_level(logging.INFO, logger="agent.server")
    client = await serve()
    code = pairing.create_code(factory, "alice").code
    paired = await (await client.post("/v1/pair", json={"code": code}, headers={"Origin": CHROME})).json()
    token = paired["token"]
    await client.post("/v1/protect", data=photo(), headers=auth(
        token, **{"Content-Type": "image/png", "X-File-Name": "secret-name.png", "X-Site": "https://private.example"}))
    await client.get("/v1/records?limit=5", headers=auth(token))
    await client.get("/v1/status", headers={"Host": "evil.example"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "agent.server"]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/v1/pair", 201), ("POST", "/v1/protect", 200), ("GET", "/v1/records", 200),
        ("GET", "/v1/status", 403)]
    assert len({line["request_id"] for line in lines}) == 4 and all(line["ms"] >= 0 for line in lines)
    assert [line["token"] for line in lines] == [None, paired["id"], paired["id"], None]
    text = caplog.text
    for secret in (token, token.split(".")[1], code, code.replace("-", ""), "secret-name", "private.example", "limit"):
        assert secret not in text


@aio
async def test_shutdown_finishes_the_request_in_flight(home, keys, factory, blocked):
    release, entered = blocked
    runner = web.AppRunner(make_app(home, keys), access_log=None, shutdown_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/v1/protect"
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(url, data=photo(), headers=auth(
            token_for(factory), **{"Content-Type": "image/png"})))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(runner.cleanup())
        await asyncio.sleep(0.3)
        assert not stopping.done()  # waits for the protection in flight
        with pytest.raises(aiohttp.ClientConnectionError):  # no new connections meanwhile
            await session.get(f"http://127.0.0.1:{port}/v1/status")
        release.set()
        response = await request
        assert response.status == 200 and response.headers["X-Agent-Record"]
        await stopping
    with factory() as session:
        assert len(db.list_records(session)) == 1


def test_resolve_port(monkeypatch):
    monkeypatch.delenv("AGENT_PORT", raising=False)
    assert resolve_port() == 47830 and resolve_port(5000) == 5000
    monkeypatch.setenv("AGENT_PORT", "5001")
    assert resolve_port() == 5001 and resolve_port(5002) == 5002
    for bad in ("http", "-1", "70000"):
        monkeypatch.setenv("AGENT_PORT", bad)
        with pytest.raises(ServiceError, match="port"):
            resolve_port()
    with pytest.raises(ValueError, match="workers"):
        ServerOptions(workers=0)
    with pytest.raises(ValueError, match="micro_batch"):
        ServerOptions(micro_batch=0)
    with pytest.raises(ValueError, match="device"):
        ServerOptions(device="tpu")


@aio
async def test_uploads_arriving_together_each_get_their_own_record(serve, factory, keys):
    """With micro-batching on, uploads arriving together are still protected apart: the refine
    scheme runs on the CPU, where the key holder can recompute it, so nothing goes through the
    batcher (it only serves the rgan scheme's G)."""
    # a long wait, so that the uploads meet however slowly a busy test machine decodes them
    client = await serve(workers=4, micro_batch=4, micro_batch_wait=1.0)
    token = token_for(factory)
    bodies = []
    for i in range(4):  # same size (so they may share a batch), different content
        with Image.open(SAMPLE) as image:
            picture = image.convert("RGB").crop((40 * i, 50, 40 * i + 64, 98))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    responses = await asyncio.gather(*[client.post("/v1/protect", data=body, headers=auth(
        token, **{"Content-Type": "image/png"})) for body in bodies])
    assert [r.status for r in responses] == [200] * 4
    datas = [await r.read() for r in responses]
    assert len(set(datas)) == 4
    with factory() as session:
        records = db.list_records(session, "alice", keys=keys)
    assert {r.protected_sha256 for r in records} == {hashlib.sha256(d).hexdigest() for d in datas}
    inference = (await (await client.get("/v1/status")).json())["inference"]
    assert inference["device"] == "cpu" and inference["micro_batch"] == 4


# ---------------------------------------------------------------- a real `agent serve`

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_agent_serve_process_over_http_then_sigterm(tmp_path):
    home = tmp_path / "home"
    init_user(home, "default", PW, kdf_n=KDF)
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "AGENT_HOME": str(home), "AGENT_PASSPHRASE": PW, "AGENT_PORT": str(port)}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve"], env=env, stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                status, _, body = http(f"{base}/v1/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "agent serve did not answer within 120 s"
                time.sleep(0.2)
        assert status == 200 and json.loads(body)["user"] == "default"
        if ipv6_loopback():
            assert http(f"http://[::1]:{port}/v1/status")[0] == 200
        assert http(f"{base}/v1/status", headers={"Origin": "https://evil.example"})[0] == 403

        code = pairing.create_code_for(home, None, PW).code
        status, headers, body = http(f"{base}/v1/pair", json.dumps({"code": code}).encode(),
                                     {"Origin": CHROME, "Content-Type": "application/json"})
        assert status == 201, body
        token = json.loads(body)["token"]
        original = photo("JPEG", quality=95)
        status, headers, body = http(f"{base}/v1/protect", original, {
            "Origin": CHROME, "Authorization": f"Bearer {token}", "Content-Type": "image/jpeg",
            "X-File-Name": "street.jpg"})
        assert status == 200, body
        assert headers["Content-Type"] == "image/jpeg" and decoded(body).size == (64, 48)
        status, _, listing = http(f"{base}/v1/records", headers={"Origin": CHROME, "Authorization": f"Bearer {token}"})
        [record] = json.loads(listing)["records"]
        assert status == 200 and record["id"] == headers["X-Agent-Record"] and record["file_name"] == "street.jpg"
        # what the extension protected, the key holder's CLI recovers
        protected = tmp_path / "street.protected.jpg"
        protected.write_bytes(body)
        [recovered] = recover_paths(home, [protected], tmp_path / "out", PW)
        assert recovered.ok and recovered.record_id == record["id"]
    finally:
        process.send_signal(signal.SIGTERM)
        code_ = process.wait(60)
    output = log_path.read_text()
    assert code_ == 0, output
    assert "agent serving on" in output and '"event": "stopping"' in output
    assert '"path": "/v1/protect", "status": 200' in output and "alembic" not in output
    assert token not in output and PW not in output
