"""Small weight files fetched once at run time (face detector, face recogniser), with integrity checks.

    >>> path = fetch(WeightsFile("x.pth", "https://example.org/x.pth", "X_SHA256", "x weights (2 MB)"))

The rules every such file follows:
- streamed to a `.part` file and renamed only when complete, so an interrupted download never looks whole;
- refused when larger than `max_bytes` (a wrong answer from a server is not the file);
- checked against a sha256 pinned in code or in an environment variable; with none pinned, the first file's
  hash is recorded in `<file>.sha256` beside it and any later file must match it (trust on first use);
- a file that is missing while downloads are off, or that fails its check, raises an error that says
  where to copy the file by hand.

Loading is the caller's job, always with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0  # per connect and per read: an offline machine must reach its fallback quickly


def cache_dir() -> Path:
    """Our cache folder: $FASTCOMPOSER_CACHE, else ~/.cache/fastcomposer."""
    return Path(os.environ.get("FASTCOMPOSER_CACHE") or Path.home() / ".cache" / "fastcomposer")


_cache_root = cache_dir  # for methods whose `cache_dir` argument shadows the function


HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to the Hub; an answer, even a slow one, means "try it properly"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_probed: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, reason); a probe holds for a minute


def hub_unreachable(ttl_s: float = 60.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached at all, or None when it might be.

    huggingface_hub retries a failed request five times with pauses of up to 8 s, whatever the error, so an
    offline machine waited half a minute for each file before falling back. Retrying helps when the Hub answers
    with an error, not when its name does not resolve or nothing listens: those two are checked here, in
    milliseconds, so callers go straight to their offline path. Anything else (a slow answer, a proxy in the way,
    HF_HUB_OFFLINE set by the user, which huggingface_hub honours itself) returns None and is left to the library.
    """
    import socket
    import time
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in _PROXY_VARS):  # the proxy resolves and connects, not this machine
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or (80 if endpoint.startswith("http:") else 443)
    cached = _probed.get(endpoint)
    if cached is not None and time.monotonic() - cached[0] < ttl_s:
        return cached[1]
    reason = None
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4]
        with socket.create_connection(address[:2], timeout=HUB_PROBE_TIMEOUT_S):
            pass
    except socket.gaierror:
        reason = f"the name {host} does not resolve (no internet, or no DNS)"
    except ConnectionRefusedError:
        reason = f"{host} refused the connection"
    except OSError as e:  # a timeout or an unreachable network: leave the verdict to the library's own retries
        logger.debug("Hub probe inconclusive: %s", type(e).__name__)
    _probed[endpoint] = (time.monotonic(), reason)
    return reason


class DownloadError(RuntimeError):
    """A weights file could not be had or failed its integrity check; the message says how to fix it."""


@dataclass(frozen=True)
class WeightsFile:
    """One downloadable weights file and how to check it."""

    name: str  # the file name, in the cache folder and in messages
    url: str  # where it is downloaded from
    sha256_env: str  # the environment variable that pins its sha256
    description: str  # for the log line at download time, e.g. "RetinaFace weights (about 105 MB)"
    sha256: str | None = None  # a hash pinned in code; the environment variable wins over it
    max_bytes: int = 256 * 2**20  # a larger answer is not the file
    subdir: str = "facexlib"  # folder under our cache root

    def expected_sha256(self) -> str | None:
        """The pinned hash: ${sha256_env}, else `sha256`, lower-cased; None when nothing is pinned."""
        value = os.environ.get(self.sha256_env) or self.sha256
        return value.strip().lower() if value else None

    def path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """Where the file lives: `cache_dir`, else $FASTCOMPOSER_CACHE/<subdir> (~/.cache/fastcomposer/...)."""
        return (Path(cache_dir) if cache_dir else _cache_root() / self.subdir) / self.name


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download(
    url: str,
    dest: Path,
    max_bytes: int,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    error: type[Exception] = DownloadError,
) -> None:
    """Stream `url` to `dest` through a .part file, so an interrupted download never looks complete."""
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            written = 0
            while chunk := response.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise error(f"the download of {dest.name} is larger than {max_bytes} bytes")
                out.write(chunk)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def fetch(
    spec: WeightsFile,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
    sha256: str | None = None,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    error: type[Exception] = DownloadError,
) -> Path:
    """The path of the integrity-checked file `spec`, downloaded once into the cache if needed.

    Args:
        spec: which file (see `WeightsFile`).
        cache_dir: the folder; defaults to `spec.path()`'s.
        allow_download: when False, only a file already in the folder is used.
        sha256: the hash to demand, else `spec.expected_sha256()`. With none pinned, the first file's hash is
            recorded in `<file>.sha256` and a later file with another hash is refused (trust on first use).
        timeout: seconds per connect and per read.
        error: the exception class to raise (a subclass of the caller's, so callers catch their own).

    Raises:
        `error`: missing and not downloadable, too large, or the wrong hash. `OSError`: the download failed.
    """
    path = spec.path(cache_dir)
    record = path.with_name(f"{spec.name}.sha256")
    pinned = (sha256 or "").strip().lower() or spec.expected_sha256()
    downloaded = False
    if not path.is_file():
        if not allow_download:
            raise error(
                f"{spec.name} is not in the cache and downloads are turned off; download it from {spec.url} "
                f"and copy it to {path}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading %s from %s", spec.description, spec.url)
        download(spec.url, path, spec.max_bytes, timeout, error)
        downloaded = True
    actual = sha256_file(path)
    recorded = record.read_text().split()[:1] if record.is_file() else []
    wanted = pinned or (recorded[0] if recorded else None)
    if wanted is not None and actual != wanted:
        if downloaded:  # never leave a bad download where the next start would find it
            path.unlink(missing_ok=True)
        source = "pinned" if pinned else "recorded at the first download"
        raise error(
            f"{spec.name} has sha256 {actual}, but {source} is {wanted}; refusing it. "
            f"Delete the file to download it again, or set {spec.sha256_env} if the new file is trusted."
        )
    if wanted is None:
        record.write_text(f"{actual}  {spec.name}\n")
        logger.info("Recorded sha256 %s of %s; pin it with %s", actual, spec.name, spec.sha256_env)
    return path
