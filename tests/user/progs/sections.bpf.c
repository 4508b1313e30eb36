// One trivial program per section-name form libbpf knows.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/usdt.bpf.h>

#define P(sec, fn) SEC(sec) int fn(void *ctx) { return 0; }

P("uprobe//usr/lib/x86_64-linux-gnu/libc.so.6:malloc", up_abs)
P("uprobe/libc.so.6:malloc+0x10", up_lib_off)
P("uretprobe//bin/bash:readline", uret)
P("uprobe", up_bare)
P("uretprobe", uret_bare)
P("uprobe.s//usr/bin/true:main", up_sleepable)
P("usdt", usdt_bare)
P("tracepoint/syscalls/sys_enter_openat", tp_long)
P("tp/sched/sched_switch", tp_short)
P("tp", tp_bare)
P("raw_tp/sys_enter", raw_short)
P("raw_tracepoint/sched_switch", raw_long)
P("kprobe/do_sys_openat2+8", kp_off)
P("kretprobe/do_sys_openat2", kretp)
P("kprobe", kp_bare)
P("fentry/do_unlinkat", fent)
P("fexit/do_unlinkat", fex)
P("socket", sock)
P("xdp", xdp_prog)
P("perf_event", perf)
P("tc", tc_prog)
P("?tp/syscalls/sys_exit_read", not_autoloaded)
P("foo/bar", unknown_sec)
P("uprobe//bin/true:+0x20", up_offset_only)
P("kprobe.multi/do_sys_*", kmulti)
P("uprobe.multi//usr/bin/true:ma*", umulti)

SEC("usdt//usr/lib/libpython3.so:python:function__entry")
int BPF_USDT(usdt_full, void *filename, void *funcname, long lineno)
{
	return lineno > 0;
}

SEC("ksyscall/openat")
int BPF_KSYSCALL(ksys, int dfd, const char *pathname)
{
	return dfd;
}

SEC("kretsyscall/openat")
int BPF_KRETPROBE(kretsys, long ret)
{
	return ret;
}

char LICENSE[] SEC("license") = "GPL";
