"""Where the GPU tests run: on CUDA, or on the CPU when RAYMOE_GPU_TEST_ON_CPU=1.

The switch is for checking a GPU test's logic by hand on a machine without a GPU (gloo in place
of NCCL, the CPU's bf16 autocast in place of CUDA's). CI never sets it, so there the GPU tests
skip. Nothing here touches CUDA beyond asking whether it is there.
"""

import os

import pytest
import torch

ON_CPU = os.environ.get("RAYMOE_GPU_TEST_ON_CPU") == "1"

DEVICE_TYPE = "cpu" if ON_CPU else "cuda"

requires_cuda = pytest.mark.skipif(
    not ON_CPU and not torch.cuda.is_available(),
    reason="needs CUDA (RAYMOE_GPU_TEST_ON_CPU=1 runs the test logic on the CPU instead)",
)
