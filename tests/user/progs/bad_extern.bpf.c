// A call to a function that nothing defines: refused at load, naming the symbol.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

extern int not_defined_anywhere(int x);

SEC("uprobe")
int calls_missing(void *ctx)
{
	return not_defined_anywhere(3);
}

char LICENSE[] SEC("license") = "GPL";
