// Global data: .data, .rodata (const volatile), .bss, a custom .data.* section, strings.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

const volatile u32 target_pid = 1234;
const volatile u64 threshold = 0x1122334455667788ULL;
const volatile char comm_filter[16] = "bash";
u64 counter = 5;
u32 flags_word = 0xdeadbeef;
u64 hits;
u8 scratch[32];
u64 custom_a SEC(".data.custom") = 77;
static u64 local_counter = 3;

SEC("uprobe")
int use_globals(void *ctx)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	if (pid != target_pid)
		return 0;
	if (counter > threshold)
		return 1;
	hits++;
	counter += flags_word;
	scratch[3] = comm_filter[0];
	custom_a++;
	local_counter += 2;
	bpf_printk("pid %d counter %d", pid, local_counter);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
