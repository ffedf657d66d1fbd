"""``--pretrained``: timm weights from the local cache, else downloaded, else one clear error.

timm downloads pretrained weights from the Hugging Face hub (or a URL) when they are not in
the cache. Without network ``huggingface_hub`` retries every file for ~45 s before it fails
with a message that names none of our options, and with ``HF_HUB_OFFLINE`` set it fails at once
with the same message. :func:`pretrained_kwargs` decides before the model is built:

* weights in the cache: timm loads that file directly (no network look-up, hence no retries
  on a machine without network, whether or not ``HF_HUB_OFFLINE`` is set);
* not cached and ``HF_HUB_OFFLINE`` set, or the weights' host unreachable within a few seconds:
  :class:`SetupError` naming the checkpoint option and ``HF_HUB_OFFLINE``;
* otherwise timm downloads them as usual.

The research code never sets ``HF_HUB_OFFLINE`` itself; tests and offline launchers do.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import SetupError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}
# The files timm asks the hub for, in its order, when the config names none.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# Appended to errors of a download that failed after all (flaky network, missing file, ...).
PRETRAINED_HINT = (
    " (--pretrained downloads timm's weights: check the network and HF_HUB_OFFLINE, or pass "
    "--initial-checkpoint FILE)"
)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _cached_file(cfg: Any) -> Path | None:
    """The locally cached weights of a timm pretrained config, or None."""
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for name in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return path
    return None


def _host(cfg: Any) -> str:
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.url).hostname or ""


def _unreachable(host: str) -> str:
    """Why ``host`` cannot be reached on port 443 ('' when it can, or behind a proxy)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""  # only the proxy knows; let the download try
    try:
        with socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S):
            return ""
    except OSError as err:
        return str(err) or type(err).__name__


def pretrained_kwargs(model_name: str, checkpoint_option: str) -> dict[str, Any]:
    """Extra ``timm.create_model`` kwargs for ``--pretrained`` (see the module docstring).

    Unknown model names return ``{}``: ``create_model`` reports them itself.
    """
    from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

    if model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return {}  # timm resolves these sources itself
    if not is_model(split_model_name_tag(model_name)[0]):
        return {}
    cfg = get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise SetupError(
            f"--pretrained: timm has no pretrained weights for {model_name!r}; drop --pretrained "
            f"or load weights of your own with {checkpoint_option} FILE"
        )
    cached = _cached_file(cfg)
    if cached is not None:
        return {"pretrained_cfg_overlay": {"file": str(cached)}}
    where = cfg.hf_hub_id or cfg.url
    if hub_offline():
        reason = "HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        host = _host(cfg)
        problem = _unreachable(host) if host else ""
        if not problem:
            return {}
        reason = f"{host} is unreachable ({problem})"
    raise SetupError(
        f"--pretrained: the weights of {model_name!r} ({where}) are not in the local cache and "
        f"{reason}; run once with network access and HF_HUB_OFFLINE unset to cache them, or "
        f"pass {checkpoint_option} FILE"
    )
