"""The Hugging Face Hub as the commands read from it: what a failed lookup of a Hub id means, in words."""

from __future__ import annotations

import os

# The variables that keep huggingface_hub (and so transformers) off the network: only the local cache is read.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_variable() -> str | None:
    """The name of the environment variable that puts the Hub in offline mode (`OFFLINE_VARIABLES`, set to 1, true,
    yes or on, as huggingface_hub reads them), or None where downloads are allowed."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def hub_lookup_failure(what: str, err: BaseException) -> str:
    """Why `what` (e.g. ``"init_from=user/model"``), a Hub id that is no local path, could not be read, in one line.

    In offline mode (`offline_variable`) the id is simply not in the local Hugging Face cache, and the message says
    so and how to go on; transformers' own message then asks to check the internet connection, which is not the
    cause. Otherwise the library's error (`err`) as it is: no network, a misspelt or private repository, a
    revision that does not exist."""
    variable = offline_variable()
    if variable is not None:
        return (
            f"{what}: not a local path, and not in the local Hugging Face cache; {variable} is set, so nothing is "
            f"downloaded: unset it to download from the Hub, or give a local folder"
        )
    return f"{what}: cannot be loaded ({type(err).__name__}: {err})"
