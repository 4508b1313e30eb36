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
CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; not in the time module


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


def in_time_namespace(code: str, *offsets: str, env: dict | None = None) -> list[str]:
    """stdout words of ``python -c code`` run in a new time namespace (unshare --time OFFSETS)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not os.path.exists("/proc/self/ns/time"):
        pytest.skip("needs root, unshare(1) and time namespaces")
    r = subprocess.run(["unshare", "--time", *offsets, "--fork", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if r.returncode and "unshare failed" in r.stderr:
        pytest.skip("no time namespaces here: " + r.stderr.strip())
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


NS_CODE = (
    "import time\n"
    "from hybrid import _native\n"
    "lib = _native.lib\n"
    "print(lib.hybrid_clock_source(), time.clock_gettime_ns(time.CLOCK_MONOTONIC),\n"
    "      lib.hybrid_helper_ktime_get_ns(0, 0, 0, 0, 0), lib.hybrid_helper_ktime_get_boot_ns(0, 0, 0, 0, 0),\n"
    "      lib.hybrid_helper_ktime_get_coarse_ns(0, 0, 0, 0, 0))\n"
)


@pytest.mark.parametrize("clock", ["default", "vdso"])
def test_a_time_namespace_does_not_move_the_clocks(clock):
    """The kernel's bpf_ktime_get_ns ignores time namespaces (it is the host's clock in every task),
    and so do the helpers: in a namespace whose monotonic clock is 11.6 days ahead and boot clock 5.8, they
    still read the host's clocks, through the kernel's data page that follows the namespace's."""
    offset = 1000000  # seconds
    before = [time.clock_gettime_ns(c) for c in (time.CLOCK_MONOTONIC, time.CLOCK_BOOTTIME)]
    coarse_before = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    source, ns_mono, ktime_, boot_, coarse = (int(w) for w in in_time_namespace(
        NS_CODE, "--monotonic", str(offset), "--boottime", str(offset // 2),
        env={"HYBRID_CLOCK": clock} if clock == "vdso" else None))
    after = [time.clock_gettime_ns(c) for c in (time.CLOCK_MONOTONIC, time.CLOCK_BOOTTIME)]
    coarse_after = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    assert ns_mono > after[0] + (offset - 10) * 10**9  # the namespace's own clock is ahead
    assert before[0] <= ktime_ <= after[0]
    assert before[1] <= boot_ <= after[1]
    assert coarse_before <= coarse <= coarse_after
    if clock == "vdso":
        assert source == VDSO  # clock_gettime() less the namespace's offsets
    elif clocksource() == "tsc":
        assert source == VVAR  # the kernel's page after the namespace's
