// Memory and string helpers through hybrid.load(): probe_read*, probe_write_user,
// snprintf, strncmp, trace_printk/trace_vprintk, bpf_loop.  Checked by
// tests/user/test_object_helpers.py on every engine.
// Context: struct pt_regs (uprobe); arguments in di, si, dx, cx, r8.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define A1(ctx) PT_REGS_PARM1(ctx)
#define A2(ctx) PT_REGS_PARM2(ctx)
#define A3(ctx) PT_REGS_PARM3(ctx)
#define A4(ctx) PT_REGS_PARM4(ctx)
#define A5(ctx) PT_REGS_PARM5(ctx)

char out[64];    /* .bss: where helpers write; the test reads it through obj.maps[".bss"] */

/* read(kind, src, size): one of the probe_read helpers from user address src into out */
SEC("uprobe")
long read(struct pt_regs *ctx)
{
    const void *src = (const void *)A2(ctx);
    u32 size = A3(ctx);

    switch (A1(ctx)) {
    case 0:
        return bpf_probe_read(out, size, src);
    case 1:
        return bpf_probe_read_user(out, size, src);
    case 2:
        return bpf_probe_read_str(out, size, src);
    case 3:
        return bpf_probe_read_user_str(out, size, src);
    case 4:
        return bpf_probe_read_kernel(out, size, src);
    case 5:
        return bpf_probe_read_kernel_str(out, size, src);
    }
    return -22;
}

/* read_stack(kind, src): a probe_read into a stack buffer, returned as r0 (0 if the read failed) */
SEC("uprobe")
long read_stack(struct pt_regs *ctx)
{
    u64 v = 0x5555555555555555ULL;
    long rc;

    if (A1(ctx) == 0)
        rc = bpf_probe_read_user(&v, sizeof(v), (const void *)A2(ctx));
    else
        rc = bpf_probe_read_kernel(&v, sizeof(v), (const void *)A2(ctx));
    return rc ? rc : (long)v;
}

/* write(dst, value, size): probe_write_user of the first `size` bytes of value */
SEC("uprobe")
long write(struct pt_regs *ctx)
{
    u64 value = A2(ctx);

    return bpf_probe_write_user((void *)A1(ctx), &value, A3(ctx));
}

/* fmt(a, b, c, str, size): bpf_snprintf into out, with at most `size` bytes */
SEC("uprobe")
long fmt(struct pt_regs *ctx)
{
    static const char f[] = "a=%d b=%u c=%llx s=%s|%5d|%-4x|%c";
    u64 data[7] = {A1(ctx), A2(ctx), A3(ctx), A4(ctx), A1(ctx), A2(ctx), 'Q'};

    return bpf_snprintf(out, A5(ctx), f, data, sizeof(data));
}

/* fmt_bad(): a format the kernel refuses (%n): -EINVAL */
SEC("uprobe")
long fmt_bad(struct pt_regs *ctx)
{
    static const char f[] = "x=%n";
    u64 data[1] = {1};

    return bpf_snprintf(out, sizeof(out), f, data, sizeof(data));
}

/* printk(a, b, c, d): trace_printk with three arguments, then trace_vprintk with four;
 * r0 = the two message lengths, (first << 32) | second */
SEC("uprobe")
long printk(struct pt_regs *ctx)
{
    long n1, n2;

    n1 = bpf_printk("printk a=%d b=%u c=%llx", (int)A1(ctx), (u32)A2(ctx), A3(ctx));
    n2 = bpf_printk("vprintk %d %d %d %s", (int)A1(ctx), (int)A2(ctx), (int)A3(ctx), (const char *)A4(ctx));
    return (n1 << 32) | (u32)n2;
}

/* cmp(str, n): bpf_strncmp(the user string str read into a buffer, n, "hybrid") */
SEC("uprobe")
long cmp(struct pt_regs *ctx)
{
    static const char want[] = "hybrid";
    char buf[16];
    long rc = bpf_probe_read_user_str(buf, sizeof(buf), (const void *)A1(ctx));

    if (rc < 0)
        return rc;
    return bpf_strncmp(buf, A2(ctx) & 15, want);
}

struct loop_ctx {
    u64 sum;
    u64 stop_at;
    u64 calls;
};

static long loop_body(u32 i, void *data)
{
    struct loop_ctx *c = data;

    c->calls++;
    c->sum += (u64)i * i;
    return i == c->stop_at;    /* 1: stop */
}

/* loop(nr, stop_at, flags): bpf_loop; r0 = its result, out = {sum, stop_at, calls} */
SEC("uprobe")
long loop(struct pt_regs *ctx)
{
    struct loop_ctx c = {.stop_at = A2(ctx)};
    long rc = bpf_loop(A1(ctx), loop_body, &c, A3(ctx));

    __builtin_memcpy(out, &c, sizeof(c));
    return rc;
}
