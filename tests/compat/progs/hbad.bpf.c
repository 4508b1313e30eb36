// SPDX-License-Identifier: GPL-2.0
/* Programs hybrid load must leave to the kernel, for tests/compat/test_load.py: an XDP program
 * the kernel's verifier refuses (it reads past the packet without a bounds check) and a
 * sched_switch tracepoint program the kernel accepts. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("xdp")
int unchecked_read(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;

	return data[64] ? XDP_DROP : XDP_PASS; /* no check against data_end: refused */
}
