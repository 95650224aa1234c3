"""Kernels of fastewc (installed as ``fastewc.kernels``): the ``@triton.jit`` code and its launch
heuristics (``ewc_penalty.py``), the C source of the fused CPU kernel (``quadratic_cpu.c``) and
the C++ source of the per-step host helpers (``host_cpu.cpp``), both compiled on the user's
machine at first use. The launchers and the backend choice live in
``fastewc.penalty.backends`` (see ``docs/design.md``, "One op, four layers")."""
