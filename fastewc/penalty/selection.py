"""Which parameters are protected, and how strongly: globs over parameter names.

``include`` / ``exclude`` select parameters; ``layer_lambdas`` maps a glob to a multiplier of
``lambda_ewc``. Both fold into one per-parameter scale at registration, so a step costs nothing
extra for them.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..errors import EWCInputError


def _globs(value, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # a lone glob, not an iterable of characters
        return (value,)
    try:
        globs = tuple(value)
    except TypeError:
        raise EWCInputError(f"{what} must be a glob or a list of globs, got {type(value).__name__}") from None
    for g in globs:
        if not isinstance(g, str):
            raise EWCInputError(f"{what} must contain glob strings, got {g!r} ({type(g).__name__})")
    return globs


@dataclass(frozen=True)
class ParamSelection:
    """Validated ``include``/``exclude``/``layer_lambdas`` settings.

    ``scale(name)``: 0.0 when the name is not selected (not matched by any ``include`` glob when
    ``include`` is given, or matched by an ``exclude`` glob); otherwise the multiplier of the
    first ``layer_lambdas`` glob (in dict order) that matches, or 1.0. Globs use
    ``fnmatch.fnmatchcase`` (``*`` also crosses dots: ``"encoder.*"`` matches
    ``"encoder.layer.0.weight"``).
    """

    layer_lambdas: tuple[tuple[str, float], ...] = ()
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, layer_lambdas: Mapping[str, float] | None = None,
              include: Iterable[str] | str | None = None,
              exclude: Iterable[str] | str | None = None) -> "ParamSelection":
        pairs = []
        if layer_lambdas is not None:
            if not isinstance(layer_lambdas, Mapping):
                raise EWCInputError(
                    f"layer_lambdas must be a dict glob -> multiplier, got {type(layer_lambdas).__name__}")
            for glob, mult in layer_lambdas.items():
                if not isinstance(glob, str):
                    raise EWCInputError(f"layer_lambdas keys must be glob strings, got {glob!r}")
                if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 0:
                    raise EWCInputError(
                        f"layer_lambdas[{glob!r}] must be a finite number >= 0, got {mult!r}")
                pairs.append((glob, float(mult)))
        return cls(tuple(pairs), _globs(include, "include"), _globs(exclude, "exclude"))

    def scale(self, name: str) -> float:
        hit = self._cache.get(name)
        if hit is None:
            hit = self._cache[name] = self._scale(name)
        return hit

    def _scale(self, name: str) -> float:
        if self.include is not None and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return 0.0
        if self.exclude is not None and any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return 0.0
        for glob, mult in self.layer_lambdas:
            if fnmatch.fnmatchcase(name, glob):
                return mult
        return 1.0

    def to_config(self) -> dict:
        return {
            "layer_lambdas": dict(self.layer_lambdas) or None,
            "include": list(self.include) if self.include is not None else None,
            "exclude": list(self.exclude) if self.exclude is not None else None,
        }
