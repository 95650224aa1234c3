"""Lazy imports of optional dependencies, with the extra to install named in the error."""

from __future__ import annotations

import importlib


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def require(module: str, *, extra: str, package: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install 'fastewc[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{pkg} is needed for this feature but is not installed: pip install 'fastewc[{extra}]' "
            f"(or pip install {pkg})"
        ) from e
