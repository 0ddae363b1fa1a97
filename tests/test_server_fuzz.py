"""Property-based fuzzing (hypothesis) of `POST /v1/protect`: whatever the body, the headers and the
query options, the agent answers with a success or a JSON refusal `{code, message}`, and never
with a 5xx other than the documented 503 `busy` (with Retry-After). The hand-written cases in
tests/test_server.py pin the individual refusals; this file looks for the inputs nobody thought of.

Sized for a 2-core CPU: 16x16 images (a protection takes milliseconds), one app shared by every
example of a test, about 60 examples each."""

from urllib.parse import quote

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# the fixtures and helpers of the hand-written tests, imported (not copied) so both stay in step
from test_server import auth, factory, home, keys, photo, problem, serve, token_for  # noqa: F401

aio = pytest.mark.asyncio

# hypothesis runs all the examples inside one call of the test function, so a function-scoped
# fixture (the app, the token) is shared by them: that is wanted here, not a mistake
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = (16, 16)
REAL = [photo("PNG", TINY), photo("JPEG", TINY)]
# header values the HTTP client can put on the wire (it refuses CR, LF and NUL itself); above
# ASCII so that the server meets UTF-8 and Latin-1 bytes in headers as well
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x17F, exclude_characters="\x7f"),
                      max_size=40)


@st.composite
def mangled(draw) -> bytes:
    """A real PNG or JPEG with bits flipped, cut short, or junk appended: the decoders' edge cases."""
    body = bytearray(draw(st.sampled_from(REAL)))
    for action in draw(st.lists(st.sampled_from(["flip", "cut", "append"]), max_size=4)):
        if action == "flip" and body:
            at = draw(st.integers(0, len(body) - 1))
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            body = body[:draw(st.integers(0, len(body)))]
        else:
            body += draw(st.binary(max_size=64))
    return bytes(body)


BODIES = st.one_of(st.binary(max_size=512), mangled(), st.sampled_from(REAL))
CONTENT_TYPES = st.one_of(
    st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/", "application/octet-stream",
                     "multipart/form-data", "multipart/form-data; boundary=zz", "text/plain", "application/json",
                     "image/png; charset=utf-8", ""]),
    HEADER_TEXT)
FILE_NAMES = st.one_of(
    st.none(),
    st.text(max_size=30).map(lambda name: quote(name, safe="")),  # valid percent-encoded UTF-8 (or empty)
    st.binary(min_size=1, max_size=12).map(lambda raw: "".join(f"%{b:02X}" for b in raw)),  # maybe not UTF-8
    st.sampled_from(["photo.png", "a/b.png", "..%2F..%2Fetc", "%", "%zz", "%C3", "%E2%80%AEgnp.exe", "%00"]),
    HEADER_TEXT)
SITES = st.one_of(
    st.none(),
    st.sampled_from(["https://a.example", "http://a.example/", "https://a.example:99999", "http://[::1]",
                     "https://é.example", "https://xn--9ca.example", "ftp://a.example", "https://u@a.example",
                     "https://a.example/path", "https://a.example/?q=1", "//a.example", "https://", ""]),
    HEADER_TEXT)
OPTION_KEYS = st.one_of(st.sampled_from(["max_side", "strength", "limit", "a", ""]), st.text(max_size=8))
OPTION_VALUES = st.one_of(st.integers(-5, 10**25).map(str), st.sampled_from(["standard", "strong", "", "0", "16",
                                                                             "٣٢", "1e3", " 8", "0x10"]),
                          st.text(max_size=8))
# a list of pairs, so keys can repeat (`max_side=8&max_side=16`)
OPTIONS = st.lists(st.tuples(OPTION_KEYS, OPTION_VALUES), max_size=3)


async def assert_never_a_server_error(response) -> None:
    """200 with the record id, or a refusal in the API's form; 5xx only as 503 busy + Retry-After."""
    if response.status == 200:
        assert response.headers.get("X-Agent-Record"), response.headers
        return
    assert 400 <= response.status < 500 or response.status == 503, await response.text()
    code = (await response.json(content_type=None))["code"] if response.content_type == "application/json" else None
    await problem(response, response.status, code)  # JSON with exactly {code, message}
    if response.status == 503:
        assert code == "busy" and response.headers.get("Retry-After", "").isdigit()


@pytest_asyncio.fixture
async def fuzzed(serve, factory):  # noqa: F811 (the imported fixtures)
    """One app and token for all the examples of a test; no rate limit in the way, as the property
    is about what each request gets, not about pacing."""
    return await serve(max_body=200_000, rate=10_000.0, burst=10_000), token_for(factory)


@aio
@FUZZ
@given(body=BODIES, content_type=CONTENT_TYPES)
async def test_any_body_and_content_type_get_an_image_or_a_json_refusal(fuzzed, body, content_type):
    client, token = fuzzed
    response = await client.post("/v1/protect", data=body, headers=auth(token, **{"Content-Type": content_type}))
    await assert_never_a_server_error(response)


@aio
@FUZZ
@given(body=st.one_of(mangled(), st.sampled_from(REAL)), file_name=FILE_NAMES, site=SITES, options=OPTIONS)
async def test_any_file_name_site_and_options_get_an_image_or_a_json_refusal(fuzzed, body, file_name, site,
                                                                             options):
    client, token = fuzzed
    headers = auth(token, **{"Content-Type": "image/png"})
    for name, value in (("X-File-Name", file_name), ("X-Site", site)):
        if value is not None:
            headers[name] = value
    response = await client.post("/v1/protect", params=options, data=body, headers=headers)
    await assert_never_a_server_error(response)
