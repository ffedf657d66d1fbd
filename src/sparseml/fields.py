"""Declarative, validated modifier fields.

A modifier lists its fields once, as ``Field`` objects in a class-level ``FIELDS`` dict. Each
field has a default (or is required), a converter that validates and normalises a value and
raises ``FieldValueError`` describing what is allowed, and optional aliases.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sparseml.errors import RecipeError

REQUIRED = object()

_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = _BRIEF.maxlong = 80
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6
_BRIEF.maxlevel = 3


def brief(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters and elements.

    Error messages echo user input, which may be huge (a megabyte string, a list of 10^5
    entries); the message must stay one readable line.
    """
    try:
        return _BRIEF.repr(value)
    except ValueError:  # an int too long to convert to text
        return f"<{type(value).__name__}>"


class FieldValueError(ValueError):
    """Raised by a converter; the message says what values are allowed."""


@dataclass(frozen=True)
class Field:
    default: Any = REQUIRED
    convert: Callable[[Any], Any] = lambda v: v
    doc: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise FieldValueError("must be a number, not a boolean")
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-8 (no dot) as a string
        except ValueError:
            raise FieldValueError("must be a number") from None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range
            raise FieldValueError("must be a number within the float range") from None
    raise FieldValueError(f"must be a number, got {type(value).__name__}")


def as_float(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
) -> Callable[[Any], float]:
    """Converter to a float within ``[lo, hi]`` (``lo_open``/``hi_open``: strict bound).

    NaN is never allowed, infinity only with ``allow_inf`` (no recipe field has a use for it:
    ``start_epoch: .inf`` would silently never start).
    """
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    if lo is not None and hi is not None:
        rng = f"in {left}{lo}, {hi}{right}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        rng = f"{'<' if hi_open else '<='} {hi}"
    else:
        rng = ""

    def convert(value: Any) -> float:
        x = _number(value)
        if math.isnan(x) or (math.isinf(x) and not allow_inf):
            raise FieldValueError(f"must be a finite number {rng}".rstrip())
        bad_lo = lo is not None and (x < lo or (lo_open and x == lo))
        bad_hi = hi is not None and (x > hi or (hi_open and x == hi))
        if bad_lo or bad_hi:
            raise FieldValueError(f"must be a number {rng}")
        return x

    return convert


def as_int(lo: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        x = _number(value)
        if not float(x).is_integer():
            raise FieldValueError("must be an integer")
        if lo is not None and x < lo:
            raise FieldValueError(f"must be an integer >= {lo}")
        return int(x)

    return convert


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise FieldValueError("must be true or false")


def one_of(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise FieldValueError(f"must be one of {', '.join(choices)}")
        return value

    return convert


def optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else inner(value)


def as_dict(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldValueError("must be a mapping")
    return dict(value)


def as_str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise FieldValueError("must be a list of strings")


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise FieldValueError("must be a string")
    return value


@dataclass(frozen=True)
class Check:
    """A declared relation between fields: when ``broken(model)`` is true, validation fails on
    ``field`` with ``message`` (a text, or a function of the model giving one).

    Classes declare them in ``CHECKS``; a subclass's checks run after its bases' (inherited
    ones are kept), so the most general rule reports first.
    """

    field: str
    broken: Callable[[Any], bool]
    message: str | Callable[[Any], str]


class FieldModel:
    """Base for objects whose constructor keywords are declared ``Field``s.

    Unknown keywords raise ``RecipeError`` naming the closest field names; every value passes
    through its field's converter, also when set later as an attribute; ``validate()`` checks
    relations between fields after construction and again before use.
    """

    FIELDS: dict[str, Field] = {}
    DROPPED_KEYS: tuple[str, ...] = ("log_types",)  # legacy keys accepted and ignored
    # Inherited fields this class does not have (e.g. a Fisher block size of a pruner that
    # builds no blocks): giving one is then an unknown-field error, not a silent no-op.
    WITHOUT_FIELDS: tuple[str, ...] = ()
    CHECKS: tuple[Check, ...] = ()
    fields: dict[str, Field] = {}
    checks: tuple[Check, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        merged: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            merged.update(getattr(base, "fields", {}))
        merged.update(cls.__dict__.get("FIELDS", {}))
        for name in cls.__dict__.get("WITHOUT_FIELDS", ()):
            merged.pop(name, None)
        cls.fields = merged
        checks: list[Check] = []
        for base in reversed(cls.__mro__):
            checks += [c for c in base.__dict__.get("CHECKS", ()) if c not in checks]
        cls.checks = tuple(checks)

    def __init__(self, **kwargs: Any) -> None:
        object.__setattr__(self, "_values", {})
        values = self._canonical_kwargs(kwargs)
        # Given values are checked first: a wrong value is the more specific error.
        for name, field in self.fields.items():
            if name in values or not field.required:
                self._values[name] = self._convert(name, values.get(name, field.default))
        missing = [name for name, field in self.fields.items() if name not in self._values]
        if missing:
            raise RecipeError(f"{type(self).__name__}: required field {missing[0]!r} is missing")
        object.__setattr__(self, "_values", {n: self._values[n] for n in self.fields})
        self.validate()

    @classmethod
    def required_fields(cls) -> list[str]:
        """Names of the fields that have no default."""
        return [name for name, field in cls.fields.items() if field.required]

    @classmethod
    def _canonical_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        from sparseml.errors import close_matches

        aliases = {a: n for n, f in cls.fields.items() for a in f.aliases}
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in cls.DROPPED_KEYS:
                continue
            name = aliases.get(key, key)
            if name not in cls.fields:
                allowed = ", ".join(sorted(cls.fields))
                hint = close_matches(key, cls.fields) if isinstance(key, str) else ""
                raise RecipeError(
                    f"{cls.__name__}: unknown field {brief(key)}{hint}; allowed fields: {allowed}"
                )
            if name in out:
                raise RecipeError(
                    f"{cls.__name__}: field {name!r} is given twice (via {brief(key)})"
                )
            out[name] = value
        return out

    def _convert(self, name: str, value: Any) -> Any:
        if value is REQUIRED:
            raise RecipeError(f"{type(self).__name__}: required field {name!r} is missing")
        try:
            return self.fields[name].convert(value)
        except FieldValueError as err:
            raise RecipeError(
                f"{type(self).__name__}: field {name!r} = {brief(value)} {err}"
            ) from None

    def validate(self) -> None:
        """Check the declared relations between fields (``CHECKS``); raise ``RecipeError``
        naming the first one broken."""
        for check in self.checks:
            if check.field in self._values and check.broken(self):
                text = check.message if isinstance(check.message, str) else check.message(self)
                raise self.field_error(check.field, text)

    def field_error(self, name: str, message: str) -> RecipeError:
        return RecipeError(
            f"{type(self).__name__}: field {name!r} = {brief(self._values.get(name))} {message}"
        )

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # Assignments are converted (and range-checked) at once; relations between fields are
        # checked again when the object is used, so fields may be set in any order
        # (e.g. init_sparsity before final_sparsity).
        if name in self.fields:
            self._values[name] = self._convert(name, value)
        else:
            object.__setattr__(self, name, value)

    def field_values(self) -> dict[str, Any]:
        return dict(self._values)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._values == other._values  # type: ignore[attr-defined]

    __hash__ = object.__hash__
