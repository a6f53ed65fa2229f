"""The mark of tests that need modelcode's CPU kernels: skipped, with the reason, where they are not used."""

import pytest

from modelcode.kernels.cpu import kernels_available, why_unavailable

KERNELS = pytest.mark.skipif(not kernels_available(), reason=f"modelcode's CPU kernels are not used here: "
                                                             f"{why_unavailable()}")
