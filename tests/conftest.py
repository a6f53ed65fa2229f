"""What every run's header says: whether modelcode's CPU kernels run here, and if not why, since a whole set
of tests skips without them."""

from modelcode.kernels.cpu import kernels_available, why_unavailable


def pytest_report_header(config):
    return "modelcode CPU kernels: " + ("built" if kernels_available() else f"not used ({why_unavailable()})")
