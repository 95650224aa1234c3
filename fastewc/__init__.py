"""fastewc: fast, exact Elastic Weight Consolidation for PyTorch."""

from . import reference
from .compat import EWCTrainer, FisherInformation, compute_fisher, compute_true_fisher
from .errors import EWCInputError, ModelMismatchError, UntrackableParameters
from .fisher import FisherReport, FisherTracker, TrackingCheck, check_tracking, estimate_fisher, register_rule
from .fisher.files import FisherDict, load_fisher, save_fisher
from .merge import MergeReport, fisher_merge, fisher_merge_files
from .penalty import EWCRegularizer, OnlineEWC, load_regularizer, save_regularizer
from .streaming import StreamingEWC
from .workflow import consolidate

__version__ = "0.1.0"

__all__ = [
    "EWCRegularizer", "OnlineEWC", "reference", "consolidate", "FisherReport", "FisherTracker", "check_tracking",
    "TrackingCheck", "estimate_fisher", "register_rule", "compute_fisher", "compute_true_fisher",
    "FisherInformation", "EWCTrainer", "EWCInputError", "ModelMismatchError", "UntrackableParameters",
    "save_regularizer", "load_regularizer", "save_fisher", "load_fisher", "FisherDict", "fisher_merge",
    "fisher_merge_files", "MergeReport", "StreamingEWC", "__version__",
]
