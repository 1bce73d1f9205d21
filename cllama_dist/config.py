"""Typed configuration: how every stage's settings are declared, loaded, checked and written back.

Each stage's config is a dataclass built from small sections, each defined beside the code it configures
(``trainer/config.py``, ``data/config.py``, ``model/config.py``, ...). A field is declared once, with
``option()``: its type annotation, its default and its help text. That one declaration gives

- the YAML key (nested: ``optim: {lr: 2e-4}``, or dotted: ``optim.lr: 2e-4``) and the flag (``--optim.lr``);
- the help text of the flag, so a flag and its key never drift apart;
- the check of every value against the declared type, wherever it comes from (YAML, a flag, Python).

Why a small module of our own instead of pydantic, tyro or OmegaConf: the values users write in YAML are
the problem to solve (PyYAML 1.1 reads ``2e-4`` as a string, ``no`` as false, ``Full`` as a string), and
we want exactly this policy: numbers written as strings become numbers, booleans are true/false only, a
``Literal`` accepts exactly its choices, a list given one string takes it as one element, and every
error is one line naming the file, the key and the value. pydantic's lax mode turns ``"no"``/``"off"``
into false (the quirk we must refuse) and its strict mode refuses ``"2e-4"``; tyro and jsonargparse
are flag parsers first, and OmegaConf structured configs do not coerce ``"2e-4"`` into a float. The
dataclasses stay plain (picklable for submitit, printable, ``dataclasses.replace`` works), and
the rules below fit in one file with a table test (tests/unit/test_config.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from .errors import UserError

# A filesystem path, kept as a string ("" means unset). Declared as PathStr so that a list, a number or a
# mapping given for a path is refused, and "~" and environment variables ($VAR, ${VAR}) are expanded.
PathStr = Annotated[str, "path"]

__all__ = ["PathStr", "Section", "option", "ConfigError", "check", "require", "coerce", "build", "load", "load_yaml",
           "add_flags", "normalise_flags", "flag_values", "from_sources", "to_dict", "dump_yaml", "Literal"]


class ConfigError(UserError):
    """A bad value, raised with the key it belongs to; ``build`` adds the section path and the source."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless condition holds: for range checks in ``Section.validate``."""
    if not condition:
        raise ConfigError(key, message)


def require(cfg: Any, *names: str) -> None:
    """Refuse an empty value for each named path/string setting ("is required")."""
    for name in names:
        check(bool(getattr(cfg, name)), name, "is required")


def option(default: Any = dataclasses.MISSING, help: str = "", *, aliases: tuple[str, ...] | list[str] = (),
           flag: bool = True) -> Any:
    """A config field with its help text.

    aliases: further flags (``--out``).
    flag: False for settings that only make sense in YAML or Python.
    """
    meta = {"help": help, "aliases": tuple(aliases), "flag": flag}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Section:
    """Base of every config dataclass: values are coerced to their declared types, then ``validate`` runs.

    This runs on every construction (from YAML, flags, ``dataclasses.replace`` or plain Python), so a
    config object that exists is a checked one. Subclasses put their range checks in ``validate``.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            if f.init:
                setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks; raise with ``check(...)`` naming the key."""


# --------------------------------------------------------------------------------------------------
# Coercion: one value against one declared type.

_hint_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _hint_cache:
        _hint_cache[cls] = typing.get_type_hints(cls, include_extras=True)
    return _hint_cache[cls]


def _describe(value: Any) -> str:
    kind = type(value).__name__
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({kind})"


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and len(args) == 1:
            return args[0], True
    return tp, False


def _is_path(tp: Any) -> bool:
    return typing.get_origin(tp) is Annotated and "path" in typing.get_args(tp)[1:]


def _number(value: Any, key: str, whole: bool) -> int | float:
    what = "a whole number" if whole else "a number"
    if isinstance(value, bool):
        raise ConfigError(key, f"expected {what}, got {value!r} (true/false)")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if whole and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(key, f"expected {what}, got {_describe(value)}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected {what}, got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    if whole:
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(key, f"expected a whole number, got {value!r}")
            value = int(value)
        return value
    return float(value)


_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def _expand_variables(value: str, key: str) -> str:
    """``$VAR`` and ``${VAR}`` in a path replaced by the environment's value. An unset variable is refused, where
    os.path.expandvars would keep the text and a folder named ``${VAR}`` would appear."""
    def value_of(m: re.Match) -> str:
        name = m.group("plain") or m.group("braced")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
            raise ConfigError(key, f"{m.group(0)!r} in {value!r} is not an environment variable reference")
        if name not in os.environ:
            raise ConfigError(key, f"environment variable {name} is not set (in {value!r})")
        return os.environ[name]

    return _VARIABLE.sub(value_of, value) if "$" in value else value


def coerce(value: Any, tp: Any, key: str = "") -> Any:
    """``value`` checked against (and converted to) the declared type ``tp``; ConfigError names ``key``.

    The rules, in the order users meet them:
    - int / float: numbers, and strings that read as numbers ("2e-4", "1000", "1e4" for an int); a float
      for an int only when whole; never true/false; never inf/nan.
    - bool: true or false only. The string "no" (a quoted YAML value) is refused, not read as true.
    - str: a string only (a number is refused: quote it); PathStr: a string or path, "~" and $VAR / ${VAR}
      expanded (an unset variable is refused).
    - Literal: exactly one of the choices (the error lists them, and suggests a near match).
    - list[T]: a list or tuple, each element checked; a single value is taken as a one-element list.
    - dict: a mapping (a flag may give it as a YAML/JSON string).
    - a Section: a mapping, built field by field (unknown keys refused); an instance is kept; a string when the
      section has a ``from_text`` (its flag's short form).
    - Optional[T]: None, or a T.
    """
    tp, optional = _optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(key, "a value is required (got null/None)")
    if tp is Any:
        return value
    if _is_path(tp):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a path, got {_describe(value)}")
        value = _expand_variables(value, key)
        return os.path.expanduser(value) if value.startswith("~") else value
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        hint = " (write true or false, without quotes)" if isinstance(value, str) else ""
        raise ConfigError(key, f"expected true or false, got {_describe(value)}{hint}")
    if tp is int or tp is float:
        return _number(value, key, whole=tp is int)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {_describe(value)} (quote it)")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        shown = ", ".join(repr(c) for c in choices)
        near = difflib.get_close_matches(str(value).lower(), [str(c) for c in choices], n=1, cutoff=0.6)
        guess = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(key, f"{value!r} is not one of {shown}{guess}")
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, dict):
            raise ConfigError(key, f"expected a list, got a mapping {value!r}")
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(key, f"expected a mapping, got text that is not YAML/JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {_describe(value)}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build(tp, value, prefix=key)
        if isinstance(value, str) and hasattr(tp, "from_text"):  # a flag's short form (DataSetConfig: NAME=PATH:W)
            try:
                return tp.from_text(value)
            except ConfigError as exc:
                raise ConfigError(key, exc.message) from None
        raise ConfigError(key, f"expected a mapping of {tp.__name__} settings, got {_describe(value)}")
    if origin in (Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return coerce(value, alt, key)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(key, " or ".join(errors))
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, f"unsupported value {_describe(value)} for type {tp!r}")


# --------------------------------------------------------------------------------------------------
# Building a config from a nested mapping (YAML + flags), with the source of each value for messages.


# The flat names that `cllama train`'s settings had before they were nested into sections (``lr:``, ``--lr``). They
# are no longer read: an old YAML key or flag is refused like any unknown one, and this table only lets the
# message name the setting's key today.
RENAMED = {
    "model": "model.path", "model_config": "model.config", "tokenizer": "model.tokenizer",
    "extended_vocab": "model.extended_vocab", "embeddings": "model.embeddings", "new_row_init": "model.new_row_init",
    "new_row_std": "model.new_row_std", "gradient_checkpointing": "model.gradient_checkpointing",
    "attn_implementation": "model.attn_implementation",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
    "data": "data.path", "block_size": "data.block_size", "micro_batch_size": "data.micro_batch_size",
    "grad_accum": "data.grad_accum", "global_batch_size": "data.global_batch_size",
    **{name: f"optim.{name}" for name in ("max_steps", "lr", "embedding_lr", "weight_decay", "adam_betas", "adam_eps",
                                          "warmup_steps", "warmup_ratio", "min_lr_ratio", "clip_grad",
                                          "max_nonfinite_steps")},
    **{name: f"engine.{name}" for name in ("deepspeed_config", "deepspeed_overrides", "single_process_zero2", "dtype")},
    "save_every": "checkpoint.save_every", "keep_last": "checkpoint.keep_last", "resume": "checkpoint.resume",
    "eval_every": "validation.every", "eval_sequences": "validation.sequences",
    "log_every": "logging.log_every", "tensorboard": "logging.tensorboard", "peak_tflops": "logging.peak_tflops",
}


def renamed(cls: type, name: str) -> str | None:
    """The dotted key that the flat name ``name`` became in ``cls``, if it is one of ``RENAMED`` there."""
    dotted = RENAMED.get(name)
    return dotted if dotted and any(d == dotted for d, *_ in _leaves(cls)) else None


def _spelled(dotted: str) -> str:
    section, _, leaf = dotted.rpartition(".")
    return f"{dotted} (YAML: `{section}: {{{leaf}: ...}}`; flag: --{dotted.replace('_', '-')})"


def nest(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Put the dotted keys (``optim.lr``) of a mapping where they belong."""
    hints = _hints(cls)
    top = {f.name for f in dataclasses.fields(cls)}
    sections = {n for n in top if dataclasses.is_dataclass(_optional(hints[n])[0])}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in sections and isinstance(value, list) and getattr(_optional(hints[key])[0], "list_field", None):
            # A section that names a list field takes a list for the whole section: ``data: [{name, path,
            # weight}, ...]`` is ``data: {sets: [...]}``.
            key = f"{key}.{_optional(hints[key])[0].list_field}"
        elif key in sections and not isinstance(value, dict) and renamed(cls, key):
            # ``model: /path`` was the model folder before ``model`` became a section.
            raise ConfigError(key, f"is a section; for the setting a plain `{key}:` value gave, use "
                                   f"{_spelled(renamed(cls, key))}")
        parts = key.split(".") if isinstance(key, str) and key not in top else [key]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "is set both as a value and as a section")
        last = parts[-1]
        value = copy.deepcopy(value)  # never alias (and later mutate) the caller's mappings
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = {**node[last], **value}
        else:
            node[last] = value
    return out


def build(cls: type, values: dict[str, Any], prefix: str = "", source: str = "",
          origins: dict[str, str] | None = None) -> Any:
    """Build the dataclass ``cls`` from a (possibly nested) mapping, checking every value.

    ``source`` names where the values came from (a YAML file); ``origins`` maps dotted keys to the flag
    that set them, so an error names the flag instead. Messages read ``SOURCE: KEY: problem``.
    """
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    try:
        if not prefix:
            values = nest(cls, values)
        for key in values:
            if not prefix and key not in known and renamed(cls, key):
                raise ConfigError(str(key), f"unknown setting; use {_spelled(renamed(cls, key))}")
            if key not in known:
                near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                guess = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{prefix}.{key}" if prefix else str(key),
                                  f"unknown setting{guess}; the settings here are {', '.join(known)}")
        for name, f in known.items():  # sections not mentioned are built here, so their errors carry their path
            tp, _ = _optional(hints[name])
            if name not in values and isinstance(tp, type) and dataclasses.is_dataclass(tp):
                values = {**values, name: {}}
        for key, value in values.items():
            dotted = f"{prefix}.{key}" if prefix else key
            tp, _ = _optional(hints[key])
            if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
                kwargs[key] = build(tp, value, prefix=dotted, source=source, origins=origins)
            else:
                kwargs[key] = coerce(value, hints[key], dotted)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            dotted = f"{prefix}.{exc.key}" if prefix and exc.key else (exc.key or prefix)
            raise ConfigError(dotted, exc.message) from None
        except TypeError as exc:  # a required field without a value
            raise ConfigError(prefix, f"{cls.__name__}: {exc}") from None
    except ConfigError as exc:
        if prefix:  # the outermost build adds the source
            raise
        flag = (origins or {}).get(exc.key)
        if flag:  # the flag names the key already
            raise UserError(f"{flag}: {exc.message}") from None
        raise UserError(f"{source}: {exc}" if source else str(exc)) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        loader = yaml.SafeLoader(p.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None:
                _refuse_repeated_keys(node, p)
            data = (loader.construct_document(node) if node is not None else None) or {}
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {p}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _refuse_repeated_keys(node: Any, path: Path, where: str = "") -> None:
    """A key given twice in one mapping: PyYAML keeps the last silently, so half of the file is ignored."""
    import yaml

    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(item, path, f"{where}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
            dotted = f"{where}.{name}" if where else name
            if name and name != "<<":  # "<<" is a YAML merge key, which may repeat
                line = key.start_mark.line + 1
                if name in seen:
                    raise UserError(f"config file {path}: {dotted} is given twice (lines {seen[name]} and {line}); "
                                    "only the last would count: keep one")
                seen[name] = line
            _refuse_repeated_keys(value, path, dotted)


def load(cls: type, path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
         origins: dict[str, str] | None = None) -> Any:
    """A config from a YAML file (optional) with dotted-key overrides applied on top."""
    try:
        values = nest(cls, load_yaml(path)) if path else {}
    except ConfigError as exc:
        raise UserError(f"{path}: {exc}") from None
    for key, value in (overrides or {}).items():
        node = values
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"{path}: {p}: is a value there, but {(origins or {}).get(key, key)} sets a key "
                                "inside it")
        node[parts[-1]] = value
    return build(cls, values, source=str(path) if path else "", origins=origins)


# --------------------------------------------------------------------------------------------------
# Flags: one per leaf field, dotted for sections (--optim.lr).


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, type]]:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name], cls


def _default_text(f: dataclasses.Field) -> str:
    """" (default: VALUE)" for the help, or "" where it would say nothing: the help text names the default
    already, or the default is empty (no path, no list)."""
    if re.search(r"\(default\b|\bdefault:", f.metadata.get("help", ""), re.IGNORECASE):
        return ""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return " (required)"
    return "" if value in ("", None, [], {}) else f" (default: {value!r})"


class _Renamed(argparse.Action):
    """A flat flag of earlier versions (--lr): noted, and refused in ``flag_values`` with its new name."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace._renamed = getattr(namespace, "_renamed", None) or option_string


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per leaf setting. Defaults stay None, so that only flags actually given override YAML."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    taken = {f"--{d.replace('_', '-')}" for d, *_ in _leaves(cls)}
    taken |= {a for _, f, *_ in _leaves(cls) for a in f.metadata.get("aliases", ())}
    for dotted, f, tp, owner in _leaves(cls):
        if dotted in skip or not f.metadata.get("flag", True):
            continue
        section = dotted.rpartition(".")[0]
        target: Any = parser
        if section:
            if section not in groups:
                doc = (owner.__doc__ or "").strip().split("\n")[0]
                groups[section] = parser.add_argument_group(f"{section}", doc)
            target = groups[section]
        names = [f"--{dotted.replace('_', '-')}"]  # flags spelled with _ are read as - (normalise_flags)
        names += [a for a in f.metadata.get("aliases", ()) if a not in names]
        base, _ = _optional(tp)
        if typing.get_origin(base) is Annotated and not _is_path(base):
            base = typing.get_args(base)[0]
        help_text = f.metadata.get("help", "")
        if typing.get_origin(base) is Literal:
            help_text += f" One of: {', '.join(str(c) for c in typing.get_args(base))}."
        kwargs: dict[str, Any] = {"dest": dotted, "default": None,
                                  "help": f"{help_text}{_default_text(f)}".replace("%", "%%")}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) in (list, tuple) or base in (list, tuple):
            kwargs.update(nargs="+", action="extend", metavar="VALUE")
        else:
            kwargs["metavar"] = "PATH" if _is_path(base) else ("{" + ",".join(map(str, typing.get_args(base))) + "}"
                                                                 if typing.get_origin(base) is Literal else "VALUE")
        target.add_argument(*names, **kwargs)
    # The flat flags of earlier versions, hidden: without them argparse would read --data as an abbreviation
    # of --data.path or call it ambiguous; with them the error names the flag to use.
    types_of = {d: _optional(tp)[0] for d, _, tp, _ in _leaves(cls)}
    for old, dotted in RENAMED.items():
        flag = old.replace("_", "-")
        names = [f"--{flag}"] + ([f"--no-{flag}"] if types_of.get(dotted) is bool else [])
        if renamed(cls, old) and not taken.intersection(names):
            parser.add_argument(*names, nargs="*", action=_Renamed, dest="_renamed", help=argparse.SUPPRESS)


def normalise_flags(argv: list[str]) -> list[str]:
    """``--optim.warmup_steps 5`` reads as ``--optim.warmup-steps 5``: YAML keys are spelled with underscores,
    flags with hyphens, and users copy one into the other."""
    out = []
    for a in argv:
        if a.startswith("--") and a != "--":
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def flag_values(args: argparse.Namespace, cls: type) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings the user gave as flags (dotted keys), and for each the flag, for error messages."""
    flat = getattr(args, "_renamed", None)
    if flat:
        dotted = RENAMED[flat.removeprefix("--no-").removeprefix("--").replace("-", "_")]
        raise UserError(f"{flat}: unknown flag; use --{'no-' if flat.startswith('--no-') else ''}"
                        f"{dotted.replace('_', '-')}")
    values, origins = {}, {}
    for dotted, f, _, _ in _leaves(cls):
        v = getattr(args, dotted, None)
        if v is not None:
            values[dotted] = v
            origins[dotted] = f"--{dotted.replace('_', '-')}"
    return values, origins


def from_sources(cls: type, args: argparse.Namespace, config_path: str | None = None) -> Any:
    """YAML (``config_path``) overridden by every flag actually given."""
    values, origins = flag_values(args, cls)
    return load(cls, config_path, values, origins)


# --------------------------------------------------------------------------------------------------
# Writing back.


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested mapping (JSON/YAML-able) of a config."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
