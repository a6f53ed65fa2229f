"""Every run ends by saying whether modelcode's CPU kernels ran here, and if not why, since a whole set of tests
skips without them."""

from modelcode.kernels.cpu import kernels_available, why_unavailable


def pytest_terminal_summary(terminalreporter):
    used = "used" if kernels_available() else f"not used ({why_unavailable()})"
    terminalreporter.write_line(f"modelcode's CPU kernels: {used}")
