"""YAML configs with dotted ``key=value`` overrides from the command line.

    python -m training stage1 --config training/configs/stage1_tiny.yaml optim.lr=3e-4 output_dir=runs/x

A config is a nested dict checked against the stage's dataclass defaults: unknown keys are an error (a typo must
not silently train with the default), values are parsed as YAML scalars (``3e-4``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def load_config(path: str | Path | None, overrides: list[str], defaults: dict) -> dict:
    """Defaults <- YAML file <- overrides, validated against the keys of ``defaults``."""
    config = copy.deepcopy(defaults)
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"Config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
        _merge(config, data, defaults, prefix="")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} is not key=value.")
        _set(config, key.strip(), yaml.safe_load(raw) if raw.strip() else "", defaults)
    return config


def _merge(config: dict, data: dict, defaults: dict, prefix: str) -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"Unknown config key {name!r}; known here: {', '.join(sorted(defaults))}.")
        # A dict with a "type" (an encoder spec, a data source) is one value, replaced whole.
        if isinstance(defaults[key], dict) and defaults[key] and "type" not in defaults[key] and isinstance(value, dict):
            _merge(config[key], value, defaults[key], prefix=f"{name}.")
        else:
            config[key] = _coerce(value, defaults[key], name)


def _coerce(value, default, name: str):
    """YAML reads '1e-3' as a string (no dot); take numbers by the default's type, and say so when impossible."""
    if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {value!r}.") from None
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, not {value!r}.") from None
    return value


def _set(config: dict, dotted: str, value, defaults: dict) -> None:
    *parents, last = dotted.split(".")
    node, spec = config, defaults
    for part in parents:
        if part not in spec or not isinstance(spec[part], dict) or "type" in spec[part]:
            raise ConfigError(f"Unknown config key {dotted!r}.")
        node, spec = node[part], spec[part]
    if last not in spec:
        raise ConfigError(f"Unknown config key {dotted!r}; known under it: {', '.join(sorted(spec))}.")
    node[last] = _coerce(value, spec[last], dotted)


def dump_config(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
