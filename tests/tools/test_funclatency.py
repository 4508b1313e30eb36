"""tools/bcc_ports/funclatency.py against Debian's funclatency-bpfcc on one workload process: the same
counts (exactly the calls the workload made), the same histogram layout; kernel mode, -F, -l, errors."""

from __future__ import annotations

import io
import os
import random
import re
from contextlib import redirect_stdout

import pytest

from tests.tools import (FUNCLATENCY_BCC, Workload, build_workload, check_hist_layout, have, hist_lines, port,
                         run_tool, trace_round)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="probes in other processes and kernel uprobes need root")

N = 20000  # work() calls; a kernel uprobe + uretprobe costs ~20 us here
AVG = re.compile(r"^avg = \d+ (nsecs|usecs|msecs), total: \d+ \1, count: (\d+)$", re.M)


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_workload(tmp_path_factory.mktemp("funclatency"))


@pytest.fixture
def workload(exe):
    w = Workload(exe)
    yield w
    w.close()


def sections(out: str) -> dict[str, list[str]]:
    """-F output: "Function = name [pid]" -> its histogram lines."""
    found: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("Function = "):
            current = line
            found[current] = []
        elif current is not None and (line.startswith("     ") and "distribution" in line or hist_lines(line)):
            found[current].append(line)
    return found


def test_same_counts_and_layout_as_bcc(exe, workload):
    """bcc, then the port (user mode, probes in the process), on two rounds of the same process."""
    if not have(FUNCLATENCY_BCC):
        pytest.skip("Debian's bcc tools are not installed")
    pattern = "%s:work" % exe
    outputs = {}
    for name, argv in (("bcc", [FUNCLATENCY_BCC, "-p", str(workload.pid), pattern]),
                       ("port", port("funclatency") + ["-p", str(workload.pid), pattern])):
        rc, out, err = trace_round(argv, workload, work=N)
        assert rc == 0, (name, out, err)
        outputs[name] = out
    for name, out in outputs.items():
        lines = out.splitlines()
        assert lines[0] == 'Tracing 1 functions for "%s"... Hit Ctrl-C to end.' % pattern, (name, out)
        assert "     nsecs               : count     distribution" in lines, (name, out)
        assert lines[-1] == "Detaching...", (name, out)
        rows = check_hist_layout(hist_lines(out))
        assert rows[0][:2] == (0, 1)
        assert sum(r[2] for r in rows) == N, (name, out)
        m = AVG.search(out)
        assert m and int(m.group(2)) == N, (name, out)
    # bucket boundaries are the same as far as both go
    bcc_rows = check_hist_layout(hist_lines(outputs["bcc"]))
    port_rows = check_hist_layout(hist_lines(outputs["port"]))
    assert [r[:2] for r in bcc_rows[:len(port_rows)]] == [r[:2] for r in port_rows[:len(bcc_rows)]]
    # the same lines around the histogram: blank line, header, ..., blank, avg, blank, Detaching...
    shape = [re.sub(r"\d+", "N", line) for line in outputs["port"].splitlines() if not hist_lines(line)]
    bcc_shape = [re.sub(r"\d+", "N", line) for line in outputs["bcc"].splitlines() if not hist_lines(line)]
    assert shape == bcc_shape


def test_per_function_histograms_like_bcc(exe, workload):
    """-F -u with a wildcard: one section per function, "Function = work [PID]", exact counts."""
    if not have(FUNCLATENCY_BCC):
        pytest.skip("Debian's bcc tools are not installed")
    pattern = "%s:work*" % exe
    for name, argv in (("bcc", [FUNCLATENCY_BCC, "-F", "-u", "-p", str(workload.pid), pattern]),
                       ("port", port("funclatency") + ["-F", "-u", "-p", str(workload.pid), pattern])):
        rc, out, err = trace_round(argv, workload, work=3000, work2=2000)
        assert rc == 0, (name, out, err)
        assert out.splitlines()[0] == 'Tracing 2 functions for "%s"... Hit Ctrl-C to end.' % pattern
        secs = sections(out)
        assert set(secs) == {"Function = work [%d]" % workload.pid, "Function = work2 [%d]" % workload.pid}, out
        for title, expected in (("work", 3000), ("work2", 2000)):
            lines = secs["Function = %s [%d]" % (title, workload.pid)]
            assert lines[0] == "     usecs               : count     distribution"
            assert sum(r[2] for r in check_hist_layout(lines[1:])) == expected, (name, out)
        assert int(AVG.search(out).group(2)) == 5000


@pytest.mark.parametrize("how", ["pid", "command"])
def test_kernel_mode_same_counts(exe, workload, how):
    """--mode kernel: the same object as kernel uprobes, for -p PID and for a started command."""
    pattern = "%s:work" % exe
    if how == "pid":
        rc, out, err = trace_round(port("funclatency") + ["--mode", "kernel", "-p", str(workload.pid), pattern],
                                   workload, settle=0, work=5000)
    else:
        rc, out, err = run_tool(port("funclatency") + ["--mode", "kernel", pattern, "--", exe],
                                stdin="5000 0 0 0 0 0\nq\n")
    assert rc == 0, (out, err)
    assert int(AVG.search(out).group(2)) == 5000, out
    assert sum(r[2] for r in check_hist_layout(hist_lines(out))) == 5000


def test_command_in_user_mode_and_levels(exe):
    """A started command (probes in place before main); nest(4) x 100: innermost calls only by default,
    the outermost LEVEL levels with -l LEVEL (per thread, as bcc's stack)."""
    for level, expected in ((None, 100), (2, 200), (4, 400), (8, 400)):
        argv = port("funclatency") + (["-l", str(level)] if level else []) + ["%s:nest" % exe, "--", exe]
        rc, out, err = run_tool(argv, stdin="0 0 100 4 0 0\nq\n")
        assert rc == 0, (out, err)
        assert int(AVG.search(out).group(2)) == expected, (level, out)


def test_system_wide_is_kernel_and_keyed(exe, workload):
    """No -p: every process, in the kernel; a histogram per function and process, as bcc prints it."""
    rc, out, err = trace_round(port("funclatency") + ["-m", "%s:work2" % exe], workload, work2=1000)
    assert rc == 0, (out, err)
    secs = sections(out)
    lines = secs["Function = work2 [%d]" % workload.pid]
    assert lines[0] == "     msecs               : count     distribution"
    assert sum(r[2] for r in check_hist_layout(lines[1:])) == 1000


def test_ebpf_prints_the_program(exe):
    rc, out, err = run_tool(port("funclatency") + ["--ebpf", "%s:work*" % exe])
    assert rc == 0, err
    assert '#include "vmlinux.h"' in out and 'SEC("uretprobe/" target)' in out
    assert 'FUNC_PROBE(0, "%s:work")' % os.path.realpath(exe) in out
    assert 'FUNC_PROBE(1, "%s:work2")' % os.path.realpath(exe) in out


def test_errors_are_one_line(exe, workload):
    rc, out, err = run_tool(port("funclatency") + ["-p", "999999", "c:malloc"])
    assert (rc, out, err.strip()) == (1, "", "Error: no process with PID 999999")
    rc, out, err = run_tool(port("funclatency") + ["-p", str(workload.pid), "%s:no_such_function" % exe])
    assert (rc, out) == (1, "")
    assert err.strip() == '0 functions matched by "%s:no_such_function". Exiting.' % exe
    rc, out, err = run_tool(port("funclatency") + ["-p", str(workload.pid), "no_such_library:f"])
    assert (rc, err.strip()) == (1, "Error: can't resolve library no_such_library")
    from hybrid.kernel import features

    if not features.has("kprobes"):  # a kernel function: kprobes, which this kernel lacks
        rc, out, err = run_tool(port("funclatency") + ["vfs_read"])
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "no kprobes" in err, err


def test_print_log2_hist_is_bccs():
    """common.print_log2_hist prints exactly what bcc's table.print_log2_hist prints."""
    bcc_table = pytest.importorskip("bcc.table")
    from tools.bcc_ports.common import print_log2_hist

    rnd = random.Random(7)
    for trial in range(40):
        vals = [0] * 65
        top = rnd.choice([3, 10, 20, 33, 40, 64])
        for i in range(1, top + 1):
            vals[i] = rnd.choice([0, 0, 1, 7, 100, 12345, 10 ** 7])
        strip = rnd.choice([None, False, True])
        want, got = io.StringIO(), io.StringIO()
        with redirect_stdout(want):
            bcc_table._print_log2_hist(vals, "usecs", strip)
        print_log2_hist(vals, "usecs", strip_leading_zero=strip, file=got)
        assert got.getvalue() == want.getvalue(), trial
    # sections, as bcc's print_log2_hist of a table with a struct key prints them
    got = io.StringIO()
    print_log2_hist({(("f", 1), 3): 5, (("g", 2), 1): 2}, "nsecs", "Function",
                    section_print_fn=lambda b: "%s [%d]" % b, bucket_sort_fn=sorted, file=got)
    assert got.getvalue().splitlines()[:3] == ["", "Function = f [1]",
                                               "     nsecs               : count     distribution"]
