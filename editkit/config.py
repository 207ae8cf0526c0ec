"""Typed `key=value` command lines for the project's scripts (train.py, infer.py, python -m spl).

A script declares its settings as a dataclass whose fields carry `metadata={"help": ...}` (and
optionally `"choices"`); :func:`parse_config` merges the defaults YAML, an optional `config=file.yaml`
and the `key=value` overrides into an instance of it. Values are converted by the field's type, so
`prompt="a [I] dog"` stays a string while `steps=20` becomes an int. Mistakes fail at start, in one line:
an unknown key names the closest valid one, a bad value names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from editkit.errors import InputError, ReportedError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` / `Optional[X]` → (X, True); anything else → (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _fields(schema: type) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted key, field, resolved type) for every leaf of a (nested) dataclass schema."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for key, sub, sub_tp in _fields(tp):
                yield f"{f.name}.{key}", sub, sub_tp
        else:
            yield f.name, f, tp


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is list:
        name = f"list of {_type_name(typing.get_args(inner)[0])}"
    elif origin is dict:
        key_tp, value_tp = typing.get_args(inner)
        name = f"mapping {_type_name(key_tp)} -> {_type_name(value_tp)}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _convert_scalar(key: str, raw: Any, tp: Any) -> Any:
    """Convert one raw value (a string from the command line, or a YAML-parsed value) to `tp`."""
    inner, optional = _unwrap_optional(tp)
    text = raw if isinstance(raw, str) else None
    if raw is None or (optional and text is not None and text.strip().lower() in _NONE):
        if optional:
            return None
        raise InputError(f"config key '{key}' expects {_type_name(tp)}, got null")
    try:
        if inner is str:
            return raw if isinstance(raw, str) else str(raw)
        if inner is bool:
            if isinstance(raw, bool):
                return raw
            if text is not None and text.strip().lower() in _TRUE | _FALSE:
                return text.strip().lower() in _TRUE
            raise ValueError
        if inner is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if inner is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
    except (TypeError, ValueError):
        raise InputError(f"config key '{key}' expects {_type_name(tp)}, got {raw!r}") from None
    return _convert_container(key, raw, inner)


def _convert_container(key: str, raw: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) if raw.strip() else ([] if origin is list else {})
        except yaml.YAMLError:
            raise InputError(f"config key '{key}' expects {_type_name(tp)}, got unparsable {raw!r}") from None
    if origin is list:
        items = raw if isinstance(raw, list) else [raw]
        return [_convert_scalar(key, item, typing.get_args(tp)[0]) for item in items]
    if origin is dict:
        if not isinstance(raw, dict):
            raise InputError(f"config key '{key}' expects {_type_name(tp)} like {{word: 2.0}}, got {raw!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {
            _convert_scalar(key, k, key_tp): _convert_scalar(f"{key}.{k}", v, value_tp)
            for k, v in raw.items()
        }
    raise TypeError(f"unsupported config type {tp!r} for key '{key}'")  # a schema bug, not a user error


def _convert(key: str, raw: Any, field: dataclasses.Field, tp: Any) -> Any:
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) is list and isinstance(raw, str) and not raw.lstrip().startswith("["):
        value: Any = [_convert_scalar(key, raw, typing.get_args(inner)[0])]
    else:
        value = _convert_scalar(key, raw, tp)
    choices = field.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise InputError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _unknown_key(key: str, valid: list[str]) -> InputError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a leaf name given without its section, e.g. `lr` for `finetune.lr`
        close = [v for v in valid if v.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean '{close[0]}'?" if close else " (see --help for the valid keys)"
    return InputError(f"unknown config key '{key}'{hint}")


def _flatten(tree: dict, dict_keys: set[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested YAML mapping → (dotted key, value); stops at keys whose values are mappings (`dict_keys`)."""
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in dict_keys:
            yield from _flatten(v, dict_keys, f"{key}.")
        else:
            yield key, v


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def format_help(
    schema: type, prog: str, description: str = "", defaults_yaml: str | Path | None = None
) -> str:
    """Every key with its type, default (after the defaults YAML) and one-line description."""
    defaults = dataclasses.asdict(parse_config(schema, [], defaults_yaml))
    lines = [f"usage: {prog} [key=value ...] [config=file.yaml]", ""]
    if description:
        lines += [description, ""]
    table = []
    for key, field, tp in _fields(schema):
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        choices = field.metadata.get("choices")
        kind = " | ".join(map(str, choices)) if choices else _type_name(tp)
        table.append((key, f"{kind} = {value!r}", field.metadata.get("help", "")))
    width = max(len(k) for k, _, _ in table)
    for key, kind, text in table:
        lines.append(f"  {key.ljust(width)}  {text}")
        lines.append(f"  {'':{width}}    ({kind})")
    return "\n".join(lines)


def parse_config(
    schema: type,
    argv: list[str],
    defaults_yaml: str | Path | None = None,
    prog: str = "",
    description: str = "",
) -> Any:
    """Build an instance of the dataclass `schema` from defaults YAML, `config=file.yaml` and overrides.

    A list-typed key may be repeated (`target=a target=b`) or given as a YAML list (`steps=[1,2]`).
    `--help` prints every key and exits 0.
    """
    prog = prog or Path(sys.argv[0]).name
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(schema, prog, description, defaults_yaml))
        raise SystemExit(0)
    leaves = {key: (field, tp) for key, field, tp in _fields(schema)}
    dict_keys = {k for k, (_, tp) in leaves.items() if typing.get_origin(_unwrap_optional(tp)[0]) is dict}

    values: dict[str, Any] = {}

    def apply(key: str, raw: Any, *, append: bool = False) -> None:
        if key not in leaves:
            raise _unknown_key(key, list(leaves))
        field, tp = leaves[key]
        value = _convert(key, raw, field, tp)
        if append and isinstance(values.get(key), list):
            values[key] = values[key] + value
        else:
            values[key] = value

    # 1. defaults file, then 2. config=file.yaml, then 3. key=value overrides (repeatable list keys append)
    files = [defaults_yaml] if defaults_yaml else []
    files += [arg.split("=", 1)[1] for arg in argv if arg.startswith("config=")]
    for path in files:
        for key, raw in _flatten(_read_yaml(path), dict_keys):
            apply(key, raw)
    seen: set[str] = set()
    for arg in argv:
        if "=" not in arg:
            raise InputError(f"argument '{arg}' is not of the form key=value (see {prog} --help)")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("+")
        if key == "config":
            continue
        apply(key, raw, append=key in seen)
        seen.add(key)

    tree: dict = {}
    for key, value in values.items():
        _set(tree, key, value)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), tree))
    except OmegaConfBaseException as err:  # types are already checked above; this is a last guard
        raise InputError(f"invalid configuration: {str(err).splitlines()[0]}") from None


def to_yaml(config: Any) -> str:
    """The resolved configuration as YAML (for logs, manifests and reports)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a ReportedError becomes one line on stderr and exit code 2, Ctrl-C exit 130."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except ReportedError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
