"""Package discovery (the metadata is in pyproject.toml).

Every package under ``fastewc/`` is found, none listed by hand; ``fastewc/kernels/`` ships its C
source (the fused CPU kernel, compiled on the user's machine at first use) as package data.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastewc", "fastewc.*"]),
    package_data={"fastewc.kernels": ["*.c"]},
)
