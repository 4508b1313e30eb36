// A variable in a section libbpf does not know (".mydata") used by code: refused.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

u64 odd_var SEC(".mydata") = 1;

SEC("uprobe")
int uses_odd(void *ctx)
{
	return odd_var;
}

char LICENSE[] SEC("license") = "GPL";
