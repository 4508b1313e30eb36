// SPDX-License-Identifier: GPL-2.0
/* hload: the loader of hload.bpf.o, libbpf-tools style.
 *
 *   hload -p PID [-b BINARY] [-d SECONDS] [-r FILE] [-v]
 *
 * Attaches hload_enter/hload_exit to hload_work() of BINARY (default:
 * /proc/PID/exe) for process PID, hload_tick to its USDT probe hload:tick,
 * and auto-attaches the sys_enter_getppid tracepoint program (filtered on
 * PID).  Once everything is attached it creates FILE (-r), then polls the
 * ring buffer every 100 ms, printing one line per event:
 *
 *   uprobe pid=P value=X
 *   uretprobe pid=P value=R
 *   usdt pid=P value=A arg2=B
 *   getppid pid=P value=NR
 *
 * until -d SECONDS have passed or SIGINT/SIGTERM.  At exit it prints
 *
 *   total uprobe_calls=N uprobe_sum=S uretprobe_calls=N uretprobe_sum=R usdt_calls=M usdt_sum=T usdt_sum2=T2 getppid=K getppid_sum=G
 *   events uprobe=N uretprobe=N usdt=M getppid=K dropped=D
 *
 * Exit status: 0, 1 on an error, 2 on bad usage.
 *
 * Build: bpftool gen skeleton hload.bpf.o > hload.skel.h
 *        cc -O2 -g -I. -o hload hload.c -lbpf
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include "hload.skel.h"

/* The same layout as in hload.bpf.c. */
enum hload_kind {
	HLOAD_UPROBE = 0,
	HLOAD_URETPROBE = 1,
	HLOAD_USDT = 2,
	HLOAD_GETPPID = 3,
	HLOAD_KINDS = 4,
};

struct hload_event {
	__u32 kind;
	__u32 pid;
	__s64 value;
	__s64 value2;
};

struct hload_total {
	__u64 calls;
	__s64 sum;
	__s64 sum2;
};

static const char *const kind_names[HLOAD_KINDS] = { "uprobe", "uretprobe", "usdt", "getppid" };

static struct env {
	pid_t pid;
	const char *binary;
	long duration;
	const char *ready_file;
	bool verbose;
} env;

static volatile sig_atomic_t exiting;
static unsigned long long received[HLOAD_KINDS];
static unsigned long long unknown_events;

static void usage(FILE *f, const char *prog)
{
	fprintf(f, "usage: %s -p PID [-b BINARY] [-d SECONDS] [-r FILE] [-v]\n"
		   "  -p PID      process to trace (required)\n"
		   "  -b BINARY   executable with hload_work() and USDT hload:tick (default: /proc/PID/exe)\n"
		   "  -d SECONDS  stop after this long (default: at SIGINT/SIGTERM)\n"
		   "  -r FILE     create FILE once every probe is attached\n"
		   "  -v          libbpf debug output\n", prog);
}

static int libbpf_print_fn(enum libbpf_print_level level, const char *format, va_list args)
{
	if (level == LIBBPF_DEBUG && !env.verbose)
		return 0;
	return vfprintf(stderr, format, args);
}

static void sig_handler(int sig)
{
	(void)sig;
	exiting = 1;
}

static int handle_event(void *ctx, void *data, size_t size)
{
	const struct hload_event *e = data;

	(void)ctx;
	if (size < sizeof(*e) || e->kind >= HLOAD_KINDS) {
		unknown_events++;
		return 0;
	}
	received[e->kind]++;
	if (e->kind == HLOAD_USDT)
		printf("%s pid=%u value=%lld arg2=%lld\n", kind_names[e->kind], e->pid, (long long)e->value,
		       (long long)e->value2);
	else
		printf("%s pid=%u value=%lld\n", kind_names[e->kind], e->pid, (long long)e->value);
	return 0;
}

static long parse_long(const char *s, const char *what, const char *prog)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0' || v <= 0) {
		fprintf(stderr, "%s: invalid %s: %s\n", prog, what, s);
		usage(stderr, prog);
		exit(2);
	}
	return v;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int attach_all(struct hload_bpf *obj, const char *binary)
{
	LIBBPF_OPTS(bpf_uprobe_opts, uopts);
	int err;

	/* the tracepoint program (SEC("uprobe") and SEC("usdt") without a target are skipped) */
	err = hload_bpf__attach(obj);
	if (err) {
		fprintf(stderr, "failed to attach the tracepoint: %s\n", strerror(-err));
		return err;
	}

	uopts.func_name = "hload_work";
	uopts.retprobe = false;
	obj->links.hload_enter = bpf_program__attach_uprobe_opts(obj->progs.hload_enter, env.pid, binary, 0, &uopts);
	if (!obj->links.hload_enter) {
		err = -errno;
		fprintf(stderr, "failed to attach uprobe to %s:hload_work: %s\n", binary, strerror(-err));
		return err;
	}

	uopts.retprobe = true;
	obj->links.hload_exit = bpf_program__attach_uprobe_opts(obj->progs.hload_exit, env.pid, binary, 0, &uopts);
	if (!obj->links.hload_exit) {
		err = -errno;
		fprintf(stderr, "failed to attach uretprobe to %s:hload_work: %s\n", binary, strerror(-err));
		return err;
	}

	obj->links.hload_tick = bpf_program__attach_usdt(obj->progs.hload_tick, env.pid, binary, "hload", "tick", NULL);
	if (!obj->links.hload_tick) {
		err = -errno;
		fprintf(stderr, "failed to attach USDT hload:tick of %s: %s\n", binary, strerror(-err));
		return err;
	}
	return 0;
}

static int print_totals(struct hload_bpf *obj)
{
	struct hload_total t[HLOAD_KINDS];
	__u32 key;
	int err;

	for (key = 0; key < HLOAD_KINDS; key++) {
		err = bpf_map__lookup_elem(obj->maps.totals, &key, sizeof(key), &t[key], sizeof(t[key]), 0);
		if (err) {
			fprintf(stderr, "failed to read totals[%u]: %s\n", key, strerror(-err));
			return err;
		}
	}
	/* the same, read again as a libbpf-tools loop over bpf_map_lookup_batch would, 3 then the rest */
	{
		struct hload_total b[HLOAD_KINDS];
		__u32 keys[HLOAD_KINDS], out = 0, n = 0, got;
		int fd = bpf_map__fd(obj->maps.totals), rc = 0;
		void *in = NULL;

		while (n < HLOAD_KINDS && rc == 0) {
			got = n ? HLOAD_KINDS - n : 3;
			rc = bpf_map_lookup_batch(fd, in, &out, keys + n, b + n, &got, NULL);
			if (rc && errno != ENOENT) {
				fprintf(stderr, "bpf_map_lookup_batch: %s\n", strerror(errno));
				return -errno;
			}
			n += got;
			in = &out;
		}
		printf("batch %s (%u entries)\n", n == HLOAD_KINDS && !memcmp(b, t, sizeof(t)) ? "same" : "differs", n);
	}
	printf("total uprobe_calls=%llu uprobe_sum=%lld uretprobe_calls=%llu uretprobe_sum=%lld "
	       "usdt_calls=%llu usdt_sum=%lld usdt_sum2=%lld getppid=%llu getppid_sum=%lld\n",
	       (unsigned long long)t[HLOAD_UPROBE].calls, (long long)t[HLOAD_UPROBE].sum,
	       (unsigned long long)t[HLOAD_URETPROBE].calls, (long long)t[HLOAD_URETPROBE].sum,
	       (unsigned long long)t[HLOAD_USDT].calls, (long long)t[HLOAD_USDT].sum, (long long)t[HLOAD_USDT].sum2,
	       (unsigned long long)t[HLOAD_GETPPID].calls, (long long)t[HLOAD_GETPPID].sum);
	printf("events uprobe=%llu uretprobe=%llu usdt=%llu getppid=%llu dropped=%llu",
	       received[HLOAD_UPROBE], received[HLOAD_URETPROBE], received[HLOAD_USDT], received[HLOAD_GETPPID],
	       (unsigned long long)obj->bss->dropped);
	if (unknown_events)
		printf(" unknown=%llu", unknown_events);
	printf("\n");
	return 0;
}

int main(int argc, char **argv)
{
	struct ring_buffer *rb = NULL;
	struct hload_bpf *obj = NULL;
	char exe[PATH_MAX];
	const char *binary;
	double deadline = 0;
	int opt, err, fd;

	while ((opt = getopt(argc, argv, "p:b:d:r:vh")) != -1) {
		switch (opt) {
		case 'p':
			env.pid = (pid_t)parse_long(optarg, "PID", argv[0]);
			break;
		case 'b':
			env.binary = optarg;
			break;
		case 'd':
			env.duration = parse_long(optarg, "duration", argv[0]);
			break;
		case 'r':
			env.ready_file = optarg;
			break;
		case 'v':
			env.verbose = true;
			break;
		case 'h':
			usage(stdout, argv[0]);
			return 0;
		default:
			usage(stderr, argv[0]);
			return 2;
		}
	}
	if (optind != argc || env.pid <= 0) {
		fprintf(stderr, "%s: %s\n", argv[0], optind != argc ? "unexpected argument" : "-p PID is required");
		usage(stderr, argv[0]);
		return 2;
	}
	binary = env.binary;
	if (!binary) {
		char link[64];
		ssize_t n;

		snprintf(link, sizeof(link), "/proc/%d/exe", (int)env.pid);
		n = readlink(link, exe, sizeof(exe) - 1);
		if (n < 0) {
			fprintf(stderr, "cannot find the executable of process %d (%s): %s\n", (int)env.pid, link,
				strerror(errno));
			return 1;
		}
		exe[n] = '\0';
		binary = exe;
	}

	setvbuf(stdout, NULL, _IOLBF, 0);
	libbpf_set_print(libbpf_print_fn);

	obj = hload_bpf__open();
	if (!obj) {
		fprintf(stderr, "failed to open the BPF object: %s\n", strerror(errno));
		return 1;
	}
	obj->rodata->target_tgid = env.pid;

	err = hload_bpf__load(obj);
	if (err) {
		fprintf(stderr, "failed to load the BPF object: %s\n", strerror(-err));
		goto cleanup;
	}

	err = attach_all(obj, binary);
	if (err)
		goto cleanup;

	rb = ring_buffer__new(bpf_map__fd(obj->maps.events), handle_event, NULL, NULL);
	if (!rb) {
		err = -errno;
		fprintf(stderr, "failed to create the ring buffer: %s\n", strerror(-err));
		goto cleanup;
	}

	if (signal(SIGINT, sig_handler) == SIG_ERR || signal(SIGTERM, sig_handler) == SIG_ERR) {
		err = -errno;
		fprintf(stderr, "cannot set signal handlers: %s\n", strerror(-err));
		goto cleanup;
	}

	if (env.ready_file) {
		fd = open(env.ready_file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
		if (fd < 0) {
			err = -errno;
			fprintf(stderr, "cannot create %s: %s\n", env.ready_file, strerror(-err));
			goto cleanup;
		}
		close(fd);
	}
	fprintf(stderr, "Tracing process %d (%s)... Hit Ctrl-C to end.\n", (int)env.pid, binary);

	if (env.duration)
		deadline = now() + env.duration;
	while (!exiting) {
		err = ring_buffer__poll(rb, 100 /* ms */);
		if (err == -EINTR) {
			err = 0;
			continue;
		}
		if (err < 0) {
			fprintf(stderr, "error polling the ring buffer: %s\n", strerror(-err));
			goto cleanup;
		}
		err = 0;
		if (deadline && now() >= deadline)
			break;
	}
	/* what came in after the last poll */
	err = ring_buffer__consume(rb);
	if (err < 0) {
		fprintf(stderr, "error consuming the ring buffer: %s\n", strerror(-err));
		goto cleanup;
	}
	err = print_totals(obj);

cleanup:
	ring_buffer__free(rb);
	hload_bpf__destroy(obj);
	return err ? 1 : 0;
}
