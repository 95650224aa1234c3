"""fastewc: fast, exact Elastic Weight Consolidation for PyTorch."""

from . import reference
from .errors import EWCInputError, ModelMismatchError
from .fisher import FisherInformation, compute_fisher, compute_true_fisher, estimate_fisher
from .packing import FlatPacking
from .regularizer import EWCRegularizer, OnlineEWC
from .saving import load_regularizer, save_regularizer
from .trainer import EWCTrainer

__version__ = "0.1.0"

__all__ = [
    "EWCRegularizer", "OnlineEWC", "FlatPacking", "reference",
    "estimate_fisher", "compute_fisher", "compute_true_fisher", "FisherInformation", "EWCTrainer",
    "EWCInputError", "ModelMismatchError", "save_regularizer", "load_regularizer", "__version__",
]
