"""Native code compiled on the user's machine: the fused CPU kernel's shared library.

``build.py`` compiles a C source into a verified cache (where, with which compiler, under an OS
file lock, checked before every load, failures remembered); ``quadratic.py`` builds and loads the
kernel of ``fastewc/kernels/quadratic_cpu.c`` and declares its functions for ctypes. The launcher
that calls it is ``fastewc.penalty.backends.cpu_backend``.
"""
