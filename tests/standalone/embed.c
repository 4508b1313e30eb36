/* A C program embedding a library built by `hybrid aot build --lib -o libcount.so` from program
 * `count` of tests/user/progs/standalone.bpf.c (count(key, add): counts[key] += add; returns
 * counts[key] * scale + bias + greeting[0]).  Prints one line per step; test_standalone.py computes
 * the same lines with the JIT. */
#include "libcount.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t regs[21];  /* struct pt_regs: di is regs[14], si regs[13] */

static uint64_t count(uint32_t key, uint64_t add)
{
    regs[14] = key;
    regs[13] = add;
    return count_run(regs, sizeof(regs));
}

int main(void)
{
    static const uint32_t keys[] = {1, 2, 1, 7, 1, 2};
    uint64_t value, data[1];
    uint32_t key, next, n;
    int64_t size;
    int rc;

    for (unsigned i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        printf("run %u %" PRIu64 "\n", keys[i], count(keys[i], 10 + i));
    for (key = 0; key < 9; key++) {
        rc = count_map_lookup("counts", &key, &value);
        printf("counts %u %d %" PRIu64 "\n", key, rc, rc == 0 ? value : 0);
    }
    key = 0;
    rc = count_map_lookup(".data", &key, data);
    printf(".data %d %" PRIu64 "\n", rc, data[0]);
    /* the host changes the maps, the program sees it */
    key = 99;
    value = 1234;
    printf("update %d\n", count_map_update("counts", &key, &value, 0));
    printf("update_noexist %d\n", count_map_update("counts", &key, &value, 1) == -EEXIST);
    printf("run 99 %" PRIu64 "\n", count(99, 1));
    data[0] = 5;
    key = 0;
    printf("update_data %d\n", count_map_update(".data", &key, data, 0));
    printf("run 99 %" PRIu64 "\n", count(99, 1));
    printf("delete %d\n", count_map_delete("counts", &key) == -ENOENT);
    key = 7;
    printf("delete 7 %d\n", count_map_delete("counts", &key));
    n = 0;
    for (rc = count_map_next_key("counts", NULL, &next); rc == 0; rc = count_map_next_key("counts", &key, &next)) {
        key = next;
        n++;
    }
    printf("keys %u %d\n", n, rc == -ENOENT);
    size = count_map_value_size("percpu_runs");
    printf("percpu_size %" PRId64 "\n", size);
    {
        uint64_t *cpus = calloc(1, (size_t)size), total = 0;

        key = 0;
        rc = count_map_lookup("percpu_runs", &key, cpus);
        for (int64_t c = 0; c < size / 8; c++)
            total += cpus[c];
        printf("percpu_total %d %" PRIu64 "\n", rc, total);
        free(cpus);
    }
    printf("no_map %d %d %d\n", count_map_lookup("nope", &key, &value) == -EBADF,
           count_map_value_size("nope") == -EBADF, count_map_update("nope", &key, &value, 0) == -EBADF);
    for (uint32_t i = 0; count_map_name(i) != NULL; i++)
        printf("map %s\n", count_map_name(i));
    return 0;
}
