"""The MCP tool `compose` through a real MCP client (the `mcp` package, streamable HTTP), and the rules for photo
URLs (inputs/remote.py): every refusal, each checked on its own. Photos come from a server on 127.0.0.1 that the
test starts; no other address is ever contacted (DNS answers are stood in for where a test needs a name)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import socket
import threading
import time
from pathlib import Path

import PIL.Image
import pytest

import app as app_module
from fastcomposer.inputs import remote
from fastcomposer.inputs.faces import FaceCropper
from fastcomposer.inputs.remote import FetchPolicy, RemotePhotoError, is_public, photo_from

from .app_helpers import Args

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LOCAL = FetchPolicy(allow_private=True)


class Handler(http.server.SimpleHTTPRequestHandler):
    """The bundled photos, plus paths that misbehave on purpose."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(ASSETS), **kwargs)

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/hop"):  # a redirect to the address the test names in the query
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 5000)
        elif self.path == "/slow":
            time.sleep(2)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/text":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"not a photo at all")
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def photo_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def data_uri(name: str = "astronaut.png") -> str:
    return "data:image/png;base64," + base64.b64encode((ASSETS / name).read_bytes()).decode()


# --- the URL rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1"])
def test_loopback_private_link_local_and_metadata_addresses_are_not_public(address):
    assert not is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_are(address):
    assert is_public(address)


def test_a_loopback_url_is_refused_on_a_public_server_and_taken_on_a_local_one(photo_server):
    with pytest.raises(RemotePhotoError, match="127.0.0.1 is not a public address"):
        photo_from(f"{photo_server}/astronaut.png")
    assert photo_from(f"{photo_server}/astronaut.png", LOCAL).size == (512, 512)


def test_a_name_that_resolves_to_a_private_address_is_refused(monkeypatch):
    """DNS tricks: a public-looking name with a private answer, or a private address among public ones."""
    answers = {"photos.example": ["8.8.8.8", "10.0.0.5"], "rebind.example": ["127.0.0.1"]}

    def fake_dns(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers.get(host, [host])]

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    for host in answers:
        with pytest.raises(RemotePhotoError, match=f"{host} is not a public address"):
            photo_from(f"http://{host}/me.jpg")


def test_a_redirect_is_checked_again_and_the_connection_goes_to_the_checked_address(photo_server, monkeypatch):
    """first.test resolves to the test server (counted as public here); its redirect to second.test, which
    resolves to 127.0.0.2 (not public), is refused before any connection to it."""
    port = int(photo_server.rsplit(":", 1)[1])
    answers = {"first.test": "127.0.0.1", "second.test": "127.0.0.2"}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, p, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6,
                                                                           "", (answers.get(host, host), p))])
    monkeypatch.setattr(remote, "is_public", lambda address: address == "127.0.0.1")
    assert photo_from(f"http://first.test:{port}/astronaut.png").size == (512, 512)  # pinned to 127.0.0.1
    with pytest.raises(RemotePhotoError, match="second.test is not a public address"):
        photo_from(f"http://first.test:{port}/hop?to=http://second.test:{port}/astronaut.png")


def test_too_many_redirects_too_large_too_slow_and_not_a_photo(photo_server):
    loop = f"{photo_server}/hop?to=" * 5 + f"{photo_server}/astronaut.png"
    with pytest.raises(RemotePhotoError, match="more than 3 redirects"):
        photo_from(loop, LOCAL)
    with pytest.raises(RemotePhotoError, match="larger than"):
        remote.fetch_bytes(f"{photo_server}/big", FetchPolicy(allow_private=True, max_bytes=1000))
    with pytest.raises(RemotePhotoError, match="no answer within 0.5 s"):
        remote.fetch_bytes(f"{photo_server}/slow", FetchPolicy(allow_private=True, timeout_s=0.5))
    with pytest.raises(ValueError, match="photo 1 of subject 1"):
        photo_from(f"{photo_server}/text", LOCAL, "photo 1 of subject 1")  # the safe loader's word on it


@pytest.mark.parametrize(("source", "message"), [
    ("file:///etc/passwd", "only http"), ("ftp://example.org/a.png", "only http"),
    ("data:text/plain;base64,aGk=", "data:image"), ("data:image/png;base64,@@@", "not valid base64"),
])
def test_other_schemes_and_bad_data_uris_are_refused(source, message):
    with pytest.raises(RemotePhotoError, match=message):
        photo_from(source)


def test_a_data_uri_is_a_photo():
    assert photo_from(data_uri("grace_hopper.jpg").replace("image/png", "image/jpeg")).size == (512, 600)


# --- the tool, through an MCP client -----------------------------------------------------------------------


def serve(tiny_pipe, allow_private: bool):
    demo = app_module.create_demo(lambda: tiny_pipe, cropper=FaceCropper(allow_download=False),
                                  allow_private_urls=allow_private)
    app_module.launch(demo, Args(), prevent_thread_lock=True, quiet=True, mcp_server=True)
    return demo


def mcp_session(url: str, calls: list[dict]) -> tuple[list, list]:
    """List the tools, then make each call in turn with one MCP client session: (tools, results)."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                results = []
                for call in calls:
                    progress = []
                    callback = ((lambda p, t, m, seen=progress: seen.append(m)) if call.pop("_progress", False)
                                else None)
                    results.append((await session.call_tool("compose", call, progress_callback=callback), progress))
                return tools, results

    return asyncio.run(run())


@pytest.fixture(scope="module")
def local_tool(tiny_pipe):
    demo = serve(tiny_pipe, allow_private=True)
    yield demo.local_url
    demo.close()


def small(**kw) -> dict:
    return {"preset": "fast", "num_images": 1, "seed": 3, **kw}


def test_the_server_offers_one_tool_described_for_a_model(local_tool):
    tools, _ = mcp_session(local_tool, [])
    assert [t.name for t in tools] == ["compose"]  # not /generate, not the page's helpers
    tool = tools[0]
    assert "`img` right after the word for each person" in tool.description
    assert "the 1st `img` is the person in subject_1_photos" in tool.description
    props = tool.inputSchema["properties"]
    assert list(props) == ["prompt", "subject_1_photos", "subject_2_photos", "subject_3_photos", "subject_4_photos",
                           "seed", "preset", "alpha", "num_images", "layout_boxes"]
    assert "data:image" in props["subject_1_photos"]["description"] and tool.inputSchema["required"] == ["prompt",
                                                                                                          "subject_1_photos"]


def test_photos_by_url_and_by_data_uri_come_back_as_images_and_errors_as_tool_errors(local_tool, photo_server):
    url = f"{photo_server}/astronaut.png"
    _, results = mcp_session(local_tool, [
        small(prompt="a woman img reading", subject_1_photos=url, num_images=2, _progress=True),
        small(prompt="a woman img and a man img", subject_1_photos=url),  # two `img`, one subject
        small(prompt="a woman img", subject_1_photos=f"{photo_server}/text"),  # not a photo
        small(prompt="a man img and a woman img", subject_1_photos=data_uri("grace_hopper.jpg"),
              subject_2_photos=f"{url} {data_uri()}", layout_boxes="0,0,0.5,1 | 0.5,0,1,1"),
    ])
    (first, progress), (mismatch, _), (text, _), (last, _) = results
    assert not first.isError
    kinds = [c.type for c in first.content]
    assert kinds.count("image") == 2 and "seed 3" in first.content[-1].text and "2 image(s)" in first.content[-1].text
    assert not any(c.type == "text" and c.text == "None" for c in first.content)  # no word for the empty slots
    assert any(m and "step" in m for m in progress)  # the run reported its steps to the client
    assert mismatch.isError and "2 subject(s) in the prompt but 1 photo(s)" in mismatch.content[0].text
    assert text.isError and "photo 1 of subject 1" in text.content[0].text
    assert not last.isError and [c.type for c in last.content].count("image") == 1  # the next call works
    assert "layout 0,0,0.5,1 | 0.5,0,1,1" in last.content[-1].text


def test_a_public_server_refuses_a_local_address_and_still_works(tiny_pipe, photo_server):
    demo = serve(tiny_pipe, allow_private=False)
    try:
        _, results = mcp_session(demo.local_url, [
            small(prompt="a woman img", subject_1_photos=f"{photo_server}/astronaut.png"),
            small(prompt="a woman img", subject_1_photos="http://169.254.169.254/latest/meta-data/"),
            small(prompt="a woman img", subject_1_photos=data_uri()),
        ])
    finally:
        demo.close()
    (loopback, _), (metadata, _), (ok, _) = results
    assert loopback.isError and "127.0.0.1 is not a public address" in loopback.content[0].text
    assert metadata.isError and "169.254.169.254 is not a public address" in metadata.content[0].text
    assert not ok.isError and ok.content[0].type == "image"


def test_generate_stays_for_gradio_client_and_the_helpers_are_undocumented(local_tool):
    import httpx

    info = httpx.get(local_tool + "gradio_api/info").json()
    assert set(info["named_endpoints"]) == {"/generate", "/compose"}
    from gradio_client import Client

    from .app_helpers import request

    gallery, seed, _ = Client(local_tool, verbose=False).predict(**request(seed=11), api_name="/generate")
    assert seed == 11 and len(gallery) == 1
    for helper in ("/hint", "/stop", "/restore_settings"):  # still callable, as the tests of the page call them
        assert helper not in info["named_endpoints"]


def test_a_photo_in_memory_round_trips(photo_server):
    image = photo_from(f"{photo_server}/camera.png", LOCAL)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert PIL.Image.open(io.BytesIO(buffer.getvalue())).size == image.size
