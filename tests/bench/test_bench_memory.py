"""The memory benchmark (bench/bench_memory.py, bench/programs/memvictim.c and memory.bpf.c).

The victim and both builds of the programs are compiled for real (cached in
bench/build/ like the suite's own runs): the victim must start with its
5-byte nop, each program must read or write exactly the words it says on
hybrid's side and, as root, the kernel's read programs must too; the kernel's
write programs either do the same or are refused by the kernel with the
verifier's words.  The slow test runs ``bench/bench_memory.py --quick``
end to end and checks its rows.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import bench_memory as bm  # noqa: E402
import probe_programs as pp  # noqa: E402

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel side needs root (bpf, uprobes)")

ROWS = ("probe_read_user ×1", "probe_read_user ×1000", "probe_write_user ×1", "probe_write_user ×1000")
CALLS = 300


def need_tools() -> None:
    missing = [t for t in (pp.GCC, pp.CLANG) if shutil.which(t) is None]
    if pp._tool(pp.BPFTOOL) is None:
        missing.append(pp.BPFTOOL)
    if missing:
        pytest.skip("%s not installed: cannot build the memory benchmark" % ", ".join(missing))
    if not pp.KERNEL_BTF.exists():
        pytest.skip("%s not found: cannot generate vmlinux.h" % pp.KERNEL_BTF)


@pytest.fixture(scope="module")
def art() -> bm.Artifacts:
    need_tools()
    return bm.build()


def start(k: int) -> int:
    return 3 * k + 7  # buf[k] before any write (bm.initial), spelled out


def expect_work(probe: bm.MemProbe, victim: bm.Victim, program: str, n: int) -> None:
    """Run n calls with ``program`` attached and check, by hand, every word it read or wrote."""
    victim.reset()
    before = probe.stats()
    got = victim.loop(n)
    hits, ok, total = (a - b for a, b in zip(probe.stats(), before))
    words = 1000 if program.endswith("1000") else 1
    assert hits == n, program
    assert ok == n * words, program  # every helper call returned 0
    buf = victim.words()
    if program.startswith("read"):
        assert total == n * sum(start(k) for k in range(words)), program
        assert got == n * start(0), program  # the victim saw the untouched buf[0]
        assert buf == [start(k) for k in range(bm.BUF_WORDS)], program
    else:
        assert total == 0, program
        assert got == sum(range(n)), program  # each call found buf[0] = i, written just before it
        assert buf[:words] == [n - 1 + k for k in range(words)], program  # the last call's writes
        assert buf[words:] == [start(k) for k in range(words, bm.BUF_WORDS)], program  # nothing else


def test_victim_starts_with_a_nop5_and_returns_buf0(art):
    bm.check_victim(art.victim)  # raises otherwise
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = [(i.mnemonic, i.op_str, i.size) for i in md.disasm(bm.VICTIM.prologue, 0)]
    assert insns[0][0] == "nop" and insns[0][2] == 5
    assert insns[1][:2] == ("mov", "rax, qword ptr [rdi]")
    assert insns[-1][0] == "ret"
    v = bm.Victim(art.victim)
    for n in (0, 1, 1000):
        assert v.loop(n) == n * start(0)
    v.buf[0] = 41
    assert v.loop(3) == 123
    v.reset()
    assert v.words() == [start(k) for k in range(bm.BUF_WORDS)]


def test_both_objects_hold_the_same_programs(art):
    import hybrid

    with hybrid.load(art.kernel_object) as k, hybrid.load(art.user_object) as u:
        names = sorted(c.program for c in bm.CASES)
        assert sorted(k.programs) == names and sorted(u.programs) == names
        assert {lp.section for lp in k.programs.values()} == {"uprobe"}
        assert {lp.section for lp in u.programs.values()} == {"uprobe/%s:victim_buf" % art.victim}
        for name in names:
            assert k.programs[name].spec.insns == u.programs[name].spec.insns, name


def test_verifier_verdict_is_the_last_line_of_the_load_log():
    log = ["libbpf: prog 'w': BPF program load failed: Invalid argument\n",
           "libbpf: prog 'w': -- BEGIN PROG LOAD LOG --\n7: (85) call bpf_probe_write_user#36\n"
           "program of this type cannot use helper bpf_probe_write_user#36\n"
           "processed 8 insns (limit 1000000) max_states_per_insn 0\n-- END PROG LOAD LOG --\n"]
    assert bm.verifier_verdict(log) == "program of this type cannot use helper bpf_probe_write_user#36"
    assert bm.verifier_verdict(["libbpf: failed to open\n"]) == ""


def test_hybrid_programs_read_and_write_exactly_their_words(art):
    victim = bm.Victim(art.victim)
    for case in bm.CASES:
        with bm.UserMemProbe(art.user_object, case.program) as probe:
            expect_work(probe, victim, case.program, CALLS)
        victim.reset()
        assert victim.loop(10) == 10 * start(0)  # detached: nothing runs any more
        assert pp.patched_insn(victim, bm.VICTIM) == bm.VICTIM.name


def test_subject_checks_catch_a_missing_hit(art):
    s = bm.Subject("read1", "user", 100, art)
    try:
        s.probe.attachment.detach()
        s.probe.attachment = None
        with pytest.raises(RuntimeError, match="does not do its work"):
            s.time(1)
    finally:
        s.close()


@root_only
def test_kernel_read_programs_read_exactly_their_words(art):
    victim = bm.Victim(art.victim)
    for program in ("read1", "read1000"):
        try:
            probe = bm.KernelMemProbe(art.kernel_object, art.victim, program)
        except pp.SideUnavailable as e:
            pytest.skip("kernel uprobes unavailable here: %s" % e)
        with probe:
            expect_work(probe, victim, program, CALLS)
        assert pp.patched_insn(victim, bm.VICTIM) == bm.VICTIM.name


def kernel_write_refusal(art, program: str = "write1") -> str | None:
    """The kernel's refusal of a write program, or None when it loads it."""
    try:
        bm.load_kernel(art.kernel_object, program).close()
    except bm.KernelRefused as e:
        return str(e)
    return None


@root_only
def test_kernel_write_programs_write_their_words_or_are_refused(art):
    refusal = kernel_write_refusal(art)
    if refusal is not None:
        assert refusal.startswith("kernel refuses bpf_probe_write_user: the verifier says ")
        assert "bpf_probe_write_user" in refusal.split("the verifier says ", 1)[1]
        with pytest.raises(bm.KernelRefused, match="kernel refuses bpf_probe_write_user"):
            bm.KernelMemProbe(art.kernel_object, art.victim, "write1000")
        bm.load_kernel(art.kernel_object, "read1000").close()  # the read programs still load on their own
        return
    victim = bm.Victim(art.victim)
    for program in ("write1", "write1000"):
        with bm.KernelMemProbe(art.kernel_object, art.victim, program) as probe:
            expect_work(probe, victim, program, CALLS)


@root_only
def test_quick_run_gives_every_row(art, quick_bench):
    import report

    out, _ = quick_bench.suite("memory")
    rows = bm.rows(out)
    assert [r.name for r in rows] == list(ROWS)
    assert report.check_rows(rows) == []
    for r in rows:
        assert r.suite == "memory" and r.unit == "ns added/call" and r.note
        assert r.user is not None and r.user.median > 0, r
        assert (r.kernel is not None) or r.reason, r
    assert all(r.kernel is not None for r in rows if "read" in r.name), [r.reason for r in rows]
    for r, program in zip(rows[2:], ("write1", "write1000")):
        refusal = kernel_write_refusal(art, program)
        if refusal is None:
            assert r.kernel is not None, r
        else:
            assert r.kernel is None and r.reason == refusal, r
    assert bm.missed_goals(out) == []
    text = bm.summarize(out)
    assert text.startswith("# Memory helpers")
    for name in ROWS:
        assert "| %s |" % name in text
