"""The clock helpers of hybrid/native/runtime.c: bpf_ktime_get_ns and bpf_ktime_get_boot_ns read
the kernel's timekeeping data ([vvar]) with rdtsc when the TSC is the clocksource, and must
still be the kernel's CLOCK_MONOTONIC / CLOCK_BOOTTIME, in every process and thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

_native = pytest.importorskip("hybrid._native")
lib = _native.lib

ROOT = Path(__file__).resolve().parents[2]
CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
VVAR, VDSO = 1, 2  # hybrid_clock_source()


def ktime() -> int:
    return lib.hybrid_helper_ktime_get_ns(0, 0, 0, 0, 0)


def boot() -> int:
    return lib.hybrid_helper_ktime_get_boot_ns(0, 0, 0, 0, 0)


def clocksource() -> str:
    try:
        return CLOCKSOURCE.read_text().strip()
    except OSError:
        return "?"


def test_the_tsc_clocksource_is_read_without_the_vdso():
    if clocksource() != "tsc":
        pytest.skip("the clocksource is %s, not tsc: clock_gettime() is the right way" % clocksource())
    assert lib.hybrid_clock_source() == VVAR


@pytest.mark.parametrize("helper, clock", [(ktime, time.CLOCK_MONOTONIC), (boot, time.CLOCK_BOOTTIME)],
                         ids=["ktime_get_ns", "ktime_get_boot_ns"])
def test_every_reading_lies_between_two_of_the_kernels(helper, clock):
    for _ in range(20000):
        lo = time.clock_gettime_ns(clock)
        x = helper()
        hi = time.clock_gettime_ns(clock)
        assert lo <= x <= hi


def test_readings_never_go_back_on_any_thread():
    errors: list[str] = []

    def run(n: int) -> None:
        prev = ktime()
        for i in range(n):
            x = ktime()
            if x < prev:
                errors.append("%d: %d < %d" % (i, x, prev))
                return
            prev = x

    threads = [threading.Thread(target=run, args=(100000,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_time_namespace_falls_back_to_clock_gettime():
    """A process in a time namespace has its namespace's page where the clock data was: the helpers
    notice (the page's clock mode) and give that namespace's clock_gettime(), never a hang or a
    wrong clock."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not os.path.exists("/proc/self/ns/time"):
        pytest.skip("needs root, unshare(1) and time namespaces")
    code = (
        "import time\n"
        "from hybrid import _native\n"
        "lib = _native.lib\n"
        "lo = time.clock_gettime_ns(time.CLOCK_MONOTONIC)\n"
        "x = lib.hybrid_helper_ktime_get_ns(0, 0, 0, 0, 0)\n"
        "hi = time.clock_gettime_ns(time.CLOCK_MONOTONIC)\n"
        "print(lib.hybrid_clock_source(), lo <= x <= hi, lo)\n"
    )
    offset = 1000000  # seconds: the namespace's monotonic clock is 11.6 days ahead
    r = subprocess.run(["unshare", "--time", "--monotonic", str(offset), "--fork", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode and "unshare failed" in r.stderr:
        pytest.skip("no time namespaces here: " + r.stderr.strip())
    assert r.returncode == 0, r.stderr
    source, between, lo = r.stdout.split()
    assert source == str(VDSO) and between == "True"
    assert int(lo) > time.clock_gettime_ns(time.CLOCK_MONOTONIC) + (offset - 10) * 10**9
