"""fastewc: fast, exact Elastic Weight Consolidation for PyTorch."""

from . import reference
from .errors import EWCInputError, ModelMismatchError
from .packing import FlatPacking
from .regularizer import EWCRegularizer, OnlineEWC
from .saving import load_regularizer, save_regularizer

__version__ = "0.1.0"

__all__ = [
    "EWCRegularizer", "OnlineEWC", "FlatPacking", "reference",
    "EWCInputError", "ModelMismatchError", "save_regularizer", "load_regularizer", "__version__",
]
