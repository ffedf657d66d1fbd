"""W&B mode as timm leaves it: the user's WANDB_MODE wins, else online with credentials only."""

from __future__ import annotations

import pytest

from conftest import ensure_research

ensure_research()
from utils.compat import set_wandb_mode, wandb_has_credentials  # noqa: E402


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_no_credentials_means_offline(clean_env, monkeypatch):
    assert not wandb_has_credentials()
    assert set_wandb_mode() == "offline"


def test_api_key_means_online(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert set_wandb_mode() == "online"
    import os

    assert "WANDB_MODE" not in os.environ  # left to wandb, as timm does


def test_wandb_login_netrc_means_online(clean_env):
    clean_env.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    clean_env.chmod(0o600)
    assert wandb_has_credentials()
    assert set_wandb_mode() == "online"


def test_netrc_for_another_host_is_not_a_login(clean_env):
    clean_env.write_text("machine example.com\n  login user\n  password secret\n")
    clean_env.chmod(0o600)
    assert set_wandb_mode() == "offline"


def test_users_choice_wins(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert set_wandb_mode() == "disabled"
