"""The penalty's native code: the fused CPU kernel's shared library.

``quadratic.py`` builds and loads the kernel of ``fastewc/kernels/quadratic_cpu.c`` (through
``fastewc.native``'s verified cache) and declares its functions for ctypes. The launcher that
calls it is ``fastewc.penalty.backends.cpu_backend``.
"""
