"""The mark of tests that need modelcode's CPU kernels: skipped, with the reason, where they are not used."""

import pytest

from modelcode.kernels.cpu import attention_kernel_available, kernels_available, loaded_build, why_unavailable

KERNELS = pytest.mark.skipif(not kernels_available(), reason=f"modelcode's CPU kernels are not used here: "
                                                             f"{why_unavailable()}")
ATTENTION_KERNEL = pytest.mark.skipif(not attention_kernel_available(),
                                      reason="modelcode's decode-attention kernel is not used here: "
                                             f"{why_unavailable() or f'the {loaded_build().label} build has none'}")
