"""One config system for every stage: YAML recipe + dotted overrides -> typed dataclasses.

    wellread pretrain recipe.yaml train.lr=3e-4 model.name=bert-L4-H256

Every stage declares its recipe as a dataclass tree; `load_config` parses the YAML file, applies the
overrides (values parsed as YAML, so `train.lr=3e-4`, `data.files=[a,b]` and `x=null` work), and
checks every key and type against the dataclass. Mistakes become a one-line `UserError` naming the
key and the file (exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from trainer.errors import UserError
from trainer.fileio import atomic_write_bytes

T = TypeVar("T")
CLI = "command line"


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Parse `path` (YAML mapping) plus `key.sub=value` overrides into an instance of `cls`."""
    data: dict[str, Any] = {}
    where = CLI
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: recipe file not found") from None
        except (IsADirectoryError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read recipe: {e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a recipe must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    sources: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
        sources[key] = CLI
    return from_dict(cls, data, where, sources)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"{CLI}: override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise UserError(f"{CLI}: override '{item}' has an invalid key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{CLI}: cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: Any, where: str = CLI, sources: dict[str, str] | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, checking keys and types recursively."""
    sources = sources or {}
    section = prefix.rstrip(".") or "recipe"
    if not isinstance(data, dict):
        raise UserError(f"{where}: '{section}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise UserError(
                f"{sources.get(prefix + str(key), where)}: unknown key '{prefix}{key}' (known in {section}: {known})"
            )
    kwargs = {}
    for name, field in fields.items():
        dotted = prefix + name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], dotted, sources.get(dotted, where), sources)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: missing required key '{dotted}'")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    return obj


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, key: str, where: str, sources: dict[str, str]) -> Any:
    origin = get_origin(tp)
    bad = UserError(f"{where}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, where, sources)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            value = [value] if isinstance(value, str | int | float) and origin is list else None
            if value is None:
                raise bad
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{key}[{i}]", where, sources) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, sources, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _raise(bad)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _raise(e: Exception) -> Any:
    raise e


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config beside a run's outputs (atomic)."""
    atomic_write_bytes(path, dump_yaml(cfg).encode())
