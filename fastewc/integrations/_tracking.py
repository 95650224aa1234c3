"""The ``track_fisher=`` option the training-loop integrations share."""

from __future__ import annotations

from ..errors import EWCInputError


def tracker_options(track_fisher, owned: tuple[str, ...]) -> dict | None:
    """``track_fisher`` (False, True, or a dict of :class:`~fastewc.FisherTracker` keyword
    arguments) as the tracker's keyword arguments; None when off. ``owned``: the arguments the
    integration reads from the training loop's own settings, so a user value would contradict them."""
    if track_fisher is False or track_fisher is None:
        return None
    if track_fisher is True:
        return {}
    if not isinstance(track_fisher, dict):
        raise EWCInputError(f"track_fisher must be a bool or a dict of FisherTracker keyword arguments; got "
                            f"{type(track_fisher).__name__}")
    clash = sorted(set(track_fisher) & set(owned))
    if clash:
        raise EWCInputError(f"track_fisher: {clash} are read from the training loop itself; leave them out")
    return dict(track_fisher)
