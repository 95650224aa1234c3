"""Triton kernels of fastewc (installed as ``fastewc.kernels``): only ``@triton.jit`` code and
its launch heuristics live here; the launchers and the backend choice live in
``fastewc.penalty.backends`` (see ``docs/design.md``, "One op, four layers")."""
