"""The declarative schema every recipe kind is written in (pre-training, fine-tuning and QAT recipes,
pipeline specs), and the one-line errors it gives.

How it works. Each section of a config is a :class:`Section`, a pydantic v2 model that forbids
unknown keys. A field's annotation is its type and range, its value the default:

    total_steps: PositiveInt = 100_000               # a strict int > 0
    final_sparsity: Fraction = 0.9                   # a number in [0, 1)
    attn_implementation: Literal[ATTENTION] = "sdpa"
    adam_betas: Annotated[list[Fraction], Field(min_length=2, max_length=2,
                                                description="two numbers in [0, 1) (beta1, beta2)")]

Types are strict, so YAML never turns into something else silently: ``maybe`` and ``2`` are not
bools, ``"12"`` and ``12.5`` are not ints, a list is not a string. Numbers also take the strings
YAML 1.1 reads for ``5e-5`` (no dot). Rules between fields are ``model_validator``\\ s that raise
:func:`rule` with the key they are about; nothing else is hand-written.

:func:`validated` runs pydantic once over a whole config tree and turns its ``ValidationError``
into one message in the house style, starting with the dotted key, and followed by the number of
other problems found::

    pruning.final_sparsty: unknown key (known: method, scope, initial_sparsity, ...)
    training.max_grad_norm: must be >= 0, got -1
    training.adam_betas: must be two numbers in [0, 1) (beta1, beta2), got [0.9] (and 1 more problem(s))

A field's ``description``, where it has one, is what the whole field must be; messages about any
part of it use it word for word (``got`` then shows the whole value). Ranges and choices come from
the annotations, so a message can never disagree with what is checked.
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = ["ConfigError", "Section", "rule", "validated", "Flag", "Text", "Number", "PositiveInt",
           "NonNegativeInt", "PositiveNumber", "NonNegativeNumber", "Fraction", "Probability"]


class ConfigError(ValueError):
    """A recipe value is invalid; the message starts with the dotted key."""


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string: read it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Flag = StrictBool
Text = StrictStr
Number = Annotated[float, BeforeValidator(_yaml_number), Strict()]   # an int or a float; never a bool
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]
Fraction = Annotated[Number, Field(ge=0, lt=1)]
Probability = Annotated[Number, Field(ge=0, le=1)]


class Section(BaseModel):
    """One section of a config: unknown keys rejected, no infinities or NaNs; a section given as
    null (``pruning:`` with every key commented out) means its defaults."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    #: what a key of this model is called in "unknown ..." messages
    member_word: ClassVar[str] = "key"

    @model_validator(mode="before")
    @classmethod
    def _null_sections_mean_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (
                v is None and k in cls.model_fields and _is_section(cls.model_fields[k].annotation))}
        return data


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def rule(key: str, message: str) -> PydanticCustomError:
    """A broken rule between fields, raised from a model validator: ``key`` is dotted, relative to
    the model validated (``"micro_batch_size"``, or ``"pruning.end"`` from the recipe)."""
    return PydanticCustomError("rule", "{message}", {"key": key, "message": message})


def validated(model: type[BaseModel], tree: Any, error: type[Exception] = ConfigError,
              where: Sequence[str] = ()):
    """``model`` validated from ``tree``, or ``error`` with one message naming the first problem's
    dotted key (prefixed with ``where``) and how many more there are."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        problems: list[str] = []
        for item in err.errors(include_url=False):
            text = _problem(item, model, tree, tuple(where))
            if text not in problems:
                problems.append(text)
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise error(problems[0] + more) from None


# -- from pydantic's errors to ours --------------------------------------------------------------------

def _dotted(loc: Sequence) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


class _Spot:
    """What the schema says about one location: the model owning its last key, the bare type, its
    bounds, choices and whether null is allowed, and the nearest described field above it."""

    def __init__(self):
        self.owner: Optional[type[BaseModel]] = None
        self.found = True
        self.type: Any = None
        self.bounds: dict = {}
        self.optional = False
        self.described: Optional[tuple[int, str]] = None   # (depth of that field in loc, description)


def _unwrap(annotation: Any, spot: _Spot) -> Any:
    """Strip Optional and Annotated, collecting bounds and nullability into ``spot``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *metadata = typing.get_args(annotation)
            _collect(metadata, spot)
        elif origin in (Union, types.UnionType):
            args = typing.get_args(annotation)
            rest = [a for a in args if a is not type(None)]
            spot.optional |= len(rest) < len(args)
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


_BOUNDS = {annotated_types.Gt: "gt", annotated_types.Ge: "ge", annotated_types.Lt: "lt", annotated_types.Le: "le",
           annotated_types.MinLen: "min_length", annotated_types.MaxLen: "max_length"}


def _collect(metadata: Sequence, spot: _Spot) -> None:
    for item in metadata:
        if isinstance(item, FieldInfo):
            _collect(item.metadata, spot)
        elif type(item) in _BOUNDS:
            name = _BOUNDS[type(item)]
            spot.bounds[name] = getattr(item, name)


def _locate(model: type[BaseModel], loc: Sequence) -> _Spot:
    spot, annotation = _Spot(), model
    for depth, part in enumerate(loc):
        spot.bounds, spot.optional = {}, False
        bare = _unwrap(annotation, spot)
        if _is_section(bare):
            spot.owner = bare
            field = bare.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                spot.found = False
                return spot
            annotation = field.annotation
            spot.bounds, spot.optional = {}, False
            _collect(field.metadata, spot)
            if field.description:
                spot.described = (depth + 1, field.description)
            continue
        spot.owner = None
        args = typing.get_args(bare)
        if typing.get_origin(bare) in (list, tuple, set, dict) and args:
            annotation = args[-1]
        else:
            spot.found = False
            return spot
    spot.type = _unwrap(annotation, spot)     # adds the bounds of an Optional[Annotated[...]]
    return spot


def _value_at(tree: Any, loc: Sequence) -> Any:
    for part in loc:
        try:
            tree = tree[part]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _range(bounds: dict) -> str:
    low = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if low and high:
        return f" in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return "".join(f" {sign[pair[0]]} {pair[1]}" for pair in (low, high) if pair)


def _choices(annotation: Any) -> Optional[tuple]:
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _expected(spot: _Spot, nullable: bool = True) -> str:
    t, choices = spot.type, _choices(spot.type)
    origin = typing.get_origin(t) or t
    if choices:
        text = f"one of {', '.join(map(str, choices))}"
    elif t is bool:
        text = "true or false"
    elif t is int:
        text = "an integer" + _range(spot.bounds)
    elif t is float:
        text = "a number" + _range(spot.bounds)
    elif t is str:
        text = "a string"
    elif origin in (list, tuple, set):
        text = "a list"
    elif origin is dict or _is_section(t):
        text = "a mapping"
    else:
        text = f"a {getattr(t, '__name__', t)}"
    return text + (" or null" if spot.optional and nullable else "")


def _problem(item: dict, model: type[BaseModel], tree: Any, where: tuple) -> str:
    loc, kind, ctx = tuple(item["loc"]), item["type"], item.get("ctx") or {}
    value = item.get("input")
    if kind == "rule":
        key = loc + tuple(ctx["key"].split(".")) if ctx["key"] else loc
        return f"{_dotted(where + key)}: {ctx['message']}"
    spot = _locate(model, loc)
    if kind == "extra_forbidden":
        owner = spot.owner if spot.owner is not None else model
        return (f"{_dotted(where + loc)}: unknown {owner.member_word} "
                f"(known: {', '.join(owner.model_fields)})")
    if kind == "value_error":
        return f"{_dotted(where + loc)}: {ctx.get('error', item['msg'])}"
    if kind == "missing":
        hint = spot.described[1] if spot.described and spot.described[0] == len(loc) else (
            f"one of {', '.join(map(str, _choices(spot.type)))}" if spot.found and _choices(spot.type) else "")
        return f"{_dotted(where + loc)}: must be set" + (f" ({hint})" if hint else "")
    if spot.described:                     # what the whole field must be, said by the schema
        depth, description = spot.described
        return f"{_dotted(where + loc[:depth])}: must be {description}, got {_value_at(tree, loc[:depth])!r}"
    key = _dotted(where + loc)
    if not spot.found:
        return f"{key}: {item['msg']}"
    if kind == "finite_number":
        return f"{key}: must be a finite number, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        value = _yaml_number(value)        # the number that was compared, also where YAML gave "-1e-8"
        if ({"ge", "gt"} & set(spot.bounds)) and ({"le", "lt"} & set(spot.bounds)):   # an interval: say it whole
            return f"{key}: must be {_expected(spot, nullable=False)}, got {value!r}"
        (name, bound), = ctx.items()
        return f"{key}: must be {dict(gt='>', ge='>=', lt='<', le='<=')[name]} {bound}, got {value!r}"
    if kind in ("too_short", "too_long") and spot.type is str:
        return f"{key}: must be a string of {ctx.get('min_length', 0)} to {ctx.get('max_length', 'any')} characters, " \
               f"got {value!r}"
    if kind in ("too_short", "too_long"):
        low, high = spot.bounds.get("min_length"), spot.bounds.get("max_length")
        size = (f"{low}" if low == high else f"at least {low}" if kind == "too_short" else f"at most {high}")
        return f"{key}: must be a list of {size} item(s), got {value!r}"
    return f"{key}: must be {_expected(spot)}, got {value!r}"
