// Clocks, randomness and the current task through hybrid.load(): checked by
// tests/user/test_object_helpers.py against Python's clocks, os and prctl.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct info {
    u64 ktime;
    u64 boot;
    u64 coarse;
    u64 jiffies;
    u64 random[4];
    u64 cpu;
    u64 pid_tgid;
    u64 uid_gid;
    u64 task;
    long comm_rc;
    char comm[16];
    long ns_rc;
    struct bpf_pidns_info ns;
};

struct info info;    /* .bss */
char small[16];      /* .bss */

/* now(dev, ino): every clock and identity helper into `info`; r0 = ktime */
SEC("uprobe")
long now(struct pt_regs *ctx)
{
    int i;

    info.ktime = bpf_ktime_get_ns();
    info.boot = bpf_ktime_get_boot_ns();
    info.coarse = bpf_ktime_get_coarse_ns();
    info.jiffies = bpf_jiffies64();
    for (i = 0; i < 4; i++)
        info.random[i] = bpf_get_prandom_u32();
    info.cpu = bpf_get_smp_processor_id();
    info.pid_tgid = bpf_get_current_pid_tgid();
    info.uid_gid = bpf_get_current_uid_gid();
    info.task = bpf_get_current_task();
    info.comm_rc = bpf_get_current_comm(info.comm, sizeof(info.comm));
    info.ns_rc = bpf_get_ns_current_pid_tgid(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), &info.ns, sizeof(info.ns));
    return info.ktime;
}

/* comm(size): bpf_get_current_comm into `small` with `size` bytes */
SEC("uprobe")
long comm(struct pt_regs *ctx)
{
    return bpf_get_current_comm(small, PT_REGS_PARM1(ctx));
}
