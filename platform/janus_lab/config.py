"""The config loader every job shares: typed dataclasses, one YAML per run, dotted command-line overrides.

Every job's `main()` starts with

    cfg = parse_cli(ExperimentConfig, sys.argv[1:], description=__doc__)

which reads `--config jobs/configs/<name>.yaml`, applies `KEY=VALUE` overrides such as
`train.lr=1e-5` or `model.preset=janus-pro-7b`, checks every key and type, and runs each
section's `__post_init__` checks. A misspelt key is an error with a suggestion, never a silent
default; `--help` lists every key with its type, default and docstring.

The config classes live beside the code they configure (`janus_lab.train.config`,
`janus_lab.data.config`, `janus_lab.sweeps.config`, `PromoteConfig` in `janus_lab.registry`, ...);
this module only loads, checks, writes and describes them. Conventions for config classes:

- a section is a field typed as another config dataclass, with `default_factory`;
- every field is followed by a one-line string literal, its docstring (read by `describe`);
- a `__post_init__` check raises ValueError with a message that starts with the field it is
  about ("lr must be > 0, got -1"); the loader prefixes the section ("train.lr must be ...").
  The `check_*` helpers below write such messages.
"""
import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its config class."""


# --------------------------------------------------------------------------- checks


def check(cfg: Any, names: Sequence[str], ok: Callable[[Any], bool], requirement: str) -> None:
    """Raises "NAME must be REQUIREMENT, got VALUE" for the first set field of `names` that is not `ok`."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not ok(value):  # None is an Optional field left unset
            raise ValueError(f"{name} must be {requirement}, got {value!r}")


def check_positive(cfg: Any, *names: str) -> None:
    check(cfg, names, lambda v: v > 0, "> 0")


def check_non_negative(cfg: Any, *names: str) -> None:
    check(cfg, names, lambda v: v >= 0, ">= 0")


def check_fraction(cfg: Any, *names: str) -> None:
    check(cfg, names, lambda v: 0 <= v <= 1, "in [0, 1]")


def check_not_empty(cfg: Any, *names: str) -> None:
    check(cfg, names, lambda v: bool(v), "a non-empty string")


# --------------------------------------------------------------------------- YAML


class _ConfigYamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot, so `lr: 1e-5` would be the string
    "1e-5"; that is how everyone writes learning rates.
    """


_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigYamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None


def _read_config_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    data = _parse_yaml(text, str(path))
    if data is None:  # an empty file means all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {_typed_repr(data)}")
    return data


# --------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Builds a config from a YAML file and dotted overrides, checking every key and value.

    Args:
        cls: The config dataclass, e.g. `ExperimentConfig`.
        path: YAML file of the experiment; None starts from the class defaults.
        overrides: `KEY=VALUE` strings applied after the file, in order; VALUE is parsed as
            YAML (`1e-5`, `true`, `null`, `[1, 2]`) and replaces whatever is at KEY.

    Returns:
        An instance of `cls` whose sections are instances of their own config classes.

    Raises:
        ConfigError: An unknown key, a value of the wrong type, a failed `__post_init__`
            check or an unreadable file; the message names the dotted key and its source.
    """
    data = _read_config_file(Path(path)) if path is not None else {}
    builder = _Builder(cls, str(path) if path is not None else "the defaults")
    for text in overrides:
        builder.apply_override(data, text)
    try:
        return builder.build(cls, data)
    except _TypeMismatch as err:
        raise ConfigError(str(err)) from None  # the subclass is bookkeeping, not part of the API


def from_dict(cls: type[T], data: Mapping) -> T:
    """Builds a config from a plain nested dict (what `to_dict` returns), with the same checks
    as `load_config`; how a config travels to Ray workers."""
    try:
        return _Builder(cls, "a dict").build(cls, dict(data))
    except _TypeMismatch as err:
        raise ConfigError(str(err)) from None


def check_config_key(cls: type, key: str, where: str, *, leaf_only: bool = True) -> None:
    """Checks that a dotted key names a field of a config class (a sweep's grid or overrides).

    Raises:
        ConfigError: an unknown key (with a did-you-mean suggestion), a key below a scalar, or
            (with `leaf_only`) a section rather than a single value.
    """
    parts = key.split(".")
    _Builder(cls, where)._check_key_path(parts, where)
    if leaf_only and dataclasses.is_dataclass(_field_type(cls, parts)):
        raise ConfigError(f"'{key}' in {where} is a section of {cls.__name__}; name one of its keys, "
                          f"e.g. '{key}.{next(iter(_init_fields(_field_type(cls, parts))))}'")


def _field_type(cls: type, parts: list[str]) -> Any:
    for part in parts:
        cls = _type_hints(cls)[part]
    return cls


class _TypeMismatch(ConfigError):
    """The value at `key` itself has the wrong type (as opposed to something nested in it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Builder:
    """Builds one config tree from raw YAML data, remembering where each value came from."""

    def __init__(self, root: type, file_source: str):
        self.root = root
        self.file_source = file_source
        self.override_sources: dict[str, str] = {}  # dotted key -> "override 'KEY=VALUE'"

    def source_of(self, key: str) -> str:
        # An override of a section ("model={...}") is the source of every key inside it too.
        for end in range(len(key), 0, -1):
            if (end == len(key) or key[end] in ".[") and key[:end] in self.override_sources:
                return self.override_sources[key[:end]]
        return self.file_source

    def apply_override(self, data: dict, text: str) -> None:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad override '{text}': expected KEY=VALUE with a dotted key, "
                              f"e.g. train.lr=1e-5")
        source = f"override '{text}'"
        parts = key.split(".")
        mapping_depth = self._check_key_path(parts, source)
        if mapping_depth is not None:
            # `grid.masking.t2i_text_drop=[0, 0.5]`: the rest of the key is one key of the mapping.
            parts = parts[:mapping_depth + 1] + [".".join(parts[mapping_depth + 1:])]
        node = data
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise self._section_error(".".join(parts[:depth + 1]), node[part])
            node = node[part]
        node[parts[-1]] = _parse_yaml(value_text, source)
        self.override_sources[key] = source

    def _check_key_path(self, parts: list[str], source: str) -> int | None:
        """Checks a dotted key; returns the depth of a mapping field the rest of the key is a
        key of (`grid.masking.t2i_text_drop`), or None."""
        cls = self.root
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth])
            if part not in _init_fields(cls):
                raise self._unknown_key(cls, prefix, part, source)
            if depth < len(parts) - 1:
                tp = _type_hints(cls)[part]
                if get_origin(tp) is dict:
                    return depth
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"'{_join(prefix, part)}' is a {_type_name(tp)}, not a "
                                      f"section, so '{'.'.join(parts)}' does not exist "
                                      f"(in {source})")
                cls = tp

    def build(self, cls: type[T], data: Mapping, prefix: str = "") -> T:
        fields = _init_fields(cls)
        for name in data:
            if name not in fields:
                key = _join(prefix, str(name))
                raise self._unknown_key(cls, prefix, str(name), self.source_of(key))
        hints = _type_hints(cls)
        kwargs = {}
        for name, field in fields.items():
            key = _join(prefix, name)
            if name in data:
                kwargs[name] = self.coerce(data[name], hints[name], key)
            elif (field.default is dataclasses.MISSING
                  and field.default_factory is dataclasses.MISSING):
                raise ConfigError(f"missing required key '{key}' (in {self.source_of(key)})")
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise self._check_error(cls, prefix, err) from err

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        """Checks `value` against the annotation `tp` and returns it in the field's type."""
        origin, args = get_origin(tp), get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if value is None:  # a section whose keys are all commented out
                value = {}
            if not isinstance(value, Mapping):
                raise self._section_error(key, value)
            return self.build(tp, value, key)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            for option in args:
                try:
                    return self.coerce(value, option, key)
                except _TypeMismatch as err:
                    if err.key != key:  # the mismatch is inside the value: report that one
                        raise
            raise self._mismatch(key, _type_name(tp), value)
        if origin is Literal:
            # Compare types too: YAML `true` must not match a Literal[1].
            if any(value == a and type(value) is type(a) for a in args):
                return value
            raise self._mismatch(key, "one of " + ", ".join(repr(a) for a in args), value)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self._mismatch(key, _type_name(tp), value)
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                item_types = [args[0] if args else Any] * len(value)
            elif len(value) != len(args):
                raise self._mismatch(key, f"{_type_name(tp)} ({len(args)} items)", value)
            else:
                item_types = list(args)
            return origin(self.coerce(v, t, f"{key}[{i}]")
                          for i, (v, t) in enumerate(zip(value, item_types)))
        if origin is dict:
            if not isinstance(value, Mapping):
                raise self._mismatch(key, _type_name(tp), value)
            key_type, value_type = args or (Any, Any)
            return {self.coerce(k, key_type, f"{key}.{k}"): self.coerce(v, value_type, f"{key}.{k}")
                    for k, v in value.items()}
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # `lr: 1` means 1.0
        # bool is a subclass of int, but `epochs: true` is a mistake, not 1.
        if isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool):
            return value
        raise self._mismatch(key, _type_name(tp), value)

    def _mismatch(self, key: str, expected: str, value: Any) -> _TypeMismatch:
        return _TypeMismatch(key, f"{key}: expected {expected}, got {_typed_repr(value)} "
                                  f"(in {self.source_of(key)})")

    def _section_error(self, key: str, value: Any) -> ConfigError:
        return ConfigError(f"{key}: is a section, expected a mapping of its keys, "
                           f"got {_typed_repr(value)} (in {self.source_of(key)})")

    def _unknown_key(self, cls: type, prefix: str, name: str, source: str) -> ConfigError:
        names = list(_init_fields(cls))
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            hint = f"did you mean '{_join(prefix, close[0])}'?"
        else:
            # A key put in the wrong section (`lr:` at the top level) gets pointed to its home.
            keys_by_leaf: dict[str, str] = {}
            for row in sorted(describe(self.root), key=lambda row: row.key.count(".")):
                keys_by_leaf.setdefault(row.key.rpartition(".")[2], row.key)  # `lr`: train.lr, not train.lora.lr
            close = difflib.get_close_matches(name, list(keys_by_leaf), n=1)
            if close:
                hint = f"did you mean '{keys_by_leaf[close[0]]}'?"
            else:
                where = f"of '{prefix}'" if prefix else "at the top level"
                hint = f"valid keys {where}: {', '.join(names)}"
        return ConfigError(f"unknown key '{_join(prefix, name)}' in {source}; {hint}")

    def _check_error(self, cls: type, prefix: str, err: ValueError) -> ConfigError:
        # By convention the message starts with the field it is about: make that a dotted key.
        message = str(err)
        leading = re.match(r"\w+", message)
        field = leading.group(0) if leading and leading.group(0) in _init_fields(cls) else None
        if prefix:
            message = f"{prefix}.{message}" if field else f"{prefix}: {message}"
        return ConfigError(f"{message} (in {self._sources_of_section(prefix)})")

    def _sources_of_section(self, prefix: str) -> str:
        # A check may involve several keys of the section, so name everything that set them.
        if prefix and self.source_of(prefix) != self.file_source:
            return self.source_of(prefix)  # the whole section came from one override
        inside = [source for key, source in self.override_sources.items()
                  if not prefix or key.startswith(prefix + ".")]
        return ", ".join([self.file_source, *inside])


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # resolves string annotations (`from __future__ import annotations`)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _typed_repr(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    """`float`, `int | None`, `list[float]`, `{float32,bfloat16}` (a Literal, argparse style)."""
    if tp is type(None):
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        names = ("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{', '.join(names)}]"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- writing


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts and lists (what `load_config` reads back)."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]  # safe_dump has no tuples
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, in field order; `load_config` on it gives `cfg` back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train.lr": 5e-06, ...}`: one dotted key per non-section field (for MLflow params)."""
    flat = {}
    for name in _init_fields(type(cfg)):
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, _join(prefix, name)))
        else:
            flat[_join(prefix, name)] = _plain(value)
    return flat


# --------------------------------------------------------------------------- describing


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One key of a config tree, as `--help` lists it."""

    key: str
    """Dotted key, e.g. `train.lr`."""
    type: str
    """Readable type: `float`, `int | None`, `{float32,bfloat16}`; the class name of a section."""
    default: Any
    """Default value; `dataclasses.MISSING` for a required key, None for a section."""
    doc: str
    """The field's docstring."""
    is_section: bool
    """True for a nested config dataclass; its own keys follow it."""


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after the field in the class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe(cls: type, prefix: str = "") -> list[ConfigKey]:
    """Every key of a config class, sections first then their keys, in field order."""
    docs, hints = field_docs(cls), _type_hints(cls)
    rows = []
    for name, field in _init_fields(cls).items():
        key, tp = _join(prefix, name), hints[name]
        if dataclasses.is_dataclass(tp):
            rows.append(ConfigKey(key, tp.__name__, None, docs.get(name, ""), True))
            rows.extend(describe(tp, key))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        rows.append(ConfigKey(key, _type_name(tp), default, docs.get(name, ""), False))
    return rows


def format_help(cls: type) -> str:
    """The key table `--help` prints: key, type, default and docstring, grouped by section."""
    rows = describe(cls)
    leaves = [r for r in rows if not r.is_section]
    key_width = max((len(r.key) for r in leaves), default=0)
    type_width = max((len(r.type) for r in leaves), default=0)
    defaults = {r.key: "required" if r.default is dataclasses.MISSING else repr(r.default)
                for r in leaves}
    default_width = max((len(d) for d in defaults.values()), default=0)
    lines = ["config keys (override any with KEY=VALUE, e.g. train.lr=1e-5):"]
    for row in rows:
        if row.is_section:
            lines += ["", f"{row.key}: {row.doc}"]
            continue
        lines.append(f"  {row.key:<{key_width}}  {row.type:<{type_width}}  "
                     f"{defaults[row.key]:<{default_width}}  {row.doc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, *,
              description: str | None = None) -> T:
    """Parses `[--config PATH] [KEY=VALUE ...]` into a config; what every job's `main()` calls.

    Args:
        cls: The config dataclass, e.g. `ExperimentConfig`.
        argv: Arguments without the program name; None reads `sys.argv[1:]`.
        description: Shown above the key table by `--help`; jobs pass their `__doc__`.

    Returns:
        The loaded config. A bad file, key or value prints the error and exits with status 2,
        like any other command-line mistake; `--help` prints every key and exits with 0.
    """
    return parse_cli_with_flags(cls, argv, description=description)[0]


def parse_cli_with_flags(cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None,
                         flags: Mapping[str, str] | None = None) -> tuple[T, dict[str, bool]]:
    """`parse_cli` for entry points that also take on/off flags, e.g. a sweep's `--resume`.

    Args:
        flags: flag (`--resume`) -> its help text.

    Returns:
        The config, and flag -> whether it was given.
    """
    parser = argparse.ArgumentParser(description=description, epilog=format_help(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH",
                        help="YAML file of the experiment; without it every key has its default")
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides applied after the file, e.g. train.lr=1e-5")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    return cfg, {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in flags or {}}
