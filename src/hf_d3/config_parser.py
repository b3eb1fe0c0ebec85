"""Settings read from a flat YAML file and the command line into a `D3Config` (`hf_d3.config`), for the recipes:
a preset (`hf_d3.presets`) first, then `--config file.yaml`, then `--key value` overrides."""

from __future__ import annotations

import copy
import sys
import typing
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType

import yaml
from transformers import HfArgumentParser

from .config import FIELD_GROUP, FIELD_TYPES, PAPER_SIZES, D3Config, DataConfig
from .presets import PRESET_NAMES, preset_defaults
from .validation import check_types


class SettingsParser(HfArgumentParser):
    """`HfArgumentParser` for fields made with `setting`: a field's constraint is shown in its help, not passed on to
    argparse (which takes every metadata key as an argument of `add_argument`)."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        metadata = dict(field.metadata)
        if (constraint := metadata.pop("valid", None)) is not None:
            metadata["help"] = f"{metadata.get('help', '')} (valid: {constraint.describe()})".lstrip()
        field = copy.copy(field)
        field.metadata = MappingProxyType(metadata)
        HfArgumentParser._parse_dataclass_field(parser, field)


def parse_config(args: list[str] | None = None) -> D3Config:
    """Parse `--config file.yaml` and `--key value` overrides (the command line wins over the file, the file over a
    preset: `hf_d3.presets`)."""
    return parse_recipe_args(args)[0]


def parse_recipe_args(args: list[str] | None = None, *extra: type) -> tuple:
    """`parse_config` for a recipe with settings of its own: returns `(D3Config, *instances of extra)`.

    The extra dataclasses' fields are named flat beside the `D3Config` ones, in the YAML file and on the command
    line; `--config` may also be a finished run's `config.json` (JSON is YAML), so a recipe reruns a run's settings.
    """
    return parse_with_sources(args, *extra)[0]


def parse_with_sources(args: list[str] | None = None, *extra: type) -> tuple[tuple, dict[str, str]]:
    """`parse_recipe_args`, and where each setting it set came from: `{name: "command line" | "config" |
    "preset cpu" | "preset gpu" | "the images" | "the default budget"}`; the settings it leaves out keep `D3Config`'s
    defaults."""
    groups = D3Config.groups()
    parser = SettingsParser([*groups.values(), *extra], allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML file of D3Config settings (flat keys); "
                        "`--<setting> none` unsets one of its settings, and `--sizes auto` drops its sizes so that "
                        "storage_budget_ipc chooses them")
    parser.add_argument("--preset", type=str, default=None, choices=PRESET_NAMES, help=(
        "defaults for the machine, beneath the config file's and the command line's settings: cpu, gpu or auto "
        "(gpu where CUDA is available); with it the unset resolution and channels come from the images; default: "
        "the file's `preset:`, else auto without a config file"))
    args, unset = _unsets(sys.argv[1:] if args is None else list(args))
    known, unknown = parser.parse_known_args(args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = {}
    if known.config:
        extra_fields = {f.name for cls in extra for f in fields(cls)}
        values = load_yaml(known.config, extra_fields | {"preset"})
        if known.sizes == "auto":  # the command line lets the budget choose: the file's sizes would win over it
            values = {name: value for name, value in values.items() if name not in PAPER_SIZES}
    file_preset = values.pop("preset", None)
    preset = known.preset or file_preset or (None if known.config else "auto")
    # HfArgumentParser takes --init-steps as --init_steps
    command_line = {arg[2:].partition("=")[0].replace("-", "_") for arg in args if arg.startswith("--")} | set(unset)
    sources = {**dict.fromkeys(values, "config"), **dict.fromkeys(command_line - {"config", "preset"}, "command line")}
    parser.set_defaults(**values)
    if preset is not None:
        namespace, _ = parser.parse_known_args(args)  # the data settings as given, to read the images they name
        data = DataConfig(**{f.name: getattr(namespace, f.name) for f in fields(DataConfig)})
        defaults = preset_defaults(preset, data, set(sources))
        parser.set_defaults(**{name: value for name, (value, _) in defaults.items()})
        sources |= {name: source for name, (_, source) in defaults.items()}
    parser.set_defaults(**dict.fromkeys(unset))
    *parsed, _ = parser.parse_args_into_dataclasses(args, look_for_args_file=False)
    config = D3Config(**dict(zip(groups, parsed[: len(groups)], strict=True)))
    return (config, *parsed[len(groups):]), sources


def _unsets(args: list[str]) -> tuple[list[str], list[str]]:
    """The arguments without the `--<setting> none` pairs of settings that may be None, and those settings' names."""
    kept, unset = [], []
    for arg in args:
        name = kept[-1][2:] if kept and kept[-1].startswith("--") else None
        if arg.lower() in ("none", "null") and name in FIELD_TYPES and type(None) in typing.get_args(FIELD_TYPES[name]):
            unset.append(kept.pop()[2:])
        else:
            kept.append(arg)
    return kept, unset


def load_yaml(path: str | Path, extra_keys: set[str] = frozenset()) -> dict:
    """Read a flat YAML config, rejecting keys that are neither `D3Config` settings nor `extra_keys`."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a YAML {type(values).__name__}; valid: a mapping of settings, `name: value` "
                         "one a line")
    unknown = sorted(set(values) - set(FIELD_GROUP) - set(extra_keys))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} in {path}; valid keys: {sorted({*FIELD_GROUP, *extra_keys})}")
    check_types(values, FIELD_TYPES, where=f" in {path}", from_text=True)
    return values
