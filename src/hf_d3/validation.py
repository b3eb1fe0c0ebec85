"""Checks of the settings' values where they enter (`hf_d3.config`): each one's type, and the range of every count
and rate, so a bad value stops the run at once with its name, its value and what would be valid."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

# The smallest valid value of each count and rate that has one (None stays valid where the field allows it).
AT_LEAST: dict[str, float] = {
    "max_train_per_class": 1, "max_test_examples": 1, "collective_timeout_s": 1, "net_width": 1, "net_depth": 1,
    "trajectory_epochs": 1, "expert_batch_size": 1, "latent_dim": 1, "logvar_dim": 1, "init_images_per_component": 1,
    "syn_steps": 1, "expert_epochs": 1, "syn_batch_size": 1, "mmd_samples_per_class": 1, "checkpoint_every": 1,
    "eval_steps": 1, "eval_batch_size": 1, "eval_seeds": 1, "iterations": 0, "init_steps": 0, "teacher_epochs": 0,
    "max_distill_time_s": 0, "lr_latents": 0, "lr_decoder": 0, "lr_lr": 0, "seed": 0,
}
# Rates that must be above zero, and lists whose every entry must be.
ABOVE_ZERO = ("expert_lr", "eval_lr", "init_lr", "syn_lr_init", "relabel_temperature", "storage_budget_ipc",
              "mmd_bandwidths", "decoder_channels")
# Weights that must lie in [0, 1].
UNIT_INTERVAL = ("hard_label_weight",)
HUB_IDS = ("hub_model_id", "hub_dataset_id")
# What HfArgumentParser reads as a bool from text (`string_to_bool`).
_BOOL_TEXT = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def field_types(groups: Iterable[type]) -> dict[str, Any]:
    """Every flat setting name -> its annotated type, from the group dataclasses."""
    return {name: hint for group in groups for name, hint in typing.get_type_hints(group).items()}


def _fits(value: Any, hint: Any, from_text: bool) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, arg, from_text) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0], False) for v in value)
    if from_text and isinstance(value, str) and hint in (int, float, bool):  # the parser converts it, if it can
        if hint is bool:
            return value.lower() in _BOOL_TEXT
        try:
            hint(value)
        except ValueError:
            return False
        return True
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    return isinstance(value, int | float) if hint is float else isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")


def check_types(values: Mapping[str, Any], types_by_name: Mapping[str, Any], where: str = "",
                from_text: bool = False) -> None:
    """Refuse the first setting whose value is not of its field's type (names not in `types_by_name` are left to
    the unknown-key check). With `from_text` (a YAML file), a string the command-line parser converts is fine:
    YAML 1.1 reads `1e-6` as a string."""
    for name, value in values.items():
        hint = types_by_name.get(name)
        if hint is not None and not _fits(value, hint, from_text):
            raise ValueError(f"{name}={value!r} ({type(value).__name__}){where} is not valid; valid: a value of "
                             f"type {_type_name(hint)}")


def check_ranges(values: Mapping[str, Any]) -> None:
    """Refuse a count or rate out of its range, and a Hub repo id that the Hub would refuse at the end of the run."""
    for name, least in AT_LEAST.items():
        if values.get(name) is not None and values[name] < least:
            raise ValueError(f"{name}={values[name]!r} must be >= {least}")
    for name in ABOVE_ZERO:
        value = values.get(name)
        if value is not None and min(value if isinstance(value, list) else [value], default=1) <= 0:
            raise ValueError(f"{name}={value!r} is not valid; valid: {'entries ' * isinstance(value, list)}> 0")
    for name in UNIT_INTERVAL:
        if values.get(name) is not None and not 0 <= values[name] <= 1:
            raise ValueError(f"{name}={values[name]!r} is not valid; valid: 0 to 1")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    for name in HUB_IDS:
        if values.get(name) is not None:
            try:
                validate_repo_id(values[name])
            except HFValidationError as error:
                raise ValueError(f"{name}={values[name]!r} is not a valid Hub repo id ({error}); valid: "
                                 "'user/name' of letters, digits, '-', '_' and '.'") from None
