"""The Hugging Face Hub as the commands read from it: what a failed lookup of a Hub id means, in words."""

from __future__ import annotations

import os
from pathlib import Path

# The variables that keep huggingface_hub (and so transformers) off the network: only the local cache is read.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_variable() -> str | None:
    """The name of the environment variable that puts the Hub in offline mode (`OFFLINE_VARIABLES`, set to 1, true,
    yes or on, as huggingface_hub reads them), or None where downloads are allowed."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache (``HF_HUB_CACHE``) holds anything of the model repository `repo_id`."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir()
    except (ImportError, ValueError, TypeError, OSError):  # (an id the Hub would refuse: not in the cache)
        return False


def hub_lookup_failure(what: str, err: BaseException, repo_id: str) -> str:
    """Why `what` (e.g. ``"init_from=user/model"``), the Hub id `repo_id` (no local path), could not be read, in one
    line.

    In offline mode (`offline_variable`), where the cache holds nothing of `repo_id`, the message says so and how
    to go on: transformers' own then asks to check the internet connection, which is not the cause. Where the
    cache holds some of it, the library's error (`err`: a damaged or missing file) with a note that only cached
    files are read. Online, the library's error as it is: no network, a misspelt or private repository, a
    revision that does not exist."""
    variable = offline_variable()
    if variable is not None and not in_hub_cache(repo_id):
        return (
            f"{what}: not a local path, and not in the local Hugging Face cache; {variable} is set, so nothing is "
            f"downloaded: unset it to download from the Hub, or give a local folder"
        )
    note = f" ({variable} is set: only the files in the local Hugging Face cache are read)" if variable else ""
    return f"{what}: cannot be loaded ({type(err).__name__}: {err}){note}"
