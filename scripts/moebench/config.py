"""Load and validate the workflow config; name the bad key, its value and what is allowed."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


# libyaml's parser where PyYAML was built with it: the schema and config are read by every Snakemake start and
# every stage process, and the pure-Python parser takes ~0.1 CPU-s for them (libyaml ~0.01); same documents.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path) -> object:
    return yaml.load(Path(path).read_text(), Loader=_LOADER)


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


# `snakemake --config` reads every nested value, and top-level booleans other than True/False, as a YAML string
# ('false', '3', 'null'): read such a string as YAML where the schema wants a number, a boolean or null.
_SCALARS = {"integer", "number", "boolean", "null"}


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return {t} if isinstance(t, str) else set(t or ())


def _coerce_value(schema: dict, value):
    """`value` with each string the schema types as a number, a boolean or null read as YAML (a string that does
    not read as such stays, and validation then names it)."""
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, v in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            value[key] = _coerce_value(sub, v)
        return value
    if isinstance(value, list):
        return [_coerce_value(schema.get("items") or {}, v) for v in value]
    if isinstance(value, str) and _types(schema) & _SCALARS and "string" not in _types(schema):
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            return value
        if isinstance(parsed, str) and "number" in _types(schema):  # PyYAML reads '2e-4' as a string
            try:
                parsed = float(parsed)
            except ValueError:
                return value
        wanted = {bool: "boolean", int: "integer", float: "number", type(None): "null"}.get(type(parsed))
        if wanted in _types(schema) or (wanted == "integer" and "number" in _types(schema)):
            return parsed
    return value


def _coerce(schema: dict, config: dict) -> None:
    _coerce_value(schema, config)


def validate(config: dict, schema_path: Path = SCHEMA) -> dict:
    """Validate `config` in place (filling defaults); raise ConfigError with a message a user can act on."""
    import jsonschema

    schema = _read_yaml(schema_path)
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


def defaults(key: str, schema_path: Path = SCHEMA) -> dict:
    """The schema's defaults of one top-level object (e.g. `validate`): for code that takes a partial block."""
    schema = _read_yaml(schema_path)
    out: dict = {}
    _with_defaults(schema["properties"][key], out)
    return out


def load(path: str | Path) -> dict:
    return validate(_read_yaml(path) or {})


def load_yaml(name: str) -> dict:
    return _read_yaml(ROOT / "config" / name)
