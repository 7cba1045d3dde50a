"""One Hub commit of a staged folder, and every hub failure as one clear line without the token."""

from __future__ import annotations

import re
from pathlib import Path

from ftkit.errors import FtkitError

NO_TOKEN_HELP = "no Hugging Face token found: run `hf auth login` or set HF_TOKEN"


def find_token() -> str:
    import huggingface_hub

    token = huggingface_hub.get_token()  # HF_TOKEN, then the token file written by `hf auth login`
    if not token:
        raise FtkitError(NO_TOKEN_HELP)
    return token


def upload_folder(folder: Path, repo: str, private: bool, message: str, endpoint: str | None, token: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo,
            [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files],
            commit_message=message,
            repo_type="model",
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear, token-free line
        raise FtkitError(_scrub(_explain(e, api.endpoint, repo), token)) from None
    return str(url)


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client (httpx or its fork httpx2, by version): connection-level failures.
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def _explain(error: Exception, endpoint: str, repo: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "cannot push: offline mode is on (unset HF_HUB_OFFLINE)"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return (
                f"permission denied by {endpoint} (HTTP {status}) for {repo}: the token is invalid or lacks write "
                "access to this namespace; run `hf auth login` with a write token or set HF_TOKEN"
            )
        if status == 404:
            return f"{endpoint}: repo {repo} not found or not accessible with this token (HTTP 404)"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"upload to {endpoint} failed (HTTP {status}): {first[:300]}"
    if isinstance(error, _transport_errors() + (ConnectionError, TimeoutError)):
        return (
            f"cannot reach the Hugging Face Hub at {endpoint} ({error.__class__.__name__}); check the network or "
            "HF_ENDPOINT"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"upload to {endpoint} failed: {error.__class__.__name__}: {first[:300]}"


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
