"""Kernels of fastewc: the ``@triton.jit`` code and its launch heuristics (``ewc_penalty.py``)
and the C source of the fused CPU kernel (``quadratic_cpu.c``, compiled on the user's machine at
first use). The launchers and the backend choice live in
``fastewc.penalty.backends`` (see ``docs/design.md``, "One op, four layers")."""
