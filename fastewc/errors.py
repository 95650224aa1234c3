"""Exceptions raised by fastewc. Each message names the parameter and what was expected."""


class EWCInputError(ValueError):
    """An argument (Fisher, anchors, a setting) is not what fastewc accepts."""


class ModelMismatchError(EWCInputError):
    """The model no longer matches what the regularizer was registered or bound with."""
