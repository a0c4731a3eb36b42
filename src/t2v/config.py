"""Dataclass configs: built from YAML/TOML/JSON dicts, validated, overridable, saved as JSON.

No exec, no globals(), no class names in strings: a config file only sets fields of a
dataclass that the code names, and every key and value is checked against that dataclass.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from t2v.errors import UserError
from t2v.runtime import atomic_write_bytes

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key or value that does not fit; the message names it and what would."""


def _check(tp: Any, value: Any, where: str) -> Any:
    """Coerce ``value`` to type ``tp`` or raise ConfigError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where} is {value!r}, but it must be one of {allowed}.")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where} must not be null.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields.")
        return from_dict(tp, value, prefix=f"{where}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, not {value!r}.")
        args = get_args(tp)
        item = args[0] if args else Any
        out = [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping.")
        args = get_args(tp)
        item = args[1] if len(args) == 2 else Any
        return {k: _check(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, not {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            raise ConfigError(f"{where} must be an integer, not {value!r}.")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, not {value!r}.") from None
        if not f.is_integer():
            raise ConfigError(f"{where} must be an integer, not {value!r}.")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}.") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where} must be text, not {value!r}.")
        return str(value)
    return value


# Set while a saved file is read: its missing settings are older than it, see from_dict.
_SAVED: contextvars.ContextVar[bool] = contextvars.ContextVar("saved", default=False)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError.

    A dataclass may list settings it no longer has in ``REMOVED`` (name -> the one value that
    still loads), so that model folders saved before a setting was dropped keep loading; and
    settings it gained in ``ADDED`` (name -> the value that does what the code did before),
    which a saved file (`load_json`) that lacks them gets instead of the default."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    removed = getattr(cls, "REMOVED", {})
    if _SAVED.get():
        data = {**getattr(cls, "ADDED", {}), **data}
    kwargs = {}
    for key, value in data.items():
        if key in removed:
            if value != removed[key]:
                raise ConfigError(
                    f"'{prefix}{key}' is {value!r}, but this version of t2v no longer has that "
                    f"setting and only loads {removed[key]!r}."
                )
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else (f"; known keys: {', '.join(names)}.")
            )
            raise ConfigError(f"Unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _check(hints[key], value, f"{prefix}{key}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}.") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:  # a value out of range is the config's fault: one sentence
            raise ConfigError(str(e).rstrip(".") + ".") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _parse_value(text: str) -> Any:
    """A --set value: YAML scalar/list syntax (so 1e-3, true, [1, 2] all work)."""
    import yaml

    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (validation happens in from_dict)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value, e.g. optim.lr=1e-3.")
        key, _, raw = item.partition("=")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}': '{p}' is not a section.")
        node[leaf] = _parse_value(raw)
    return data


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values in place of its own, section by section."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def read_file(path: str | Path, _within: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML, TOML or JSON mapping. A top-level ``base: other.yaml`` (relative to the
    file) reads that file first and puts this one's values over it, so a variant of a
    recipe names only what it changes."""
    path = Path(path)
    if path.resolve() in _within:
        raise ConfigError(f"Config file {path} names itself as a base, through 'base:'.")
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - any parser error becomes one sentence
        raise ConfigError(
            f"Config file {path} is not valid {path.suffix[1:] or 'YAML'}: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys to values.")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'base' in {path} must be the path of another config file.")
    return _merged(read_file(path.parent / base, (*_within, path.resolve())), data)


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = read_file(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


def save_json(obj: Any, path: str | Path) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(tensors: dict, path: str | Path) -> None:
    """Write a safetensors file atomically, readable by all (safetensors' own writer makes
    0600 files, which a server running as another user cannot load)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors))


def load_json(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}.") from None
    token = _SAVED.set(True)
    try:
        return from_dict(cls, data)
    finally:
        _SAVED.reset(token)
