"""Triton kernels of the fused EKD backend (private; ``ekd_kernels.triton_ekd`` is the entry point).

The kernels live in ``kernels.py``, imported on the first call only: ``@triton.jit`` decides
at definition time whether a kernel runs natively or under the interpreter
(``TRITON_INTERPRET=1``), so defining them lazily lets the environment variable be set any
time before the first call.
"""
