"""Documenting a run (plots + model card in `output_dir`) and publishing it to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers.utils import logging

from .arguments import CLIPTrainingArguments, ConfigError

logger = logging.get_logger(__name__)

# What a failed Hub call can raise besides HTTP errors: no network at all.
NETWORK_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, OSError)


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


def evaluation_before_training(log_history: list[dict]) -> dict[str, float] | None:
    """The metrics of an evaluation at step 0 (`eval_on_start`), if the run made one."""
    for entry in log_history:
        if entry.get("step") == 0 and any(key.startswith("eval_") for key in entry):
            return {key: value for key, value in entry.items() if key.startswith("eval_")}
    return None


def document_run(trainer, card_info: dict, eval_after: dict[str, float] | None) -> str:
    """Writes the training curves and the model card (`README.md`) into `output_dir`; returns the card's path."""
    from .model_card import non_default_training_arguments, write_model_card
    from .plots import save_training_plots

    output_dir = trainer.args.output_dir
    plots = save_training_plots(trainer.state.log_history, output_dir)
    return write_model_card(
        output_dir,
        model_name=card_info["model_name"],
        repo_id=card_info.get("repo_id"),
        base_model=card_info.get("base_model"),
        dataset_name=card_info.get("dataset_name"),
        num_train_pairs=card_info.get("num_train_pairs"),
        num_eval_pairs=card_info.get("num_eval_pairs"),
        eval_before=evaluation_before_training(trainer.state.log_history),
        eval_after=eval_after,
        hyperparameters=card_info.get("hyperparameters") or non_default_training_arguments(trainer.args),
        license=card_info.get("license"),
        plots=plots,
    )
