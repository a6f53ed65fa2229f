"""Every run ends by saying whether modelcode's CPU kernels ran here, and if not why, since a whole set of tests
skips without them. Quantized layers stay quantized whatever this machine's timing says
(`quantization/host.py`), so that the tests of them do not depend on the CPU; test_host.py tests the choice."""

import os
import tempfile

from modelcode.kernels.cpu import loaded_build, why_unavailable

os.environ["MODELCODE_KEEP_QUANTIZED"] = "1"
# Compiled steps saved per machine (generation/aot.py) go to a folder of this run's own: none from outside is loaded.
os.environ["MODELCODE_CACHE"] = tempfile.mkdtemp(prefix="modelcode-test-cache-")
# ... and none is compiled behind a test's back (test_aot.py turns this on where it tests it).
os.environ["MODELCODE_BACKGROUND_BUILD"] = "0"


def pytest_terminal_summary(terminalreporter):
    build = loaded_build()
    used = f"used ({build.label} build)" if build else f"not used ({why_unavailable()})"
    terminalreporter.write_line(f"modelcode's CPU kernels: {used}")
