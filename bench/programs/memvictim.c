// SPDX-License-Identifier: GPL-2.0
/*
 * The memory benchmark's victim (bench/bench_memory.py): a tiny function whose
 * first argument points at a user buffer, and buf_loop(), which calls it n
 * times with that buffer.
 *
 *   victim_buf   nopl 0x0(%rax,%rax,1); mov (%rdi),%rax; ret
 *                returns buf[0].  It starts with a 5-byte nop: the kernel
 *                optimizes a uprobe there (a call into a trampoline page
 *                instead of int3, Linux >= 6.18), its cheapest uprobe path,
 *                and hybrid's 5-byte jmp patch replaces just the nop.
 *
 * The probes (programs/memory.bpf.c) run at the victim's entry, before it
 * loads buf[0]: a program that writes buf[0] on every hit changes what each
 * call returns, so buf_loop's sum tells that every write landed in time.
 *
 * Written in assembly so that the compiler cannot change those bytes;
 * bench_memory.py checks them in the built library.  Built with gcc -O2
 * -shared -fPIC -Wl,-Bsymbolic: buf_loop calls victim_buf directly (no PLT).
 */

__asm__(".text\n"
	".p2align 4\n"
	".globl victim_buf\n"
	".type victim_buf,@function\n"
	"victim_buf:\n"
	".cfi_startproc\n"
	".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"  /* nopl 0x0(%rax,%rax,1) */
	"mov (%rdi),%rax\n"                     /* 48 8b 07 */
	"ret\n"                                 /* c3 */
	".cfi_endproc\n"
	".size victim_buf, .-victim_buf\n");

long victim_buf(long *buf, long i);

/* The sum of victim_buf(buf, i) for i < n: the buf[0] each call saw. */
long buf_loop(long *buf, long n)
{
	long sum = 0, i;

	for (i = 0; i < n; i++)
		sum += victim_buf(buf, i);
	return sum;
}
