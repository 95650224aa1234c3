"""fastewc: fast, exact Elastic Weight Consolidation for PyTorch."""

from . import reference
from .compat import EWCTrainer, FisherInformation, compute_fisher, compute_true_fisher
from .errors import EWCInputError, ModelMismatchError
from .fisher import FisherReport, estimate_fisher, register_rule
from .penalty import EWCRegularizer, FlatPacking, OnlineEWC, load_regularizer, save_regularizer
from .workflow import consolidate

__version__ = "0.1.0"

__all__ = [
    "EWCRegularizer", "OnlineEWC", "FlatPacking", "reference", "consolidate", "FisherReport",
    "estimate_fisher", "register_rule", "compute_fisher", "compute_true_fisher", "FisherInformation", "EWCTrainer",
    "EWCInputError", "ModelMismatchError", "save_regularizer", "load_regularizer", "__version__",
]
