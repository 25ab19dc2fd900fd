"""Load and validate the workflow config; name the bad key, its value and what is allowed."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def _allowed(err) -> str:
    s = err.schema
    if "enum" in s:
        return "one of " + ", ".join(map(repr, s["enum"]))
    parts = []
    for key, text in (("type", "of type {}"), ("minimum", ">= {}"), ("maximum", "<= {}"),
                      ("exclusiveMinimum", "> {}"), ("pattern", "matching {}"), ("minItems", "at least {} items")):
        if key in s:
            parts.append(text.format(s[key]))
    if err.validator == "additionalProperties":
        return "only the keys " + ", ".join(sorted(s.get("properties", {})))
    if err.validator == "required":
        return "the keys " + ", ".join(s["required"])
    return " and ".join(parts) or err.message


def _with_defaults(schema: dict, config: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        if isinstance(config.get(key), dict) and sub.get("type") == "object":
            _with_defaults(sub, config[key])


def _coerce(schema: dict, config: dict) -> None:
    """`snakemake --config 'plan_overrides={seq_len: 2048}'` hands nested values over as strings: read them
    as YAML scalars where the schema wants a number or a boolean."""
    for key, sub in schema.get("properties", {}).items():
        value = config.get(key)
        if isinstance(value, dict):
            _coerce(sub, value)
        elif isinstance(value, str) and sub.get("type") in ("integer", "number", "boolean"):
            try:
                config[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                pass


def validate(config: dict, schema_path: Path = SCHEMA) -> dict:
    """Validate `config` in place (filling defaults); raise ConfigError with a message a user can act on."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    _coerce(schema, config)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = []
        for e in errors:
            key = ".".join(str(p) for p in e.path) or "(top level)"
            value = e.instance if e.validator not in ("additionalProperties", "required") else e.message
            lines.append(f"  config key '{key}': got {value!r}; allowed: {_allowed(e)}")
        raise ConfigError("invalid config (fix config/config.yaml or your --config):\n" + "\n".join(lines))
    _with_defaults(schema, config)
    return config


def load(path: str | Path) -> dict:
    return validate(yaml.safe_load(Path(path).read_text()) or {})


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())
