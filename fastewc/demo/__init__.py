"""``fastewc demo``: continual learning on scikit-learn's bundled handwritten digits (offline).

``data`` builds the task sequences (Permuted-Digits, Split-Digits), ``metrics`` the accuracy
matrix summaries, ``run`` trains the methods and reports; ``plot`` draws the figure.
"""

from .metrics import average_accuracy, average_forgetting
from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo", "average_accuracy", "average_forgetting"]
