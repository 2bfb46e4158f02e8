"""Files from the Hugging Face hub (DA3 and Concerto weights), failing fast when it is out of reach.

``huggingface_hub`` retries a failed connection several times with back-off and logs a warning
for each try: on a machine without network access a run would print a screen of warnings and
wait about half a minute before saying anything useful. :func:`hub_folder` therefore looks in
the local hub cache first (no network), then makes one quick TCP connection to the hub's
endpoint (skipped behind an HTTP(S) proxy, which a direct connection cannot judge), and only
then downloads, with the library's own warnings silenced. Every failure is one
:class:`~vggt4d.errors.UserError` line that says how to get the files by hand.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from vggt4d.errors import UserError

PROBE_TIMEOUT_S = 5.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")


def unreachable_reason() -> str | None:
    """Why the hub cannot be reached right now, or ``None`` when it may be."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: dict[str, object] = {}

    def connect() -> None:  # name resolution ignores socket timeouts: bounded by the join
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = err.strerror or str(err)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(2 * PROBE_TIMEOUT_S)
    if "ok" in outcome:
        return None
    return f"{host}:{port} is not reachable: {outcome.get('error', 'no answer in time')}"


def hub_folder(repo_id: str, filenames: list[str], what: str, remedy: str) -> Path:
    """The local snapshot folder of hub repo ``repo_id`` holding ``filenames``, downloading what
    the cache lacks. Failures raise ``cannot download {what} from the Hugging Face hub
    (reason): {remedy}``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    def complete(folder: str) -> Path | None:
        path = Path(folder)
        return path if all((path / name).is_file() for name in filenames) else None

    def fail(reason: str) -> UserError:
        return UserError(f"cannot download {what} from the Hugging Face hub ({reason}): {remedy}")

    try:
        cached = complete(snapshot_download(repo_id, allow_patterns=filenames,
                                            local_files_only=True))
    except Exception:  # not in the cache (the library raises several types for that)
        cached = None
    if cached is not None:
        return cached
    reason = unreachable_reason()
    if reason is not None:
        raise fail(reason)
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        folder = snapshot_download(repo_id, allow_patterns=filenames)
    except Exception as err:  # network, authorisation, missing repo: all mean the same here
        raise fail(str(err).splitlines()[0][:160] if str(err) else type(err).__name__) from None
    finally:
        hub_logging.set_verbosity(verbosity)
    found = complete(folder)
    if found is None:
        raise fail(f"the repo has no {', '.join(filenames)}")
    return found
