// SPDX-License-Identifier: GPL-2.0
/*
 * The probe benchmark's victims (bench/bench_probes.py): three tiny functions
 * whose first instructions decide how the kernel handles a uprobe hit on them,
 * and victim_loop(), which calls one of them n times.
 *
 *   victim_lea   lea (%rdi,%rsi,1),%rax; add $1,%rax; ret
 *                not emulated by the kernel: each hit single-steps the
 *                instruction out of line (a second trap), the slow path;
 *   victim_push  push %rbp; mov %rsp,%rbp; lea (%rdi,%rsi,1),%rax; pop %rbp; ret
 *                the kernel emulates the push (no single-step);
 *   victim_nop5  nopl 0x0(%rax,%rax,1); lea (%rdi,%rsi,1),%rax; ret
 *                the kernel optimizes a uprobe on a 5-byte nop (a call into a
 *                trampoline page instead of int3, Linux >= 6.18).
 *
 * Each has at least 5 bytes before its ret and no branch into them, so a
 * 5-byte jmp patch over its start is safe.  They are written in assembly so
 * that the compiler cannot change those first bytes; bench_probes.py checks
 * them in the built library before timing anything.  Every victim returns
 * a + b (+ 1 for lea), so victim_loop's result tells that each call ran.
 *
 * Built with gcc -O2 -shared -fPIC -Wl,-Bsymbolic: the calls in victim_loop
 * bind directly to the victims (no PLT), while the victims stay exported.
 */

#define VICTIM(name, body)                                      \
	__asm__(".text\n"                                       \
		".p2align 4\n"                                  \
		".globl " #name "\n"                            \
		".type " #name ",@function\n"                   \
		#name ":\n"                                     \
		".cfi_startproc\n"                              \
		body                                            \
		".cfi_endproc\n"                                \
		".size " #name ", .-" #name "\n")

VICTIM(victim_lea,
       "lea (%rdi,%rsi,1),%rax\n"          /* 48 8d 04 37 */
       "add $1,%rax\n"                     /* 48 83 c0 01 */
       "ret\n");

VICTIM(victim_push,
       "push %rbp\n"                       /* 55 */
       ".cfi_def_cfa_offset 16\n"
       ".cfi_offset %rbp, -16\n"
       "mov %rsp,%rbp\n"                   /* 48 89 e5 */
       ".cfi_def_cfa_register %rbp\n"
       "lea (%rdi,%rsi,1),%rax\n"          /* 48 8d 04 37 */
       "pop %rbp\n"                        /* 5d */
       ".cfi_def_cfa %rsp, 8\n"
       "ret\n");

VICTIM(victim_nop5,
       ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n" /* nopl 0x0(%rax,%rax,1) */
       "lea (%rdi,%rsi,1),%rax\n"
       "ret\n");

long victim_lea(long a, long b);
long victim_push(long a, long b);
long victim_nop5(long a, long b);

/* which: 0 lea, 1 push, 2 nop5.  The sum of the victims' results (-1: bad which). */
long victim_loop(int which, long n)
{
	long sum = 0, i;

	switch (which) {
	case 0:
		for (i = 0; i < n; i++)
			sum += victim_lea(i, 1);
		break;
	case 1:
		for (i = 0; i < n; i++)
			sum += victim_push(i, 1);
		break;
	case 2:
		for (i = 0; i < n; i++)
			sum += victim_nop5(i, 1);
		break;
	default:
		return -1;
	}
	return sum;
}
