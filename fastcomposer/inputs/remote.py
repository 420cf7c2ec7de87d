"""Photos given as URLs or data URIs (the MCP tool's inputs), fetched only where it is safe to.

A tool that takes photo URLs makes the server fetch URLs a visitor chose: without care, a request for
`http://169.254.169.254/...` or `http://localhost:8080/admin` reads the server's own network. So, in public and
Space mode:

- only `http` and `https` URLs, or `data:image/...;base64,` URIs;
- the host is resolved **once**, every address it resolves to must be public (not loopback, private, link-local,
  multicast, reserved or unspecified: the cloud metadata address 169.254.169.254 is link-local), and the
  connection goes to that very address (a second DNS answer cannot swap in another one);
- redirects are followed by hand, at most `MAX_REDIRECTS`, each new URL checked the same way;
- the body is read in chunks and cut off past the upload limit (10 MB); connecting and each read time out;
- what arrives goes through the same safe image loader as an upload (format, size, decompression bombs).

A local or private server can allow local addresses (`allow_private=True`; the app's `--allow-private-urls`).

What Gradio already does, and why this is written here: Gradio 6.31 fetches the URLs of its own file inputs
through `safehttpx` (a public-address check on the resolved address, pinned for the connection, and redirects
re-checked). The tool takes its photos as text (several per subject, data URIs too), so those checks never see
them; and safehttpx also asks Google's DNS-over-HTTPS when the local answer is not public (an outside request
carrying the visitor's hostname), reads the whole body with no size cap, and trusts `*.hf.co` hosts without a
check. So the tool's fetches go through this module alone.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from ..config import SETTINGS
from ..messages import UserFacingError

MAX_REDIRECTS = 3
TIMEOUT_S = 5.0  # to connect, and for each read
MAX_BYTES = 10 * 2**20  # the upload limit (`Limits.max_file_size`, 10 MB)


class RemotePhotoError(UserFacingError, ValueError):
    """A photo URL that is refused or cannot be had; the message says which and why."""


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may do."""

    allow_private: bool = False  # also loopback and private addresses (a local tool, or tests)
    max_bytes: int = MAX_BYTES
    timeout_s: float = TIMEOUT_S


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified)


def resolve(host: str, port: int, policy: FetchPolicy, label: str) -> str:
    """The one address to connect to: every address the host resolves to must be allowed (a host answering with
    a public and a private address could be steered to the private one), then the first is used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise RemotePhotoError(f"{label}: the host {host!r} does not resolve") from None
    addresses = [info[4][0] for info in infos]
    if not policy.allow_private and not all(is_public(a) for a in addresses):
        raise RemotePhotoError(f"{label}: {host} is not a public address; only public http(s) URLs are fetched")
    return addresses[0]


def fetch_bytes(url: str, policy: FetchPolicy = FetchPolicy(), label: str = "the photo") -> bytes:
    """The body of `url` (http or https), under the rules above. Raises `RemotePhotoError`."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemotePhotoError(f"{label}: only http(s) URLs and data:image URIs are taken, not {url[:60]!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = resolve(parts.hostname, port, policy, label)
        try:
            return _get_pinned(url, parts.hostname, address, policy, label)
        except _Redirect as hop:  # its target goes through every check again
            url = hop.location
    raise RemotePhotoError(f"{label}: more than {MAX_REDIRECTS} redirects")


def _get_pinned(url: str, host: str, address: str, policy: FetchPolicy, label: str) -> bytes:
    """GET `url` connected to `address` (the name kept for TLS and the Host header); a redirect raises
    `_Redirect` with its target."""
    target = httpx.URL(url).copy_with(host=address)
    headers = {"Host": httpx.URL(url).netloc.decode()}
    timeout = httpx.Timeout(policy.timeout_s)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("GET", target, headers=headers, extensions={"sni_hostname": host})
            response = client.send(request, stream=True)
            try:
                if response.is_redirect:
                    raise _Redirect(urljoin(url, response.headers.get("location", "")))
                if response.status_code != 200:
                    raise RemotePhotoError(f"{label}: the server answered {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise RemotePhotoError(f"{label} is larger than {policy.max_bytes // 2**20} MB")
                return bytes(body)
            finally:
                response.close()
    except httpx.TimeoutException:
        raise RemotePhotoError(f"{label}: no answer within {policy.timeout_s:g} s") from None
    except httpx.HTTPError as e:
        raise RemotePhotoError(f"{label} could not be fetched ({type(e).__name__})") from None


class _Redirect(Exception):
    def __init__(self, location: str):
        self.location = location


def photo_from(source: str, policy: FetchPolicy = FetchPolicy(), label: str = "the photo") -> Image.Image:
    """A photo from a URL or a `data:image/...;base64,` URI, safely loaded (see images.py)."""
    from .images import load_image

    source = source.strip()
    if source.startswith("data:"):
        head, _, payload = source.partition(",")
        if not head.startswith("data:image/") or ";base64" not in head:
            raise RemotePhotoError(f"{label}: a data URI must be data:image/...;base64,...")
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise RemotePhotoError(f"{label} is larger than {policy.max_bytes // 2**20} MB")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RemotePhotoError(f"{label}: the data URI is not valid base64") from None
    else:
        data = fetch_bytes(source, policy, label)
    return load_image(data, name=label, limits=SETTINGS.limits)
