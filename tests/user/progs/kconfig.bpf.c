// __kconfig externs: virtual LINUX_* ones and CONFIG_* values from the kernel config.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

extern u32 LINUX_KERNEL_VERSION __kconfig;
extern bool CONFIG_BPF_SYSCALL __kconfig;
extern enum libbpf_tristate CONFIG_HYBRID_DOES_NOT_EXIST __kconfig __weak;
extern int CONFIG_HZ __kconfig __weak;
extern char CONFIG_LOCALVERSION[32] __kconfig __weak;

u64 seen[5];

SEC("uprobe")
int use_kconfig(void *ctx)
{
	seen[0] = LINUX_KERNEL_VERSION;
	seen[1] = CONFIG_BPF_SYSCALL;
	seen[2] = CONFIG_HYBRID_DOES_NOT_EXIST;
	seen[3] = CONFIG_HZ;
	seen[4] = CONFIG_LOCALVERSION[0];
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
