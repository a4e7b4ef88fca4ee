"""YAML recipes -> typed dataclasses, validated before any model loads.

A recipe names a method, a model, data, rewards, rollout and eval settings, and `trainer:` fields of the
method's config class. `base: other.yaml` inherits another recipe (deep merge: mappings merge, everything
else is replaced, `null` clears); command-line overrides (`trainer.max_steps=2`) are applied on top.
Every problem is collected and reported at once, each with its full key path, so a typo costs one run
of `load_recipe` instead of one model load per mistake.

Only the stdlib and PyYAML are imported here; the method's config class (and with it torch/TRL) is
imported only when `trainer:` is validated.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

__all__ = [
    "OWNED_TRAINER_KEYS",
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "PeftSpec",
    "Recipe",
    "RecipeError",
    "RewardSpec",
    "RolloutSpec",
    "TaskSpec",
    "load_recipe",
    "parse_overrides",
    "recipe_from_dict",
]

KeyPath = list[str | int]

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Engine = Literal["hf", "vllm"]

# Trainer keys that another recipe section owns in `grpo` recipes: the recipe must have one source of truth for
# them. Each kind's pipeline names its own (`Pipeline.owned_trainer_keys`); output_dir and seed belong to all.
OWNED_TRAINER_KEYS: dict[str, str] = {
    "output_dir": "output_dir (top level)",
    "seed": "seed (top level)",
    "num_generations": "rollout.num_generations",
    "max_completion_length": "rollout.max_new_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "top_k": "rollout.top_k",
    "min_p": "rollout.min_p",
    "repetition_penalty": "rollout.repetition_penalty",
    "use_vllm": "rollout.engine",
    "vllm_mode": "rollout.vllm",
    "reward_weights": "rewards[].weight",
}


class RecipeError(ValueError):
    """An unusable recipe. The message lists every problem found, one per line, each with its key path."""

    def __init__(self, problems: str | Sequence[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        count = len(self.problems)
        header = f"invalid recipe {source or '<recipe>'}: {count} problem{'' if count == 1 else 's'}"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


# --- dataclasses ----------------------------------------------------------------------------------------
# `metadata` bounds ("ge", "gt", "le", "lt") are checked by validation, so nonsense values fail at load.


@dataclass
class PeftSpec:
    r: int = field(default=16, metadata={"ge": 1})
    alpha: int = field(default=32, metadata={"ge": 1})
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None


@dataclass
class ModelSpec:
    name_or_path: str
    dtype: Dtype = "auto"
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    peft: PeftSpec | None = None


@dataclass
class TaskSpec:
    _shorthand: ClassVar[str] = "task"  # YAML `train: gsm8k` means `train: {task: gsm8k}`

    task: str
    path: str | None = None
    split: str | None = None
    limit: int | None = field(default=None, metadata={"ge": 1})
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    train: TaskSpec | None = None
    eval: TaskSpec | None = None
    system_prompt: str | None = None


@dataclass
class RewardSpec:
    _shorthand: ClassVar[str] = "name"  # YAML `- accuracy` means `- {name: accuracy}`

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutSpec:
    engine: Engine = "hf"
    num_generations: int = field(default=8, metadata={"ge": 1})
    max_new_tokens: int = field(default=256, metadata={"ge": 1})
    temperature: float = field(default=1.0, metadata={"ge": 0})
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    top_k: int | None = field(default=None, metadata={"ge": 0})
    min_p: float | None = field(default=None, metadata={"ge": 0, "le": 1})
    repetition_penalty: float = field(default=1.0, metadata={"gt": 0})
    vllm: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSpec:
    before: bool = False
    after: bool = False
    limit: int | None = field(default=None, metadata={"ge": 1})
    batch_size: int = field(default=32, metadata={"ge": 1})
    max_new_tokens: int | None = field(default=None, metadata={"ge": 1})  # None: rollout.max_new_tokens
    temperature: float = field(default=0.0, metadata={"ge": 0})
    n: int = field(default=1, metadata={"ge": 1})
    suites: list[str] = field(default_factory=list)
    every_n_steps: int | None = field(default=None, metadata={"ge": 1})


@dataclass(kw_only=True)
class Recipe:
    """A validated recipe. `data` and `eval` are the dataclasses of the method kind's pipeline
    (`Pipeline.data_spec`, `Pipeline.eval_spec`; DataSpec and EvalSpec for `grpo`); `rewards` and `rollout`
    are read only by the kinds that list them in `Pipeline.sections`."""

    method: str
    model: ModelSpec
    data: Any = field(default_factory=DataSpec)  # the kind's data section
    rewards: list[RewardSpec] = field(default_factory=list)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    trainer: dict[str, Any] = field(default_factory=dict)  # checked against the method's config class
    eval: Any = field(default_factory=EvalSpec)  # the kind's eval section
    output_dir: str
    seed: int = field(default=42, metadata={"ge": 0})
    # Where the recipe was read from; not a YAML key, and not part of equality (a saved copy is equal).
    source: str | None = field(default=None, compare=False, metadata={"yaml": False})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars) that `yaml.safe_dump` writes and `load_recipe` reads back. The
        optional sections (`rewards`, `rollout`) are left out at their defaults: a kind that does not read them
        refuses them, so the saved recipe of such a kind must not name them."""
        data = _to_data(self)
        for f in dataclasses.fields(self):
            if f.name in _OPTIONAL_SECTIONS and getattr(self, f.name) == f.default_factory():
                del data[f.name]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)

    def get(self, key: str) -> Any:
        """The resolved value at a dotted key path (`model.peft.r`, `rewards.0.name`), as plain data; None below a
        null section (`model.peft.r` when `model.peft` is null). A key the recipe's format does not have raises
        RecipeError naming it, with the closest key; so does a key of a free-form section (`trainer`,
        `rollout.vllm`) that the recipe leaves to its default."""
        value: Any = self
        path: list[str | int] = []
        for part in key.split("."):
            if value is None:
                return None
            if isinstance(value, (list, tuple)):
                if not (part.isdigit() and int(part) < len(value)):
                    raise RecipeError(f"'{_render(path)}' has {len(value)} entr{'y' if len(value) == 1 else 'ies'}; "
                                      f"no '{part}'", self.source)
                path.append(int(part))
                value = value[int(part)]
                continue
            path.append(part)
            if dataclasses.is_dataclass(value):
                names = [f.name for f in _yaml_fields(type(value))]
                if part not in names:
                    raise RecipeError(_unknown_key(path, names, "in the recipe format"), self.source)
                value = getattr(value, part)
            elif isinstance(value, Mapping):
                if part not in value:
                    raise RecipeError(f"'{_render(path)}' is not set in the recipe (its default applies; "
                                      "`posttrain validate` prints the effective settings)", self.source)
                value = value[part]
            else:
                raise RecipeError(f"'{_render(path[:-1])}' is a value ({value!r}), not a section", self.source)
        return _to_data(value)

    def save(self, output_dir: str | Path | None = None) -> Path:
        """Write the resolved recipe to `output_dir/recipe.yaml` (default: the recipe's own output_dir)."""
        folder = Path(self.output_dir if output_dir is None else output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "recipe.yaml"
        header = f"# Resolved recipe{f' (from {self.source})' if self.source else ''}; loads with load_recipe.\n"
        target.write_text(header + self.to_yaml(), encoding="utf-8")
        return target


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_data(getattr(value, f.name)) for f in _yaml_fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_data(v) for v in value]
    return value


# --- YAML reading ---------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float (YAML 1.1 needs `1.0e-5`: a learning rate would load as
    a string) and rejects duplicate keys (which PyYAML silently resolves to the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by explicit keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return f"{where}{problem}"


def _read_yaml_file(path: Path) -> dict[str, Any]:
    """One file's top-level mapping (empty file: {})."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}", str(path)) from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe file {path}: {err}", str(path)) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise RecipeError(f"invalid YAML in {path}: {_yaml_problem(err)}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: top level must be a mapping, got {_describe(data)}", str(path))
    return data


def _resolve_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's data with its `base:` chain merged in, `base` removed. `chain` detects cycles."""
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"base cycle: {names}", str(chain[0]))
    data = _read_yaml_file(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{path}: base: expected a file name (str), got {_describe(base)}", str(path))
    base_path = path.parent / base  # relative to the file that names it, not to the working directory
    if not base_path.is_file():
        raise RecipeError(f"{path}: base: recipe file not found: {base_path}", str(path))
    return _merge(_resolve_file(base_path, (*chain, resolved)), data)


def _merge(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge for `base:`: mappings merge recursively; lists, scalars and `null` in the child replace
    the parent's value (so `peft: null` turns LoRA off, and a child's rewards list is the whole list)."""
    merged = copy.deepcopy(dict(parent))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- overrides ------------------------------------------------------------------------------------------


def parse_overrides(overrides: Sequence[str]) -> list[tuple[KeyPath, Any]]:
    """`["trainer.max_steps=2", "rewards.0.weight=0.5"]` -> `[(["trainer", "max_steps"], 2), ...]`.

    The value is read as YAML (`null`, `[a, b]`, `{k: v}`, `1e-5` all work); digit-only key parts are list
    indices. Raises RecipeError listing every malformed override.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key.path=value' strings, not one string")
    parsed: list[tuple[KeyPath, Any]] = []
    problems: list[str] = []
    for item in overrides:
        try:
            parsed.append(_parse_override(item))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise RecipeError(problems, "overrides")
    return parsed


def _parse_override(item: str) -> tuple[KeyPath, Any]:
    key, eq, raw = str(item).partition("=")
    key = key.strip()
    if not eq:
        raise ValueError(f"override {item!r}: expected 'key.path=value' (no '=')")
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ValueError(f"override {item!r}: empty key or key part")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: value is not valid YAML ({_yaml_problem(err)})") from None
    parts = [p.strip() for p in parts]
    return [int(p) if re.fullmatch(r"[0-9]+", p) else p for p in parts], value


def _apply_override(data: dict[str, Any], parts: KeyPath, value: Any) -> str | None:
    """Set `value` at `parts`, replacing missing (or scalar) sections on the way by mappings; a problem or None."""
    if parts[0] == "base":
        return "override of 'base': base is resolved before overrides; name the file to load instead"
    node: Any = data
    for i, part in enumerate(parts):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                what = "index out of range" if isinstance(part, int) else "a list needs an integer index"
                dotted = ".".join(str(p) for p in parts)
                return f"override of '{dotted}': {_render(parts[: i + 1])}: {what} (list has {len(node)} items)"
        else:  # a mapping: YAML keys are strings, so `trainer.0` means the key "0"
            part = str(part)
        if i == len(parts) - 1:
            node[part] = copy.deepcopy(value)
            return None
        child = node.get(part) if isinstance(node, dict) else node[part]
        if not isinstance(child, (dict, list)):
            child = node[part] = {}  # missing (or scalar) section: create it, validation judges the result
        node = child
    return None


def _expand_shorthands(data: dict[str, Any]) -> None:
    """Turn `rewards: [accuracy]` and `data: {train: gsm8k}` into mappings, so that overrides such as
    `rewards.0.weight=0.5` or `data.train.limit=8` have a mapping to land in."""
    rewards = data.get("rewards")
    if isinstance(rewards, list):
        data["rewards"] = [{"name": r} if isinstance(r, str) else r for r in rewards]
    section = data.get("data")
    if isinstance(section, dict):
        for key, shorthand in _data_shorthands(data.get("method")).items():
            if isinstance(section.get(key), str):
                section[key] = {shorthand: section[key]}
            elif isinstance(section.get(key), list):  # `tasks: [sst2, agnews]`, so that `data.tasks.0.path=...` lands
                section[key] = [{shorthand: x} if isinstance(x, str) else x for x in section[key]]


def _data_shorthands(method: Any) -> dict[str, str]:
    """`data:` keys whose value may be a bare string, and the field that string sets, for the method's kind
    (the fields of its data dataclass typed with a dataclass that has a `_shorthand`)."""
    cls: type = DataSpec
    if isinstance(method, str):
        try:
            from posttrain.methods import get_method
            from posttrain.pipelines import get_pipeline

            cls = get_pipeline(get_method(method).kind).data_spec
        except Exception:  # noqa: BLE001 - an unknown method is reported by validation
            pass
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        members = [inner for member in typing.get_args(tp) or (tp,)
                   for inner in ((typing.get_args(member) or (member,)) if typing.get_origin(member) is list
                                 else (member,))]
        for member in members:
            shorthand = getattr(member, "_shorthand", None) if dataclasses.is_dataclass(member) else None
            if shorthand:
                out[name] = shorthand
    return out


# --- type checking --------------------------------------------------------------------------------------


def _render(path: KeyPath) -> str:
    """`["rewards", 1, "weight"]` -> `rewards[1].weight`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<recipe>"


def _describe(value: Any) -> str:
    """`got` part of a type error: type name and a short repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return "null" if value is None else f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else origin.__name__
    if tp is Any:
        return "any"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: KeyPath, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`, appending problems to `errors`; returns the typed value
    (dataclasses built, ints widened to float). Annotations it cannot check accept anything."""
    origin = typing.get_origin(tp)
    if tp is Any or isinstance(tp, typing.TypeVar):
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, typing.get_args(tp), path, errors)
    if origin is Literal:
        return _convert_literal(value, typing.get_args(tp), path, errors)
    if origin in (list, Sequence) or tp is list:
        return _convert_list(value, typing.get_args(tp), path, errors)
    if origin in (dict, Mapping) or tp is dict:
        return _convert_dict(value, typing.get_args(tp), path, errors)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(value, tp, path, errors)
    if tp in (bool, int, float, str, type(None)):
        return _convert_scalar(value, tp, path, errors)
    return value  # tuple, Callable, arbitrary classes...: cannot check from YAML, accept


def _type_error(value: Any, tp: Any, path: KeyPath) -> str:
    message = f"{_render(path)}: expected {_type_name(tp)}, got {_describe(value)}"
    if isinstance(value, bool) and "str" in _type_name(tp):
        message += " (YAML reads a bare yes/no/on/off as a boolean: quote it, e.g. \"no\")"
    return message


def _convert_scalar(value: Any, tp: type, path: KeyPath, errors: list[str]) -> Any:
    if tp is type(None):
        ok = value is None
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML `yes` is not a number
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        errors.append(_type_error(value, tp, path))
        return value
    return float(value) if tp is float else value


def _convert_literal(value: Any, choices: tuple, path: KeyPath, errors: list[str]) -> Any:
    if any(value == c and type(value) is type(c) for c in choices):
        return value
    message = f"{_render(path)}: expected one of {', '.join(repr(c) for c in choices)}, got {_describe(value)}"
    strings = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(value, strings, n=1) if isinstance(value, str) else []
    errors.append(f"{message}. Did you mean '{close[0]}'?" if close else message)
    return value


def _convert_enum(value: Any, tp: type[enum.Enum], path: KeyPath, errors: list[str]) -> Any:
    if isinstance(value, tp) or any(value == m.value for m in tp):
        return value
    choices = [m.value for m in tp]
    errors.append(f"{_render(path)}: expected one of {', '.join(repr(c) for c in choices)}, got {_describe(value)}")
    return value


def _convert_list(value: Any, args: tuple, path: KeyPath, errors: list[str]) -> Any:
    if not isinstance(value, list):
        errors.append(_type_error(value, list[args] if args else list, path))
        return value
    if not args:
        return list(value)
    return [_convert(item, args[0], [*path, i], errors) for i, item in enumerate(value)]


def _convert_dict(value: Any, args: tuple, path: KeyPath, errors: list[str]) -> Any:
    if not isinstance(value, dict):
        errors.append(_type_error(value, dict, path))
        return value
    if not args:
        return dict(value)
    key_tp, value_tp = args
    out = {}
    for key, item in value.items():
        _convert(key, key_tp, [*path, str(key)], errors)  # YAML `1:` or `yes:` as a key of dict[str, ...]
        out[key] = _convert(item, value_tp, [*path, str(key)], errors)
    return out


def _convert_union(value: Any, members: tuple, path: KeyPath, errors: list[str]) -> Any:
    """First member that accepts the value wins. When none does and exactly one member has the value's
    shape (e.g. a list for `str | list[str]`), its inner problems are reported, as they are more precise."""
    if value is None and type(None) in members:
        return None
    candidates = [m for m in members if m is not type(None)]
    if len(candidates) == 1 and value is not None:
        return _convert(value, candidates[0], path, errors)
    failures = []
    for member in candidates:
        trial: list[str] = []
        converted = _convert(value, member, path, trial)
        if not trial:
            return converted
        failures.append((member, trial))
    shaped = [trial for member, trial in failures if _same_shape(value, member)]
    if len(shaped) == 1:
        errors.extend(shaped[0])
    else:
        errors.append(_type_error(value, typing.Union[members], path))
    return value


def _same_shape(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        return isinstance(value, dict)
    return origin in (list, dict) and isinstance(value, origin)


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _check_bounds(value: Any, f: dataclasses.Field, path: KeyPath, errors: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, (symbol, test) in _BOUNDS.items():
        if key in f.metadata and not test(value, f.metadata[key]):
            errors.append(f"{_render(path)}: must be {symbol} {f.metadata[key]}, got {value!r}")


# --- building the dataclasses ---------------------------------------------------------------------------


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


FieldHook = Callable[[Any, list[str]], Any]


def _build(cls: type, value: Any, path: KeyPath, errors: list[str],
           hooks: Mapping[str, FieldHook] | None = None) -> Any:
    """Build dataclass `cls` from YAML data, recording every problem; None when anything under it is wrong.
    `hooks` check fields that their annotation cannot describe (a recipe's `trainer:`), in field order."""
    start = len(errors)
    shorthand = getattr(cls, "_shorthand", None)
    if shorthand and isinstance(value, str):
        value = {shorthand: value}
    if not isinstance(value, dict):
        expected = f"mapping or str (the {shorthand})" if shorthand else "mapping"
        errors.append(f"{_render(path)}: expected {expected}, got {_describe(value)}")
        return None
    fields = _yaml_fields(cls)
    names = [f.name for f in fields]
    for key in value:
        if key not in names:
            errors.append(_unknown_key([*path, str(key)], names, f"(allowed: {', '.join(names)})"))
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        sub = [*path, f.name]
        raw, tp = value.get(f.name), hints[f.name]
        if hooks and f.name in hooks:  # the hook also decides what an absent (None) value means
            kwargs[f.name] = hooks[f.name](raw, errors)
            continue
        if raw is None and not _is_optional(tp):
            if not _is_required(f):
                continue  # absent, or null: null resets a defaulted field to its default
            if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
                errors.append(f"missing required key '{_render(sub)}'")
                continue
            raw = {}  # absent required section: report its own required keys (model.name_or_path)
        before = len(errors)
        kwargs[f.name] = _convert(raw, tp, sub, errors)
        if len(errors) == before:
            _check_bounds(kwargs[f.name], f, sub, errors)
    return cls(**kwargs) if len(errors) == start else None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _unknown_key(path: KeyPath, candidates: Sequence[str], fallback: str) -> str:
    """"unknown key 'a.b'. Did you mean 'a.c'?" (difflib), or the fallback note when nothing is close."""
    close = difflib.get_close_matches(str(path[-1]), list(candidates), n=1)
    if close:
        return f"unknown key '{_render(path)}'. Did you mean '{_render([*path[:-1], close[0]])}'?"
    return f"unknown key '{_render(path)}' {fallback}"


# --- method and trainer ---------------------------------------------------------------------------------


def _check_method(method: Any, errors: list[str]) -> tuple[type | None, Any]:
    """(the method's config class, its kind's pipeline), each None (with a problem recorded) when it cannot be had."""
    if method is None:
        return None, None  # reported as a missing required key
    if not isinstance(method, str):
        return None, None  # reported as a type error
    from posttrain.methods import get_method
    from posttrain.pipelines import get_pipeline

    try:
        spec = get_method(method)
    except KeyError as err:
        errors.append(f"method: {err.args[0]}")
        return None, None
    try:
        pipeline = get_pipeline(spec.kind)
    except Exception as err:  # noqa: BLE001 - a broken pipeline makes the kind's sections uncheckable
        errors.append(f"method: cannot load the pipeline of kind '{spec.kind}' (method '{method}'): "
                      f"{type(err).__name__}: {err}")
        pipeline = None
    try:
        return spec.config_class(), pipeline
    except Exception as err:  # noqa: BLE001 - any import failure makes trainer keys uncheckable
        errors.append(f"method: cannot load config class {spec.config} of method '{method}': "
                      f"{type(err).__name__}: {err}")
        return None, pipeline


def _config_hints(config_class: type) -> dict[str, Any]:
    """Init fields of the config class and their annotations; fields whose annotation cannot be resolved
    (e.g. names imported only under TYPE_CHECKING) map to Any, i.e. are not type-checked."""
    fields = [f for f in dataclasses.fields(config_class) if f.init]
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001
        hints = {}
    return {f.name: hints.get(f.name, f.type if not isinstance(f.type, str) else Any) for f in fields}


def _check_trainer(config_class: type | None, owned: Mapping[str, str], trainer: Any, errors: list[str]) -> Any:
    """The trainer mapping without cleared keys. Keys in `owned` (key -> the section that sets it) are rejected
    always; unknown keys and value types are checked only when the method's config class is known."""
    if trainer is None:
        return {}
    if not isinstance(trainer, dict):
        errors.append(f"trainer: expected mapping, got {_describe(trainer)}")
        return trainer
    hints = _config_hints(config_class) if config_class is not None else {}
    allowed = [name for name in hints if name not in owned]
    kept: dict[Any, Any] = {}
    for key, value in trainer.items():
        path: KeyPath = ["trainer", str(key)]
        if value is None and key in hints and key not in owned and not _accepts_none(hints[key]):
            continue  # null for a non-optional field clears it: the config's default applies
        kept[key] = value
        if key in owned:
            errors.append(f"trainer.{key} is set by {owned[key]}")
        elif config_class is None:
            continue
        elif key not in hints:
            errors.append(_unknown_key(path, allowed, f"(not a field of {config_class.__name__})"))
        else:
            _convert(value, hints[key], path, errors)
    return kept


def _accepts_none(tp: Any) -> bool:
    return tp is Any or _is_optional(tp)


# --- kind-specific sections -----------------------------------------------------------------------------

_OPTIONAL_SECTIONS = ("rewards", "rollout")  # read only by the kinds that list them in Pipeline.sections


def _section_hooks(pipeline: Any, method: Any) -> dict[str, FieldHook]:
    """Hooks that build `data` and `eval` with the kind's dataclasses and refuse sections the kind never reads.
    Without a pipeline (unknown method) `data` and `eval` are checked against the GRPO ones, so that the
    recipe's other problems are still reported."""
    data_cls = pipeline.data_spec if pipeline is not None else DataSpec
    eval_cls = pipeline.eval_spec if pipeline is not None else EvalSpec

    def section(name: str, cls: type) -> FieldHook:
        def hook(raw: Any, errors: list[str]) -> Any:
            return _build(cls, {} if raw is None else raw, [name], errors)

        return hook

    def optional(name: str) -> FieldHook:
        tp = typing.get_type_hints(Recipe)[name]
        default = next(f for f in dataclasses.fields(Recipe) if f.name == name).default_factory

        def hook(raw: Any, errors: list[str]) -> Any:
            if raw is None or raw == _to_data(default()):  # absent, or its default as a saved recipe writes it
                return default()
            if pipeline is not None and name not in pipeline.sections:
                used = ", ".join(sorted({"data", "eval", "trainer", *pipeline.sections}))
                errors.append(f"{name}: method '{method}' (kind '{pipeline.kind}') does not read a {name} section "
                              f"(its sections: {used}); remove it")
                return default()
            before = len(errors)
            value = _convert(raw, tp, [name], errors)
            return value if len(errors) == before else default()

        return hook

    hooks = {"data": section("data", data_cls), "eval": section("eval", eval_cls)}
    hooks.update({name: optional(name) for name in _OPTIONAL_SECTIONS})
    return hooks


# --- entry point ----------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, resolve (`base:`, overrides) and validate a recipe; raises RecipeError listing every problem."""
    try:
        parsed = parse_overrides(overrides)
    except RecipeError as err:
        raise RecipeError(err.problems, str(path)) from None
    data = _resolve_file(Path(path))
    errors: list[str] = []
    for parts, value in parsed:
        _expand_shorthands(data)  # also after each override: `data.train=gsm8k data.train.limit=8`
        if (problem := _apply_override(data, parts, value)) is not None:
            errors.append(problem)
    return _validate(data, str(path), errors)


def recipe_from_dict(data: Mapping[str, Any], source: str | None = None) -> Recipe:
    """Validate resolved recipe data (no `base:`, no overrides) into a Recipe, e.g. one built in code."""
    return _validate(data, source, [])


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _sharding_problems(recipe: Recipe, pipeline: Any) -> list[str]:
    """Main-process evaluation of a model whose parameters are sharded over ranks (FSDP, ZeRO-3) would hang: a
    forward pass there needs every rank's shards. Refused before any model loads (`pipeline`: the recipe's kind's)."""
    from posttrain.distributed import rank_info, sharding_from_recipe

    sharding = sharding_from_recipe(recipe.trainer)
    if sharding is None:
        return []
    if sharding == "fsdp" and rank_info()[2] > 1 and not _has_accelerator():
        # accelerate turns on its FSDP plugin only from a GPU-type distributed state: launched on CPU (MULTI_CPU) it
        # would silently train plain DDP with every parameter on every rank. (DeepSpeed runs on CPU: its CPU
        # accelerator, over gloo.)
        return ["trainer: fsdp sharding needs GPUs; on CPU accelerate ignores the FSDP plugin and would train plain "
                "DDP (every rank holding the whole model). Launch CPU runs with launch/accelerate/cpu_2proc.yaml "
                "(DDP over gloo), or shard with DeepSpeed ZeRO-3 (launch/accelerate/zero3.yaml, which runs on CPU)"]
    hint = ("the evaluation runs on the main process, whose forward pass needs every rank's parameter shards under "
            f"{sharding} training (it would hang); evaluate the saved checkpoint with `posttrain eval` instead")
    problems = []
    if getattr(recipe.eval, "every_n_steps", None):
        problems.append(f"eval.every_n_steps: {hint} (unset it), or train with DDP or ZeRO-1/2")
    if getattr(recipe.eval, "after", False):
        problems.append(f"eval.after: {hint} (set it to false)")
    if sharding == "zero3" and getattr(recipe.eval, "before", False) and not pipeline.evaluates_its_own_copy(recipe):
        # transformers loads the model under DeepSpeed's zero.Init once ZeRO-3 is configured: every rank holds
        # only its partition of the weights from the start, so the main process cannot run the model alone
        problems.append("eval.before: under zero3 the weights are partitioned over the ranks as the model loads, so "
                        "the main process cannot evaluate it alone; set eval.before: false and evaluate the base "
                        "model with `posttrain eval`, or generate with rollout.engine: vllm (GRPO)")
    return problems


def _validate(data: Mapping[str, Any], source: str | None, errors: list[str]) -> Recipe:
    """All problems (after those already in `errors`) in one RecipeError, or the Recipe."""
    data = dict(data)
    if "base" in data:
        errors.append("base: only allowed in recipe files (resolved by load_recipe)")
        data.pop("base")
    config_class, pipeline = _check_method(data.get("method"), errors)
    owned = pipeline.owned_trainer_keys if pipeline is not None else OWNED_TRAINER_KEYS
    hooks = {"trainer": functools.partial(_check_trainer, config_class, owned),
             **_section_hooks(pipeline, data.get("method"))}
    recipe = _build(Recipe, data, [], errors, hooks=hooks)
    if recipe is not None and pipeline is not None and not errors:
        errors.extend(pipeline.check(recipe) or _sharding_problems(recipe, pipeline))
    if errors or recipe is None:
        raise RecipeError(errors or ["recipe could not be built"], source)
    recipe.source = source
    return recipe
