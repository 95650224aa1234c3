"""Native code compiled on the user's machine, for both halves of the package.

``build.py`` compiles a C source into a verified cache (where, with which compiler, under an OS
file lock, checked before every load, failures remembered); ``library.py`` builds one of the C
sources shipped in ``fastewc/kernels/`` for this machine, loads it and has its functions
declared. Each kernel's own module says what it declares and how it is called:
``fastewc.penalty.native.quadratic`` (the penalty) and ``fastewc.fisher.rules.outer_cpu`` (the
Fisher's per-sample squares). This package imports nothing from either half.
"""
