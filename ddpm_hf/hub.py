"""Talking to the Hugging Face Hub: a fast reachability check before `datasets` starts retrying."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from huggingface_hub import constants, get_token

from .errors import UserError

OFFLINE_HINT = (
    "train offline with --dataset_name mnist-5k-offline (bundled digits) or --train_data_dir DIR (local images), "
    "or set HF_HUB_OFFLINE=1 to use a dataset already in the local cache"
)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), read now rather than at import time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def check_dataset_on_hub(repo_id: str, timeout: float = 5.0) -> None:
    """Ask the Hub about ``repo_id`` once, within ``timeout`` seconds.

    `datasets` retries an unreachable Hub for minutes before failing; one quick request lets
    us fail in seconds with a message naming the offline options instead.
    """
    url = f"{hub_endpoint()}/api/datasets/{repo_id}"
    request = urllib.request.Request(url, headers={"User-Agent": "ddpm-hf"})
    token = get_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.load(response)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404):
            raise UserError(
                f"dataset '{repo_id}' was not found on the Hub ({hub_endpoint()} answered {e.code}); "
                "check the id, log in with `hf auth login` if it is private, or pass a local folder"
            ) from None
        raise UserError(f"the Hub answered {e.code} for dataset '{repo_id}'; try again later, or {OFFLINE_HINT}") from None
    except json.JSONDecodeError:
        raise UserError(f"{hub_endpoint()} did not answer like the Hugging Face Hub (no JSON for dataset '{repo_id}'); check HF_ENDPOINT, or {OFFLINE_HINT}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach the Hugging Face Hub at {hub_endpoint()} ({reason}); {OFFLINE_HINT}") from None
