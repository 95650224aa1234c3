"""fastewc: fast, exact Elastic Weight Consolidation for PyTorch."""

from . import reference
from .errors import EWCInputError, ModelMismatchError

__version__ = "0.1.0"

__all__ = ["reference", "EWCInputError", "ModelMismatchError", "__version__"]
