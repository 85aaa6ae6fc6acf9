"""A stand-in for Triton's active CUDA driver on a machine without a GPU: it reports an H100
(sm_90) so that launches compile for it with Triton's bundled ptxas, while no kernel runs.  Used
by tools/host_cost.py and by test_every_launch_compiles_for_sm90 (python_tests/test_triton.py)."""
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class Sm90WithoutGpu:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def install():
    """Make the stand-in Triton's active driver (before any launch)."""
    driver.set_active(Sm90WithoutGpu())
