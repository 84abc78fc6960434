"""Publishing to the Hugging Face Hub: checking access before a run, and naming the errors a failed call raises."""

from __future__ import annotations

import importlib
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers.utils import logging

from .arguments import CLIPTrainingArguments, ConfigError

logger = logging.get_logger(__name__)


def _transport_errors() -> tuple[type[Exception], ...]:
    # huggingface_hub 1.x and 2.x talk HTTP through httpx (2.x: its fork `httpx2`), whose connection and timeout
    # errors are no OSError; which one is installed depends on the huggingface_hub version.
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# What a failed Hub call raises: HTTP errors, offline mode, and no network at all. Not a bare OSError: a full disk
# or a permission error while saving is no network problem and must not be reported as one.
NETWORK_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError, *_transport_errors())


def hub_repo_id(training_args: CLIPTrainingArguments, user: str) -> str:
    """The repository a push goes to: `hub_model_id` (with the user's namespace added when it has none)."""
    name = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    return name if "/" in name else f"{user}/{name}"


def check_hub_access(training_args: CLIPTrainingArguments) -> str:
    """Before any data or model is loaded: is there a token, is the Hub reachable, may this user write the repo?

    Returns the repository id. Raises [`ConfigError`] saying what to do otherwise.
    """
    token = training_args.hub_token or get_token()
    if not token:
        raise ConfigError(
            "`push_to_hub` needs a Hugging Face token with write access: set HF_TOKEN, run `hf auth login`, or "
            "pass --hub_token. Or drop --push_to_hub to keep the model local."
        )
    try:
        identity = HfApi(token=token).whoami()
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise ConfigError(
                "The Hugging Face token was refused (401): it is invalid or expired. Create a new one with write "
                "access at https://huggingface.co/settings/tokens and set HF_TOKEN or run `hf auth login`."
            ) from None
        raise ConfigError(
            f"Cannot reach the Hugging Face Hub to push ({error}). Check the network, or drop --push_to_hub."
        ) from None
    except NETWORK_ERRORS as error:
        raise ConfigError(
            f"Cannot reach the Hugging Face Hub to push ({type(error).__name__}: {error}). Check the network "
            "(and HF_HUB_OFFLINE), or drop --push_to_hub and upload output_dir later with `hf upload`."
        ) from None
    user = identity["name"]
    organizations = {org["name"] for org in identity.get("orgs", [])}
    repo_id = hub_repo_id(training_args, user)
    namespace = repo_id.split("/")[0]
    if namespace != user and namespace not in organizations:
        raise ConfigError(
            f"`hub_model_id` is {repo_id!r}, but the token's user {user!r} cannot write to the namespace "
            f"{namespace!r} (member of: {', '.join(sorted(organizations)) or 'no organizations'}). Use "
            f"--hub_model_id {user}/<name> or an organization you belong to."
        )
    return repo_id
