"""Triton kernels of fastewc (installed as ``fastewc.kernels``): only ``@triton.jit`` code and
its launch heuristics live here; launchers and dispatch live in ``fastewc``."""
