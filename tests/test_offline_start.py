"""Without internet the app starts at once in preview mode: an unreachable Hub is recognised in milliseconds
(a name that does not resolve, a refused connection) instead of after huggingface_hub's five retries."""

from __future__ import annotations

import logging
import socket

import pytest

from fastcomposer import downloads
from fastcomposer.models import weights
from fastcomposer.models.weights import WeightsUnavailableError


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    downloads._probed.clear()
    for name in downloads._PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    downloads._probed.clear()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_a_name_that_does_not_resolve(monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert "does not resolve" in downloads.hub_unreachable()


def test_a_refused_connection_and_a_listening_server(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert "refused the connection" in downloads.hub_unreachable()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert downloads.hub_unreachable() is None  # it answers: the download gets its real try


def test_behind_a_proxy_the_library_decides(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert downloads.hub_unreachable() is None


def test_the_download_looks_only_in_the_local_cache_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    calls = []

    def fake_download(*args, **kwargs):
        calls.append(kwargs)
        raise FileNotFoundError("not in the local cache")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with caplog.at_level(logging.WARNING), pytest.raises(WeightsUnavailableError) as error:
        weights.download_checkpoint("main")
    assert calls == [{"revision": "main", "local_files_only": True}]
    assert "refused the connection" in str(error.value) and "Retrying" not in caplog.text


def test_the_app_starts_in_preview_mode_with_the_reason(monkeypatch, tmp_path):
    import app as app_module

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("FASTCOMPOSER_CACHE", str(tmp_path))
    monkeypatch.delenv("FASTCOMPOSER_WEIGHTS", raising=False)
    args = app_module.build_parser().parse_args(["--device", "cpu"])
    pipe, banner = app_module.load_or_preview(args)
    assert pipe.weights_label.startswith("tiny") and "refused the connection" in banner
