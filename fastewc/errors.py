"""Exceptions raised by fastewc. Each message names the parameter and what was expected."""


class EWCInputError(ValueError):
    """An argument (Fisher, anchors, a setting) is not what fastewc accepts."""


class ModelMismatchError(EWCInputError):
    """The model no longer matches what the regularizer was registered or bound with."""


class UntrackableParameters(EWCInputError):
    """``FisherTracker`` cannot read these parameters' per-sample gradients from the training step
    (``params``: their names, as ``model.named_parameters()`` gives them; ``reason``: why). The
    others can be tracked with ``params=`` leaving these out; ``fastewc.check_tracking`` finds
    every such parameter of a model on one step."""

    def __init__(self, message: str, params):
        super().__init__(f"{message}. fastewc.check_tracking(model, step) finds every parameter to leave out in "
                         f"one call")
        self.params, self.reason = tuple(params), message
