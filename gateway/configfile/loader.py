"""Reading a configuration file: YAML, then ``${ENV_VAR}`` expansion, then the schema.

Every problem is collected before anything is reported, so one run names all of them, each as
``FILE: entry > entry.field: what is wrong (line N)``. Nothing here touches the database.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gateway.configfile.schema import ConfigFile, EnvString, Loc, duplicate_problems, secret_env_name

# "${NAME}" is a reference, "$${" writes a literal "${". An unclosed "${..." is caught below.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}?")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(Exception):
    """The file cannot be applied. ``messages`` holds every problem, each naming file, entry and field."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


@dataclass(frozen=True)
class Problem:
    loc: Loc
    message: str


def config_load(path: str | Path, *, environ: Mapping[str, str] | None = None) -> ConfigFile:
    """Read, expand and validate the file at ``path``; raise ``ConfigError`` listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc}"]) from None
    return config_parse(text, source=str(path), environ=environ)


def config_parse(text: str, *, source: str, environ: Mapping[str, str] | None = None) -> ConfigFile:
    """Validate the YAML ``text``; ``source`` names it in messages, ``environ`` defaults to os.environ."""
    raw = _yaml_parse(text, source)
    if not isinstance(raw, Mapping):
        found = "empty" if raw is None else "a list" if isinstance(raw, list) else "a single value"
        expected = "expected a mapping with version: 1, endpoints, tenants, prices"
        raise ConfigError([f"{source}: the file is {found}; {expected}"])

    problems: list[Problem] = []
    expanded = env_expand(raw, os.environ if environ is None else environ, problems)
    env_locs = {p.loc for p in problems}
    problems += [Problem(loc, message) for loc, message in duplicate_problems(expanded)]
    config: ConfigFile | None = None
    try:
        config = ConfigFile.model_validate(expanded)
    except ValidationError as exc:
        # A missing variable already explains why the value it stood for is invalid.
        problems += [p for p in _schema_problems(exc, raw) if p.loc not in env_locs]
    if problems or config is None:
        located = [_describe(source, raw, p) for p in problems]
        raise ConfigError([message for _, message in sorted(located, key=lambda pair: pair[0])])
    return config


# --- YAML ------------------------------------------------------------------------------------------


class _Dict(dict):
    """A mapping that remembers the line of each key, so errors can point into the file."""

    lines: dict[Any, int]


class _List(list):
    """A sequence that remembers the line of each item."""

    lines: list[int]


class _Loader(yaml.SafeLoader):
    """Safe YAML that keeps dates as text and refuses duplicate keys."""


# YAML 1.1 would turn "api_version: 2024-10-21" into a date; the schema parses the dates it wants.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Dict:
    loader.flatten_mapping(node)
    result = _Dict()
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool | None):
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, "found a key that is not a plain value", key_node.start_mark
            )
        if key in result:
            # PyYAML would silently keep the last one; a repeated key is nearly always a mistake.
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _List:
    result = _List(loader.construct_object(child, deep=True) for child in node.value)
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def _yaml_parse(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError([f"{source}: {where}malformed YAML: {exc.problem}{context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: malformed YAML: {exc}"]) from None


# --- environment variables ---------------------------------------------------------------------


def env_expand(node: Any, environ: Mapping[str, str], problems: list[Problem], loc: Loc = ()) -> Any:
    """A copy of ``node`` with ``${VAR}`` references in string values replaced; keys are left alone.

    A string that is exactly one reference becomes an ``EnvString``, which is how secrets must be
    written. Missing variables and malformed references are appended to ``problems``; the value
    then expands to "" so validation can go on and report the file's other problems too.
    """
    if isinstance(node, Mapping):
        result = _Dict((key, env_expand(value, environ, problems, (*loc, key))) for key, value in node.items())
        result.lines = getattr(node, "lines", {})
        return result
    if isinstance(node, list):
        items = _List(env_expand(item, environ, problems, (*loc, i)) for i, item in enumerate(node))
        items.lines = getattr(node, "lines", [])
        return items
    if isinstance(node, str) and "$" in node:
        return _expand_string(node, environ, problems, loc)
    return node


def _expand_string(value: str, environ: Mapping[str, str], problems: list[Problem], loc: Loc) -> str:
    whole = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)
    parts: list[str] = []
    position = 0
    for match in _REFERENCE.finditer(value):
        parts.append(value[position : match.start()])
        position = match.end()
        token, name = match.group(0), match.group(1)
        if token == "$${":
            parts.append("${")
        elif not token.endswith("}") or not _VAR_NAME.fullmatch(name):
            # The token itself is not echoed: it may be a secret pasted between the braces.
            problems.append(
                Problem(
                    loc,
                    "malformed environment variable reference: write ${NAME} "
                    "(letters, digits, _), or $${ for a literal ${",
                )
            )
        elif name not in environ:
            problems.append(Problem(loc, f"environment variable {name} is not set"))
        else:
            parts.append(environ[name])
    parts.append(value[position:])
    if whole:
        return EnvString(environ.get(whole[1], ""), whole[1])
    return "".join(parts)


# --- turning validation errors into located messages -------------------------------------------


def _schema_problems(exc: ValidationError, raw: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc, kind, message = tuple(error["loc"]), error["type"], error["msg"]
        if kind == "extra_forbidden":
            message = "unknown field" + _suggestion(loc)
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif kind == "literal_secret" and len(loc) >= 3 and loc[0] == "endpoints":
            name = _at(raw, loc[:2]).get("name", "")
            field = "AD_CLIENT_SECRET" if "azure_ad" in loc else "API_KEY"
            if isinstance(name, str) and name:
                message += f" (for example ${{{secret_env_name(name, field)}}}, as gateway_export names it)"
        problems.append(Problem(loc, message))
    return problems


def _suggestion(loc: Loc) -> str:
    """' (did you mean 'rpm'?)' for a misspelt field, else the fields that are allowed there."""
    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(allowed)}"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    model: Any = ConfigFile
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list: the list's item type was taken with its field
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _item_type(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _item_type(annotation: Any) -> Any:
    """Strip Annotated, Optional and list[...] down to the type of one item."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated or origin is list:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is types.UnionType:
            annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
        else:
            return annotation


def _at(node: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return {}
    return node


def _describe(source: str, raw: Any, problem: Problem) -> tuple[int, str]:
    """``(line, "FILE: endpoints[0] (east) > deployments[1] (x).rpm: message (line N)")``."""
    text = ""
    line = 0
    node = raw
    after_entry = False  # the previous part was an entry of a list of mappings
    for part in problem.loc:
        lines = getattr(node, "lines", None)
        if isinstance(part, int):
            child = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            label = _entry_label(child) if isinstance(child, Mapping) else ""
            text += f"[{part}]" + (f" ({label})" if label else "")
            after_entry = isinstance(child, Mapping)
            if lines and 0 <= part < len(lines):
                line = lines[part]
        else:
            child = node.get(part) if isinstance(node, Mapping) else None
            # Nested lists of entries read as a path ("east > deployments[1]"), fields as attributes.
            separator = "" if not text else " > " if after_entry and isinstance(child, list) else "."
            text += separator + str(part)
            after_entry = False
            if lines and part in lines:
                line = lines[part]
        node = child
    message = f"{source}: {text}: {problem.message}" if text else f"{source}: {problem.message}"
    return line, message + (f" (line {line})" if line else "")


def _entry_label(entry: Mapping[str, Any]) -> str:
    for field in ("slug", "name"):
        if isinstance(entry.get(field), str):
            return entry[field]
    if isinstance(entry.get("model"), str):
        since = entry.get("effective_from")
        return f"{entry['model']} from {since}" if isinstance(since, str) else entry["model"]
    return ""
