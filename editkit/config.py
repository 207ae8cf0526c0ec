"""Typed `key=value` command lines for the project's scripts (train.py, infer.py, python -m spl).

A script declares its settings as a dataclass whose fields are made with :func:`setting` (a help text,
and optionally choices and a range); :func:`parse_config` merges the defaults YAML, an optional
`config=file.yaml` and the `key=value` overrides into an instance of it. Values are converted by the
field's type, so `prompt="a [I] dog"` stays a string while `steps=20` becomes an int. Mistakes fail at
start, in one line: an unknown key names the closest valid one, a bad value names the key and the
expected type or range. :func:`check_fields` applies the same checks to a dataclass built in Python, so
the library's settings objects refuse what the command line refuses.

Prompts are literal text: a prompt-valued list key (`text=True`) given `target=[I] woman smiling` holds
that one prompt; only an explicit list with quoted items (`target=["a cat", "a dog"]`) or a repeated key
(`target=a target=b`) gives several.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
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
from editkit.files import MACHINE_ERRNOS, describe_io_error

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~"}
_QUOTED_LIST = re.compile(r"""\s*\[\s*(\]|["'])""")  # `["a", "b"]` or `[]`: an explicit list of texts
_BOUNDS = (("ge", ">=", float.__ge__), ("gt", ">", float.__gt__), ("le", "<=", float.__le__),
           ("lt", "<", float.__lt__))


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    text: bool = False,
) -> Any:
    """A dataclass field of a settings schema: its help line, and what values are valid.

    `choices` lists the valid values; `ge`/`gt`/`le`/`lt` bound a number (each item of a list, each value
    of a mapping); float values must be finite. `text=True` marks a list of prompts, which is literal
    text unless written as an explicit list of quoted items (see the module docstring).
    """
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if bound is not None:
            meta[name] = bound
    if text:
        meta["text"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def range_text(metadata: Any) -> str:
    """The valid range of a field as text, e.g. ">= 0, < 1"; "" when unbounded."""
    def text(bound: float) -> str:  # integers exactly (seed <= 9223372036854775807), floats short
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    return ", ".join(f"{symbol} {text(metadata[name])}" for name, symbol, _ in _BOUNDS if name in metadata)


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_value(name: str, value: Any, metadata: Any) -> None:
    """Refuse a value outside its field's choices or range, or a non-finite float: InputError naming it."""
    choices = metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise InputError(f"{name}={value!r} must be one of {', '.join(map(str, choices))}")
    for number in _numbers(value):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise InputError(f"{name}={value!r} must be a finite number")
        for key, _, holds in _BOUNDS:
            if key in metadata and not holds(float(number), float(metadata[key])):
                raise InputError(f"{name}={value!r} must be {range_text(metadata)}")


def _type_matches(value: Any, tp: Any) -> bool:
    inner, optional = _unwrap_optional(tp)
    if inner is Any:
        return True
    if value is None:
        return optional
    origin = typing.get_origin(inner)
    if origin is list:
        item_tp = typing.get_args(inner)[0]
        return isinstance(value, (list, tuple)) and all(_type_matches(v, item_tp) for v in value)
    if origin is dict:
        key_tp, value_tp = typing.get_args(inner)
        return isinstance(value, dict) and all(
            _type_matches(k, key_tp) and _type_matches(v, value_tp) for k, v in value.items()
        )
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(inner):
        return isinstance(value, inner)
    return isinstance(value, inner) if isinstance(inner, type) else True


def check_fields(instance: Any) -> None:
    """Check every field of a dataclass instance: its type, choices and range (InputError naming it).

    Call it from `__post_init__` so that settings built in Python are refused like the command line's.
    """
    owner = type(instance).__name__
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value, name = getattr(instance, field.name), f"{owner}.{field.name}"
        if not _type_matches(value, hints[field.name]):
            raise InputError(f"{name}={value!r} must be {_type_name(hints[field.name])}")
        check_value(name, value, field.metadata)


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


def _single_item(raw: str, field: dataclasses.Field) -> bool:
    """Whether a command-line string for a list key is one item rather than a YAML list."""
    if field.metadata.get("text"):  # prompts: only `["…", "…"]` is a list; `[I] a dog` is one prompt
        return not _QUOTED_LIST.match(raw)
    return not raw.lstrip().startswith("[")


def _convert(key: str, raw: Any, field: dataclasses.Field, tp: Any) -> Any:
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) is list and isinstance(raw, str) and _single_item(raw, field):
        value: Any = [_convert_scalar(key, raw, typing.get_args(inner)[0])]
    else:
        value = _convert_scalar(key, raw, tp)
    check_value(key, value, field.metadata)
    return value


def _unknown_key(key: str, valid: list[str]) -> InputError:
    # a leaf name given without its section first (`lr` for `spl.lr`), then the closest spelling
    leaf = [v for v in valid if v.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and v != key]
    close = difflib.get_close_matches(key, leaf, n=1, cutoff=0) or difflib.get_close_matches(key, valid, n=1,
                                                                                            cutoff=0.5)
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


def _dict_keys(schema: type) -> set[str]:
    """The dotted keys of a schema whose values are mappings (leaves, not sections)."""
    return {key for key, _, tp in _fields(schema) if typing.get_origin(_unwrap_optional(tp)[0]) is dict}


def flat_values(config: Any) -> dict[str, Any]:
    """Every key of a schema instance as the command line writes it (`nti.lr`, `p2p.reweight`) → value."""
    return dict(_flatten(dataclasses.asdict(config), _dict_keys(type(config))))


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
    if any(field.metadata.get("text") for _, field, _ in _fields(schema)):
        lines += [
            'Prompts are literal text: target=[I] woman smiling is ONE prompt. Several prompts: repeat the',
            'key (target="a cat" target="a dog") or write an explicit list of quoted items',
            '(target=\'["a cat", "a dog"]\'). Word lists take plain YAML lists: blend_words=[cat, dog].',
            "",
        ]
    table = []
    for key, field, tp in _fields(schema):
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        choices = field.metadata.get("choices")
        kind = " | ".join(map(str, choices)) if choices else _type_name(tp)
        bounds = range_text(field.metadata)
        kind = f"{kind}, {bounds}" if bounds else kind
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
    dict_keys = _dict_keys(schema)

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


def explicit_keys(schema: type, argv: list[str]) -> set[str]:
    """The keys a user set: every key of the `key=value` arguments, and the keys of `config=` files whose
    values differ from the schema's defaults (a copied defaults file sets nothing). The arguments must
    have parsed with :func:`parse_config` already."""
    given = {arg.split("=", 1)[0].strip().lstrip("+") for arg in argv if "=" in arg} - {"config"}
    files = [arg.split("=", 1)[1] for arg in argv if arg.startswith("config=")]
    if files:
        defaults = flat_values(parse_config(schema, []))
        from_files = flat_values(parse_config(schema, [f"config={file}" for file in files]))
        given |= {key for key, value in from_files.items() if value != defaults[key]}
    return given


def to_yaml(config: Any) -> str:
    """The resolved configuration as YAML (for logs, manifests and reports)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run `main(argv)`; a ReportedError becomes one line on stderr and exit code 2, Ctrl-C exit 130.

    An OSError that the machine caused (full disk, read-only file system, no permission) and that the
    script did not report itself also becomes one line naming the file; any other exception keeps its
    traceback (a bug must stay visible).
    """
    try:
        main(sys.argv[1:] if argv is None else argv)
    except ReportedError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as err:
        message = describe_io_error(err) if err.errno in MACHINE_ERRNOS else None
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
