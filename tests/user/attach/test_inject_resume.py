"""The thread a ptrace injection borrows must go on safely after the agent patched code under it.

The agent quiesces every other thread before it writes a jump over a window of instructions, but
the thread that runs the apply was stopped by the injector, which saved its registers: stopped just
after libc's ``syscall`` in ``getppid`` (or inside it, to be restarted), it would resume in the
middle of the new jump and crash.  The injector asks the agent where that instruction lives now
(``hybrid_agent_relocate_pc``) and restarts an interrupted system call there as the kernel would.
A process spinning on getppid() takes syscall probes attached and detached many times and lives."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

import hybrid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching to other processes needs root (ptrace)")

SPIN = textwrap.dedent("""\
    #include <stdio.h>
    #include <time.h>
    #include <unistd.h>
    int main(void)
    {
        struct timespec ts = {0, 100000};
        printf("%d\\n", getpid());
        fflush(stdout);
        for (;;) {
            for (int i = 0; i < 1000; i++)
                getppid();
            nanosleep(&ts, NULL);
        }
    }
""")

PROG = textwrap.dedent("""\
    #include <linux/bpf.h>
    #include <bpf/bpf_helpers.h>
    __u64 n = 0;
    SEC("tracepoint/syscalls/sys_enter_getppid") int count(void *ctx) { __sync_fetch_and_add(&n, 1); return 0; }
    char LICENSE[] SEC("license") = "GPL";
""")


def test_a_spinning_process_survives_attach_and_detach_rounds(bpf_build, tmp_path):
    src = tmp_path / "spin.c"
    src.write_text(SPIN)
    subprocess.run(["cc", "-O1", "-o", str(tmp_path / "spin"), str(src)], check=True)
    (tmp_path / "resume.bpf.c").write_text(PROG)
    obj_path = bpf_build.compile(tmp_path / "resume.bpf.c", "resume")
    p = subprocess.Popen([str(tmp_path / "spin")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(p.stdout.readline())
        with hybrid.load(obj_path, kernel=False) as obj:
            for i in range(60):
                att = obj.attach(pid)
                att.detach()
                assert p.poll() is None, "the traced process died (status %s) at round %d" % (p.returncode, i)
            obj.sync()
            seen = int.from_bytes(obj.maps[".bss"].lookup(bytes(4))[:8], "little")
            assert seen > 0  # the probes ran between attach and detach
    finally:
        p.kill()
        p.wait()
