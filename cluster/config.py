"""Typed presets: YAML file + dotted overrides, validated at the door.

Every job declares its options as a pydantic model (`Options`, extra keys forbidden); this module
loads `configs/<job>/<preset>.yaml`, applies `key.sub=value` overrides (values parsed as YAML, so
`0.5`, `[0, 1]` and `null` mean what they look like), and validates. Anything wrong becomes a
`UserError` with one line naming the key or file; `cluster.cli` turns that into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class UserError(Exception):
    """Bad input from the person running the job: reported as one line, exit code 2."""


def Operational(default: Any, **kw: Any) -> Any:
    """A field that decides how a stage runs, not what it produces (retries, timeouts, polling,
    how many actors share the work): left out of stage fingerprints (`cluster.stages`), so a run
    re-submitted with a longer timeout or more probe actors resumes instead of starting over."""
    return Field(default, json_schema_extra={"fingerprint": False}, **kw)


def Added(default: Any, **kw: Any) -> Any:
    """A field added after runs were made with its model: it counts in stage fingerprints only
    where it differs from its default, so those runs keep their fingerprints (and resume instead
    of starting over) while a run that sets it gets stages of its own."""
    return Field(default, json_schema_extra={"fingerprint": "unless default"}, **kw)


def fingerprinted(model: BaseModel) -> dict[str, Any]:
    """The model's fields that decide results, as JSON (nested models likewise)."""
    dump = model.model_dump(mode="json")
    out = {}
    for name, spec in type(model).model_fields.items():
        mark = (spec.json_schema_extra or {}).get("fingerprint", True)
        value = getattr(model, name)
        if mark is False or (mark == "unless default" and value == spec.default):
            continue
        out[name] = fingerprinted(value) if isinstance(value, BaseModel) else dump[name]
    return out


class Options(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text config (invalid UTF-8 at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc).split())
        raise UserError(f"{path}:{where} malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of options at the top level")
    return data


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict in place."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected key=value (e.g. sft.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown option"
    elif first["type"] == "missing":
        msg = "required option is missing"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        got = repr(first["input"])
        msg = f"{msg} (got {got if len(got) <= 80 else got[:77] + '...'})"
    msg = msg.removeprefix("Value error, ")
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"  # a whole-preset check names its keys itself


def load_config(schema: type[Options], path: str | Path, overrides: list[str] = ()) -> Options:
    """Load a preset, apply overrides, validate; raise UserError with one clear line."""
    path = Path(path)
    data = _read_yaml(path)
    for item in overrides:
        apply_override(data, item)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe(err, str(path))) from None


def config_hash(cfg: BaseModel | dict, exclude: set[str] = frozenset()) -> str:
    """Stable short hash of a config (or part of one): names resumable run directories."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    data = {k: v for k, v in data.items() if k not in exclude}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def describe_options(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per option, `key (type, default): description`, sections recursed: for --help."""
    lines = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        doc = (field.description or "").strip()
        if sub is not None:
            lines.append(f"  {key}: {doc or sub.__doc__.splitlines()[0] if sub.__doc__ else ''}".rstrip())
            lines.extend(describe_options(sub, key + "."))
            continue
        if field.is_required():
            default = "required"
        else:
            default = json.dumps(field.get_default(call_default_factory=True), default=str)
        lines.append(f"  {key} ({_type_name(ann)}, default {default}): {doc}".rstrip().rstrip(":"))
    return lines
