"""Hub downloads: the cache is used without network, an unreachable hub fails at once."""

from __future__ import annotations

import time

import pytest
from huggingface_hub import constants

from vggt4d.errors import UserError
from vggt4d.hub import PROXY_VARIABLES, hub_folder, unreachable_reason

REPO = "depth-anything/DA3-SMALL"
FILES = ["config.json", "model.safetensors"]


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty hub cache, the hub's endpoint on a closed local port, no proxy, not offline."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


def test_an_unreachable_hub_is_one_line_at_once(no_hub):
    assert "127.0.0.1:9 is not reachable" in unreachable_reason()
    start = time.perf_counter()
    with pytest.raises(UserError) as caught:
        hub_folder(REPO, FILES, f"weights '{REPO}'", "use model.weights=random")
    assert time.perf_counter() - start < 5  # huggingface_hub's own retries take ~30 s
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download weights '{REPO}' from the Hugging Face hub")
    assert message.endswith("use model.weights=random")


def test_a_cached_snapshot_needs_no_network(no_hub):
    revision = "0" * 40
    repo_dir = no_hub / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in FILES:
        (snapshot / name).write_text(name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    assert hub_folder(REPO, FILES, "weights", "fix") == snapshot
    (snapshot / FILES[1]).unlink()  # an incomplete snapshot is not enough: the hub is asked
    with pytest.raises(UserError, match="not reachable"):
        hub_folder(REPO, FILES, "weights", "fix")


def test_offline_mode_and_proxies(monkeypatch, no_hub):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert unreachable_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert unreachable_reason() is None  # behind a proxy a direct connection proves nothing
