// SPDX-License-Identifier: GPL-2.0
/* hauto: a generic libbpf loader for tests/compat/test_load.py.
 *
 *   hauto OBJ READYFILE PROG...
 *
 * Opens and loads OBJ, attaches the named programs in that order with bpf_program__attach (the
 * section name says where), printing "attached NAME" or "failed NAME: ERROR" for each, creates
 * READYFILE and waits for SIGINT/SIGTERM.  Exit status 0, 1 when the object does not load. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <bpf/libbpf.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
	struct bpf_object *obj;
	struct bpf_link *links[16] = {0};
	int n = 0;

	if (argc < 4) {
		fprintf(stderr, "usage: %s OBJ READYFILE PROG...\n", argv[0]);
		return 2;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	obj = bpf_object__open_file(argv[1], NULL);
	if (!obj || bpf_object__load(obj)) {
		fprintf(stderr, "failed to load %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	for (int i = 3; i < argc && n < 16; i++) {
		struct bpf_program *prog = bpf_object__find_program_by_name(obj, argv[i]);
		struct bpf_link *link = prog ? bpf_program__attach(prog) : NULL;

		if (link) {
			links[n++] = link;
			printf("attached %s\n", argv[i]);
		} else {
			printf("failed %s: %s\n", argv[i], prog ? strerror(errno) : "no such program");
		}
		fflush(stdout);
	}
	close(open(argv[2], O_CREAT | O_WRONLY, 0644));
	while (!stop)
		pause();
	for (int i = 0; i < n; i++)
		bpf_link__destroy(links[i]);
	bpf_object__close(obj);
	return 0;
}
