"""Fail fast when the Hugging Face Hub cannot be reached.

huggingface_hub retries a failed connection five times with backoff (about a minute) for each file it looks up, and
a model or dataset load looks up several, each retry printed. Before ftkit first looks something up on the Hub it
makes one short connection attempt; when that fails, the process switches to huggingface_hub's and datasets' offline
mode (the same as HF_HUB_OFFLINE=1), so what is cached loads from the cache and anything else fails at once, with an
error that says the Hub was unreachable. Behind a proxy (HTTPS_PROXY, ALL_PROXY) no direct attempt can tell, so
there is none.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT = 5.0  # seconds: a reachable Hub answers a TCP connect well within this
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
_UNKNOWN = object()
_unreachable: object | str | None = _UNKNOWN  # per process: None (reachable) or why not


def _probe() -> str | None:
    """Why a TCP connection to the Hub endpoint fails, or None when it succeeds (or a proxy is in the way)."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        return f"{host}: {e.strerror or e.__class__.__name__}"
    return None


def offline_reason() -> str | None:
    """Why this process cannot use the Hub (offline mode set by the user, or no connection), or None."""
    global _unreachable
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)" if _unreachable in (_UNKNOWN, None) else str(_unreachable)
    if _unreachable is _UNKNOWN:
        _unreachable = _probe()
        if _unreachable is not None:
            _go_offline()
            from ftkit.run.rundir import say

            say(f"note: the Hugging Face Hub cannot be reached ({_unreachable}); using the local cache only")
    return _unreachable  # type: ignore[return-value]


def _go_offline() -> None:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def not_cached(key: str, name: str, reason: str) -> str:
    """The one line for a recipe value (`key`: model.base, task.options.dataset) that names neither a local path
    nor something in the Hugging Face cache, while the Hub cannot be used."""
    from pathlib import Path

    return (
        f"{key}={name!r}: no such local path ({Path(name).resolve()}), not in the local Hugging Face cache, and "
        f"the Hub cannot be used ({reason}); connect to the network, or set {key} to a local copy"
    )
