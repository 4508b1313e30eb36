// The probe helpers through hybrid.load(): the current probe (get_func_ip,
// get_attach_cookie, get_func_arg*, get_func_ret, override_return), user
// stacks (get_stack) and signals.  Checked by tests/user/test_object_helpers.py.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct seen {
    u64 func_ip;
    u64 cookie;
    u64 arg_cnt;
    long arg_rc[7];
    u64 arg[7];
    long ret_rc;
    u64 ret;
    long override_rc;
};

struct seen seen;      /* .bss */
u64 stack[8];          /* .bss */

static __always_inline void fill(struct pt_regs *ctx)
{
    int i;

    seen.func_ip = bpf_get_func_ip(ctx);
    seen.cookie = bpf_get_attach_cookie(ctx);
    seen.arg_cnt = bpf_get_func_arg_cnt(ctx);
    for (i = 0; i < 7; i++)
        seen.arg_rc[i] = bpf_get_func_arg(ctx, i, &seen.arg[i]);
    seen.ret_rc = bpf_get_func_ret(ctx, &seen.ret);
}

/* on_entry: fills `seen`, then override_return(ctx, arg 5 (r8)) */
SEC("uprobe")
long on_entry(struct pt_regs *ctx)
{
    fill(ctx);
    seen.override_rc = bpf_override_return(ctx, PT_REGS_PARM5(ctx));
    return seen.override_rc;
}

SEC("uretprobe")
long on_return(struct pt_regs *ctx)
{
    fill(ctx);
    return seen.ret_rc;
}

/* user_stack(size, flags): bpf_get_stack(ctx, stack, size, flags) */
SEC("uprobe")
long user_stack(struct pt_regs *ctx)
{
    return bpf_get_stack(ctx, stack, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
}

/* signal(sig, thread): bpf_send_signal or bpf_send_signal_thread */
SEC("uprobe")
long signal(struct pt_regs *ctx)
{
    if (PT_REGS_PARM2(ctx))
        return bpf_send_signal_thread(PT_REGS_PARM1(ctx));
    return bpf_send_signal(PT_REGS_PARM1(ctx));
}
