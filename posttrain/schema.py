"""The recipe format as JSON Schema (draft 2020-12), generated from the same dataclasses the loader validates
against, so editors complete and check recipe files as they are typed (`posttrain recipes schema`).

The schema knows every section's keys, types, choices, bounds and bare-string shorthands; `method` lists the
registered methods, and `data` / `eval` accept the dataclass of any method kind (which one applies depends on
`method`, which the loader checks). `trainer:` is open: its keys are the method's TRL config fields, checked by
the loader with their types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

__all__ = ["recipe_json_schema"]

_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
_BOUNDS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


def _schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return {}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema(a, defs) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is list or tp is list:
        return {"type": "array", **({"items": _schema(args[0], defs)} if args else {})}
    if origin is dict or tp is dict:
        return {"type": "object", **({"additionalProperties": _schema(args[1], defs)} if args else {})}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, defs)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    return {}


def _dataclass(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    name = cls.__name__
    if name not in defs:
        defs[name] = {}  # placeholder: recursive references resolve to the same definition
        hints = typing.get_type_hints(cls)
        props, required = {}, []
        for f in dataclasses.fields(cls):
            if not f.metadata.get("yaml", True) or not f.init:
                continue
            prop = _schema(hints[f.name], defs)
            for key, schema_key in _BOUNDS.items():
                if key in f.metadata:
                    prop[schema_key] = f.metadata[key]
            if f.default is not dataclasses.MISSING and isinstance(f.default, (bool, int, float, str, type(None))):
                prop["default"] = f.default
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                prop = {"anyOf": [prop, {"type": "null"}]}  # null resets a defaulted key (the loader's rule)
            props[f.name] = prop
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        body: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            body["required"] = required
        if cls.__doc__:
            body["description"] = " ".join(cls.__doc__.split())
        shorthand = getattr(cls, "_shorthand", None)
        defs[name] = {"anyOf": [{"type": "string", "description": f"shorthand for {{{shorthand}: ...}}"}, body]} \
            if shorthand else body
    return {"$ref": f"#/$defs/{name}"}


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file (see the module docstring)."""
    from posttrain.methods import METHODS
    from posttrain.pipelines import PIPELINES, get_pipeline
    from posttrain.recipe import Recipe

    defs: dict[str, Any] = {}
    top = _dataclass(Recipe, defs)
    recipe = defs[top["$ref"].rsplit("/", 1)[1]]
    props = recipe["properties"]
    props["method"] = {"enum": sorted(METHODS), "description": "the training method (posttrain.methods)"}
    pipelines = [get_pipeline(kind) for kind in sorted(PIPELINES)]
    props["data"] = {"anyOf": [_dataclass(p.data_spec, defs) for p in pipelines]}
    props["eval"] = {"anyOf": list({id(p.eval_spec): _dataclass(p.eval_spec, defs) for p in pipelines}.values())}
    props["trainer"] = {"type": "object", "description": "fields of the method's TRL config (checked by the loader)"}
    props["base"] = {"type": "string", "description": "a recipe file this one inherits (relative to this file)"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://posttrain/recipe.schema.json",
            "title": "posttrain recipe", **top, "$defs": defs}
