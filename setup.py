"""Build of ekd_kernels (metadata lives in pyproject.toml).

The Python package is always installed.  The compiled C++ (CPU) and CUDA ops come from csrc/.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["ekd_kernels", "ekd_kernels.*"]))
