"""Package discovery (the metadata is in pyproject.toml).

Every package under ``fastewc/`` is found, none listed by hand; the top-level ``kernels/`` folder
(the ``@triton.jit`` code and the C source of the fused CPU kernel, compiled on the user's machine
at first use) installs as ``fastewc.kernels``.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastewc", "fastewc.*"]) + ["fastewc.kernels"],
    package_dir={"fastewc.kernels": "kernels"},
    package_data={"fastewc.kernels": ["*.c", "*.cpp"]},
)
