// CO-RE: pt_regs arguments (BPF_KPROBE), kernel struct reads, existence checks of a
// missing field (poisoned but guarded), enum values, type ids/sizes, bitfields.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

struct task_struct___old {
	int this_field_does_not_exist;
	int pid;
} __attribute__((preserve_access_index));

u64 out[16];

SEC("uprobe//usr/lib/x86_64-linux-gnu/libc.so.6:malloc")
int BPF_KPROBE(on_malloc, size_t size, long second)
{
	out[0] = size;
	out[1] = second;
	out[2] = PT_REGS_RC(ctx);
	out[3] = PT_REGS_SP(ctx);
	return 0;
}

SEC("kprobe/do_nanosleep")
int read_task(void *ctx)
{
	struct task_struct *t = (void *)bpf_get_current_task();
	struct task_struct___old *old = (void *)t;

	out[4] = BPF_CORE_READ(t, pid);
	out[5] = BPF_CORE_READ(t, real_parent, tgid);
	out[6] = bpf_core_field_exists(old->this_field_does_not_exist);
	if (bpf_core_field_exists(old->this_field_does_not_exist))
		out[7] = BPF_CORE_READ(old, this_field_does_not_exist);
	out[8] = bpf_core_field_size(t->comm);
	out[9] = bpf_core_type_exists(struct task_struct);
	out[10] = bpf_core_type_size(struct task_struct);
	out[11] = bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_ringbuf_output);
	out[12] = bpf_core_enum_value(enum bpf_func_id, BPF_FUNC_ringbuf_output);
	out[13] = bpf_core_type_id_kernel(struct task_struct);
	out[14] = BPF_CORE_READ_BITFIELD_PROBED(t, in_execve);
	out[15] = bpf_core_field_offset(old->pid);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
