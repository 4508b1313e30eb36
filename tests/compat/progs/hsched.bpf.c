// SPDX-License-Identifier: GPL-2.0
/* A tracepoint program that is not a syscall one: hybrid load passes it to the kernel as it is. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

__u64 switches = 0;

SEC("tracepoint/sched/sched_switch")
int count_switch(void *ctx)
{
	__sync_fetch_and_add(&switches, 1);
	return 0;
}
