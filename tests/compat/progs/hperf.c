// SPDX-License-Identifier: GPL-2.0
/* hperf: the perf buffer loader for hperf.bpf.c.
 *
 *   hperf -p PID -b BINARY -r READYFILE
 *
 * Attaches the uprobe to hload_work() of BINARY in process PID, creates READYFILE, polls the
 * perf buffer (perf_buffer__new / perf_buffer__poll) until SIGINT, then prints
 * "perf events=N sum=S lost=L calls=C failed=F" (events received, the sum of their x, records
 * the lost callback reported, and the program's own counters). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/libbpf.h>
#include "hperf.skel.h"

struct hperf_event {
	unsigned int pid;
	int x;
	unsigned long long seq;
};

static volatile sig_atomic_t stop;
static unsigned long long events, lost;
static long long sum;

static void on_sigint(int sig) { (void)sig; stop = 1; }

static void on_sample(void *ctx, int cpu, void *data, __u32 size)
{
	const struct hperf_event *e = data;

	(void)ctx;
	(void)cpu;
	if (size < sizeof(*e))
		return;
	events++;
	sum += e->x;
}

static void on_lost(void *ctx, int cpu, __u64 n)
{
	(void)ctx;
	(void)cpu;
	lost += n;
}

int main(int argc, char **argv)
{
	LIBBPF_OPTS(bpf_uprobe_opts, uopts, .func_name = "hload_work");
	const char *binary = NULL, *ready = NULL;
	struct perf_buffer *pb = NULL;
	struct hperf_bpf *obj;
	int pid = 0, opt, err = 0;

	while ((opt = getopt(argc, argv, "p:b:r:")) != -1) {
		if (opt == 'p')
			pid = atoi(optarg);
		else if (opt == 'b')
			binary = optarg;
		else if (opt == 'r')
			ready = optarg;
		else
			return 2;
	}
	if (pid <= 0 || !binary) {
		fprintf(stderr, "usage: %s -p PID -b BINARY [-r READYFILE]\n", argv[0]);
		return 2;
	}
	signal(SIGINT, on_sigint);
	signal(SIGTERM, on_sigint);
	obj = hperf_bpf__open_and_load();
	if (!obj) {
		fprintf(stderr, "failed to load: %s\n", strerror(errno));
		return 1;
	}
	obj->links.hperf_enter = bpf_program__attach_uprobe_opts(obj->progs.hperf_enter, pid, binary, 0, &uopts);
	if (!obj->links.hperf_enter) {
		err = -errno;
		fprintf(stderr, "failed to attach the uprobe: %s\n", strerror(-err));
		goto out;
	}
	pb = perf_buffer__new(bpf_map__fd(obj->maps.events), 64, on_sample, on_lost, NULL, NULL);
	if (!pb) {
		err = -errno;
		fprintf(stderr, "failed to open the perf buffer: %s\n", strerror(-err));
		goto out;
	}
	if (ready)
		close(open(ready, O_CREAT | O_WRONLY, 0644));
	while (!stop) {
		err = perf_buffer__poll(pb, 100);
		if (err < 0 && err != -EINTR) {
			fprintf(stderr, "perf_buffer__poll: %s\n", strerror(-err));
			goto out;
		}
		err = 0;
	}
	perf_buffer__consume(pb);
	printf("perf events=%llu sum=%lld lost=%llu calls=%llu failed=%llu\n", events, sum, lost,
	       (unsigned long long)obj->bss->calls, (unsigned long long)obj->bss->failed);
out:
	perf_buffer__free(pb);
	hperf_bpf__destroy(obj);
	return err ? 1 : 0;
}
