/*
 * preload.c - libhybrid_preload.so, LD_PRELOADed into an unmodified libbpf
 * program by `hybrid load -- LOADER ARGS` (hybrid/compat/load.py is the
 * other end).
 *
 * It interposes the calls libbpf makes through libc: syscall(__NR_bpf),
 * syscall(__NR_perf_event_open), ioctl, mmap, epoll_ctl and close.  Nothing
 * is emulated that the kernel can do: maps are created and programs loaded
 * in the kernel as always (the loader gets the kernel's fds, errors and
 * verifier log), and the controller is told about them.  What changes:
 *
 *  - perf_event_open of a uprobe/uretprobe (the uprobe PMU) or of a
 *    syscalls:sys_{enter,exit}_* tracepoint opens no kernel event: the
 *    loader gets a placeholder fd (an eventfd) and the controller a handle;
 *  - attaching a program to such an fd (BPF_LINK_CREATE with
 *    BPF_PERF_EVENT, or PERF_EVENT_IOC_SET_BPF) makes the controller attach
 *    the program in userspace, in the processes running hybrid's agent; the
 *    controller may answer "kernel" (the program cannot run there: a perf
 *    buffer, a tail call...), and the event is then opened in the kernel
 *    for real, dup2'ed over the placeholder, and the attach passed on;
 *  - once a program runs in userspace, its maps live in a shared-memory
 *    region: the loader's BPF_MAP_* element commands on their fds are
 *    served from that region (through the agent library's map code, same
 *    semantics as the syscall);
 *  - a ring buffer map that userspace programs may write is mmapped by the
 *    loader as a kernel-layout ring of our own (a memfd, the data area
 *    mapped twice); a forwarder thread copies the records of the userspace
 *    ring and of the kernel's ring into it, and an eventfd stands in for
 *    the map fd in epoll (edge-triggered, one event per batch), so
 *    ring_buffer__poll() works unchanged.  Records are never dropped here:
 *    when the loader falls behind, the forwarder waits, and what the
 *    programs could not write is counted in the rings' lost counters (the
 *    controller reports them).
 *
 * The controller's socket is $HYBRID_LOAD_SOCK (SOCK_SEQPACKET); the
 * protocol is the structs below, mirrored in hybrid/compat/load.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* --- protocol (hybrid/compat/load.py) ------------------------------------------------- */

enum {
    OP_HELLO = 1,
    OP_MAP = 2,     /* struct msg_fd: a map was created (the controller reads it with pidfd_getfd) */
    OP_PROG = 3,    /* struct msg_prog + insns */
    OP_PERF = 4,    /* struct msg_perf + path: rc 0 = kernel, > 0 = handle */
    OP_ATTACH = 5,  /* struct msg_attach: rc 0 = attached (+ struct msg_region), 1 = kernel, < 0 = -errno + text */
    OP_CLOSE = 6,   /* struct msg_handle: detach and forget */
    OP_FORGET = 7,  /* struct msg_fd: a map or program fd was closed */
    OP_RING = 8,    /* struct msg_fd: rc 1 = emulate the ring for the loader, 0 = the kernel's */
    OP_KATTACH = 9, /* struct msg_fd (program fd) attached in the kernel: rc < 0 = refused + text */
    OP_PERFBUF = 10, /* struct msg_fd (a BPF_OUTPUT perf event): rc 1 = emulate its buffer for the loader */
};

struct msg_hdr { uint32_t op, len; };
struct msg_rep { int64_t rc; uint32_t len, pad; };
struct msg_fd { int32_t fd; uint32_t pad; };
struct msg_prog { int32_t fd; uint32_t type, expected_attach_type, insn_cnt; char name[16]; };
struct msg_perf { int32_t pid, cpu; uint32_t flags, attr_size; uint8_t attr[128]; };
struct msg_attach { uint64_t handle; int32_t prog_fd; uint32_t kind; uint64_t cookie; };
struct msg_handle { uint64_t handle; };
struct msg_region { char path[256]; uint64_t size; uint32_t nmaps, pad; };
struct msg_region_map { int32_t fd; uint32_t index; };

/* --- the real functions ----------------------------------------------------------------- */

static long (*real_syscall)(long, ...);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_close)(int);
static int (*real_epoll_ctl)(int, int, int, struct epoll_event *);

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int ctl_fd = -1;
static int ctl_broken;

/* A forked child shares the parent's connection: it must not talk on it.  Its bpf() calls go to
 * the kernel as they are (a child that execs a new loader connects afresh). */
static void after_fork_child(void)
{
    if (ctl_fd >= 0)
        close(ctl_fd);
    ctl_fd = -1;
    ctl_broken = 1;
    pthread_mutex_init(&lock, NULL); /* another thread of the parent may have held it */
}

static void resolve(void)
{
    pthread_atfork(NULL, NULL, after_fork_child);
    real_syscall = dlsym(RTLD_NEXT, "syscall");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    real_close = dlsym(RTLD_NEXT, "close");
    real_epoll_ctl = dlsym(RTLD_NEXT, "epoll_ctl");
}

#define INIT() pthread_once(&init_once, resolve)

static long sys_bpf(int cmd, union bpf_attr *attr, unsigned int size)
{
    return real_syscall(__NR_bpf, cmd, attr, size);
}

static void say(const char *fmt, ...)
{
    char buf[1200];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    if (write(2, "hybrid load: ", 13) < 0 || write(2, buf, n) < 0)
        return;
}

/* --- the agent library's map code (dlopen'ed when a region appears) ------------------- */

struct hybrid_map;
static struct {
    void *lib;
    void *(*shm_map)(int, uint64_t, int, uint64_t);
    struct hybrid_map *(*region_map)(void *, uint32_t);
    long (*lookup_copy)(struct hybrid_map *, const void *, void *);
    long (*update)(struct hybrid_map *, const void *, const void *, uint64_t);
    long (*del)(struct hybrid_map *, const void *);
    int (*next_key)(struct hybrid_map *, const void *, void *);
    long (*pop)(struct hybrid_map *, void *);
    int (*ring_addresses)(struct hybrid_map *, uint32_t, uint64_t *);
    int (*ringbuf_wait)(struct hybrid_map *, int);
    int (*perf_wait)(struct hybrid_map *, int);
    uint64_t (*perf_lost)(struct hybrid_map *, uint32_t, int);
} H;

static int load_agent(void)
{
    const char *path = getenv("HYBRID_AGENT_LIB");

    if (H.lib)
        return 0;
    if (!path || !*path) {
        say("HYBRID_AGENT_LIB is not set: cannot read userspace maps");
        return -ENOENT;
    }
    H.lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!H.lib) {
        say("cannot load %s: %s", path, dlerror());
        return -ENOENT;
    }
#define SYM(f, name) if (!(*(void **)&H.f = dlsym(H.lib, name))) { say("%s: no %s", path, name); return -ENOENT; }
    SYM(shm_map, "hybrid_shm_map");
    SYM(region_map, "hybrid_region_map");
    SYM(lookup_copy, "hybrid_map_lookup_copy");
    SYM(update, "hybrid_map_update");
    SYM(del, "hybrid_map_delete");
    SYM(next_key, "hybrid_map_next_key");
    SYM(pop, "hybrid_map_pop");
    SYM(ring_addresses, "hybrid_ring_addresses");
    SYM(ringbuf_wait, "hybrid_ringbuf_wait");
    SYM(perf_wait, "hybrid_perf_wait");
    SYM(perf_lost, "hybrid_perf_lost");
#undef SYM
    return 0;
}

/* --- what we know about the loader's fds ------------------------------------------------ */

enum { FD_NONE, FD_MAP, FD_PROG, FD_PERF, FD_LINK, FD_PERFOUT };

struct perf_emu;

struct ring_emu;

struct fdinfo {
    uint8_t kind;
    uint8_t ring_decided;      /* OP_RING asked */
    uint32_t map_type, key_size, value_size;
    uint64_t handle;           /* FD_PERF, FD_LINK: the controller's handle */
    struct hybrid_map *hmap;   /* FD_MAP served from the region */
    struct ring_emu *emu;      /* FD_MAP ringbuf mmapped as our own ring */
    struct perf_emu *pemu;     /* FD_PERFOUT: a perf buffer mmapped as our own */
    struct msg_perf *perf;     /* FD_PERF: the open, to open it for real ("kernel") */
    char *path;
};

#define MAX_FDS 65536
static struct fdinfo *fds;

static struct fdinfo *fdi(int fd)
{
    if (fd < 0 || fd >= MAX_FDS)
        return NULL;
    if (!fds) {
        struct fdinfo *t = calloc(MAX_FDS, sizeof(*t));

        if (!t)
            return NULL;
        if (!__sync_bool_compare_and_swap(&fds, NULL, t))
            free(t);
    }
    return &fds[fd];
}

static struct fdinfo *known(int fd)
{
    struct fdinfo *f = (fd >= 0 && fd < MAX_FDS && fds) ? &fds[fd] : NULL;

    return f && f->kind != FD_NONE ? f : NULL;
}

/* --- the controller connection ---------------------------------------------------------- */

static int ctl_connect(void)
{
    const char *path = getenv("HYBRID_LOAD_SOCK");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int s;

    if (ctl_fd >= 0 || ctl_broken)
        return ctl_fd >= 0 ? 0 : -ENOTCONN;
    if (!path || strlen(path) >= sizeof(sa.sun_path)) {
        ctl_broken = 1;
        return -ENOTCONN;
    }
    strcpy(sa.sun_path, path);
    s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        say("cannot reach the controller at %s: %s (probes stay in the kernel)", path, strerror(errno));
        if (s >= 0)
            real_close(s);
        ctl_broken = 1;
        return -ENOTCONN;
    }
    /* Above every fd the loader is likely to use, so its fd numbers are the kernel's own. */
    {
        int hi = fcntl(s, F_DUPFD_CLOEXEC, 1000);

        if (hi >= 0) {
            real_close(s);
            s = hi;
        }
    }
    ctl_fd = s;
    return 0;
}

/* One request, one reply (under `lock`).  Returns the reply's rc; *out gets its payload (malloc'ed). */
static int64_t ctl_call(uint32_t op, const void *a, uint32_t alen, const void *b, uint32_t blen, void **out,
                        uint32_t *outlen)
{
    struct msg_hdr h = {op, alen + blen};
    struct iovec iov[3] = {{&h, sizeof(h)}, {(void *)a, alen}, {(void *)b, blen}};
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 3};
    static char rbuf[1 << 16];
    struct msg_rep rep;
    ssize_t n;

    if (out)
        *out = NULL;
    if (ctl_connect() < 0)
        return -ENOTCONN;
    if (sendmsg(ctl_fd, &mh, MSG_NOSIGNAL) < 0)
        goto broken;
    do
        n = recv(ctl_fd, rbuf, sizeof(rbuf), 0);
    while (n < 0 && errno == EINTR);
    if (n < (ssize_t)sizeof(rep))
        goto broken;
    memcpy(&rep, rbuf, sizeof(rep));
    if (rep.len > n - sizeof(rep))
        goto broken;
    if (out && rep.len) {
        *out = malloc(rep.len + 1);
        if (*out) {
            memcpy(*out, rbuf + sizeof(rep), rep.len);
            ((char *)*out)[rep.len] = 0;
        }
    }
    if (outlen)
        *outlen = rep.len;
    return rep.rc;
broken:
    say("lost the controller (%s): probes stay where they are, new ones go to the kernel", strerror(errno));
    real_close(ctl_fd);
    ctl_fd = -1;
    ctl_broken = 1;
    return -ENOTCONN;
}

/* --- regions ---------------------------------------------------------------------------- */

struct region { char path[256]; void *base; uint64_t size; };
static struct region regions[16];
static int nregions;

static void *region_base(const char *path, uint64_t size)
{
    int fd;
    void *base;

    for (int i = 0; i < nregions; i++)
        if (strcmp(regions[i].path, path) == 0)
            return regions[i].base;
    if (nregions == 16 || load_agent() < 0)
        return NULL;
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        say("cannot open the map region %s: %s", path, strerror(errno));
        return NULL;
    }
    base = H.shm_map(fd, size, 0, 0);
    real_close(fd);
    if (!base) {
        say("cannot map the region %s: %s", path, strerror(errno));
        return NULL;
    }
    snprintf(regions[nregions].path, sizeof(regions[nregions].path), "%s", path);
    regions[nregions].base = base;
    regions[nregions].size = size;
    nregions++;
    return base;
}

static void ring_set_source(struct ring_emu *e, struct hybrid_map *m);
static void perf_map_served(int map_fd, struct hybrid_map *hm);

/* The attach reply: maps now served from a region. */
static void apply_region(const void *payload, uint32_t len)
{
    const struct msg_region *r = payload;
    const struct msg_region_map *m;
    void *base;

    if (!payload || len < sizeof(*r) || len < sizeof(*r) + (uint64_t)r->nmaps * sizeof(*m) || !r->nmaps)
        return;
    base = region_base(r->path, r->size);
    if (!base)
        return;
    m = (const void *)(r + 1);
    for (uint32_t i = 0; i < r->nmaps; i++) {
        struct fdinfo *f = fdi(m[i].fd);
        struct hybrid_map *hm = H.region_map(base, m[i].index);

        if (!f || !hm)
            continue;
        f->hmap = hm;
        if (f->emu)
            ring_set_source(f->emu, hm);
        if (f->map_type == BPF_MAP_TYPE_PERF_EVENT_ARRAY)
            perf_map_served(m[i].fd, hm);
    }
}

/* --- ring buffer emulation ---------------------------------------------------------------- */

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HDR 8u

struct ring_emu {
    int map_fd, memfd, efd;
    uint64_t size, page;
    volatile uint64_t *cons, *prod;   /* ours: page 0 (the loader writes it), page 1 */
    unsigned char *data;              /* ours, mapped twice */
    volatile uint64_t *kcons, *kprod; /* the kernel's ring of the map */
    unsigned char *kdata;
    struct hybrid_map *volatile hm;   /* the userspace ring, once a program runs in userspace */
    pthread_t thread;
    int stop;
};

static uint64_t round8(uint64_t n) { return (n + 7) & ~7ull; }

static void *map_twice(int fd, uint64_t off, uint64_t head, uint64_t size, int prot)
{
    /* [fd: off, off + head + size) then [fd: off + head, off + head + size) again: a kernel ringbuf view */
    unsigned char *va = real_mmap(NULL, head + 2 * size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (va == MAP_FAILED)
        return MAP_FAILED;
    if (real_mmap(va, head + size, prot, MAP_SHARED | MAP_FIXED, fd, off) == MAP_FAILED ||
        real_mmap(va + head + size, size, prot, MAP_SHARED | MAP_FIXED, fd, off + head) == MAP_FAILED) {
        munmap(va, head + 2 * size);
        return MAP_FAILED;
    }
    return va;
}

/* Copy one record into our ring; 0 when it is full (the loader must read first). */
static int emit(struct ring_emu *e, const unsigned char *src, uint32_t len)
{
    uint64_t prod = *e->prod, cons = __atomic_load_n(e->cons, __ATOMIC_ACQUIRE);
    uint64_t total = round8(len + RB_HDR);
    unsigned char *at = e->data + (prod & (e->size - 1));

    if (prod - cons + total > e->size)
        return 0;
    memcpy(at + RB_HDR, src, len);
    ((uint32_t *)at)[1] = 0;
    __atomic_store_n((uint32_t *)at, len, __ATOMIC_RELEASE);
    __atomic_store_n(e->prod, prod + total, __ATOMIC_RELEASE);
    return 1;
}

/* Move what ring (cons, prod, data, size) holds into ours: records moved, -1 when ours filled up. */
static long drain(struct ring_emu *e, volatile uint64_t *cons_p, volatile uint64_t *prod_p, unsigned char *data,
                  uint64_t size)
{
    uint64_t cons = __atomic_load_n(cons_p, __ATOMIC_ACQUIRE), prod = __atomic_load_n(prod_p, __ATOMIC_ACQUIRE);
    long n = 0;

    while (cons < prod) {
        unsigned char *rec = data + (cons & (size - 1));
        uint32_t hdr = __atomic_load_n((uint32_t *)rec, __ATOMIC_ACQUIRE);
        uint32_t len = hdr & ~(RB_BUSY | RB_DISCARD);

        if (hdr & RB_BUSY)
            break;
        if (!(hdr & RB_DISCARD)) {
            if (!emit(e, rec + RB_HDR, len))
                return n ? n : -1;
            n++;
        }
        cons += round8(len + RB_HDR);
        __atomic_store_n(cons_p, cons, __ATOMIC_RELEASE);
    }
    return n;
}

static void ring_set_source(struct ring_emu *e, struct hybrid_map *m)
{
    __atomic_store_n(&e->hm, m, __ATOMIC_RELEASE);
}

static void *forwarder(void *arg)
{
    struct ring_emu *e = arg;
    uint64_t one = 1;

    while (!__atomic_load_n(&e->stop, __ATOMIC_RELAXED)) {
        struct hybrid_map *hm = __atomic_load_n(&e->hm, __ATOMIC_ACQUIRE);
        long moved = 0, r;
        int full = 0;

        if (e->kcons) {
            r = drain(e, e->kcons, e->kprod, e->kdata, e->size);
            full |= r < 0;
            moved += r > 0 ? r : 0;
        }
        if (hm) {
            uint64_t a[4];

            if (H.ring_addresses(hm, 0, a) == 0) {
                r = drain(e, (volatile uint64_t *)(uintptr_t)a[0], (volatile uint64_t *)(uintptr_t)a[1],
                          (unsigned char *)(uintptr_t)a[2], a[3]);
                full |= r < 0;
                moved += r > 0 ? r : 0;
            }
        }
        if (moved) {
            if (write(e->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                break;
            continue;
        }
        if (full) { /* the loader has not read yet: wake it again and give it time */
            if (write(e->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                break;
            usleep(1000);
        } else if (hm) {
            H.ringbuf_wait(hm, 5);
            if (e->kcons) {
                struct pollfd p = {e->map_fd, POLLIN, 0};

                poll(&p, 1, 0);
            }
        } else {
            struct pollfd p = {e->map_fd, POLLIN, 0};

            poll(&p, 1, 50);
        }
    }
    return NULL;
}

static struct ring_emu *ring_emu_new(int map_fd)
{
    struct bpf_map_info info = {0};
    union bpf_attr attr = {0};
    struct ring_emu *e;
    uint64_t page = sysconf(_SC_PAGESIZE);

    attr.info.bpf_fd = map_fd;
    attr.info.info_len = sizeof(info);
    attr.info.info = (uintptr_t)&info;
    if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr)) < 0)
        return NULL;
    e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->map_fd = map_fd;
    e->size = info.max_entries;
    e->page = page;
    e->memfd = memfd_create("hybrid-ringbuf", MFD_CLOEXEC);
    e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->memfd < 0 || e->efd < 0 || ftruncate(e->memfd, 2 * page + e->size) < 0)
        goto fail;
    e->cons = real_mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, e->memfd, 0);
    e->prod = map_twice(e->memfd, page, page, e->size, PROT_READ | PROT_WRITE);
    if ((void *)e->cons == MAP_FAILED || (void *)e->prod == MAP_FAILED)
        goto fail;
    e->data = (unsigned char *)e->prod + page;
    /* the kernel's own ring of this map: kernel programs may write it too */
    e->kcons = real_mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
    e->kprod = map_twice(map_fd, page, page, e->size, PROT_READ);
    if ((void *)e->kcons == MAP_FAILED || (void *)e->kprod == MAP_FAILED) {
        e->kcons = NULL;
        e->kprod = NULL;
    } else {
        e->kdata = (unsigned char *)e->kprod + page;
    }
    if (!e->kcons) { /* the kernel view is a plain mapping of prod + data twice: retry the kernel's way */
        void *p = real_mmap(NULL, page + 2 * e->size, PROT_READ, MAP_SHARED, map_fd, page);
        void *c = real_mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);

        if (p != MAP_FAILED && c != MAP_FAILED) {
            e->kcons = c;
            e->kprod = p;
            e->kdata = (unsigned char *)p + page;
        }
    }
    if (pthread_create(&e->thread, NULL, forwarder, e))
        goto fail;
    return e;
fail:
    say("cannot set up the ring buffer of map fd %d: %s", map_fd, strerror(errno));
    free(e);
    return NULL;
}

/* --- perf buffer emulation ------------------------------------------------------------------
 *
 * libbpf's perf_buffer opens one BPF_OUTPUT perf event per CPU, mmaps it, and stores its fd in the
 * perf event array.  The event stays the kernel's (kernel programs write it); the loader mmaps a
 * perf ring of our own (a memfd: the perf_event_mmap_page, then the data pages), and a forwarder
 * copies into it the kernel event's records as they are and the userspace ring of the same map
 * entry as PERF_RECORD_SAMPLE records, with a PERF_RECORD_LOST for what the programs could not write.
 */

struct perf_emu {
    int fd, memfd, efd;
    uint64_t len, page;
    struct perf_event_mmap_page *ours, *kern;  /* kern: our own mapping of the kernel's event */
    int map_fd;                                /* the perf event array it was stored in (-1: not yet) */
    uint32_t index;                            /* its key there */
    struct hybrid_map *volatile hm;
    uint64_t pending_lost;
    pthread_t thread;
    int stop;
};

#define MAX_PEMU 1024
static struct perf_emu *pemus[MAX_PEMU];
static int npemus;

static int pemit(struct perf_emu *e, const void *a, uint32_t alen, const void *b, uint32_t blen, uint32_t total)
{
    uint64_t dsize = e->len - e->page, head = e->ours->data_head;
    uint64_t tail = __atomic_load_n(&e->ours->data_tail, __ATOMIC_ACQUIRE);
    unsigned char *data = (unsigned char *)e->ours + e->page;
    const void *parts[3] = {a, b, NULL};
    uint32_t lens[3] = {alen, blen, total - alen - blen};
    uint64_t at = head;

    if (head - tail + total > dsize)
        return 0;
    for (int p = 0; p < 3; p++) {
        uint32_t n = lens[p];
        const unsigned char *src = parts[p];

        while (n) {
            uint64_t off = at & (dsize - 1), chunk = dsize - off < n ? dsize - off : n;

            if (src) {
                memcpy(data + off, src, chunk);
                src += chunk;
            } else {
                memset(data + off, 0, chunk);
            }
            at += chunk;
            n -= chunk;
        }
    }
    __atomic_store_n(&e->ours->data_head, head + total, __ATOMIC_RELEASE);
    return 1;
}

static int pemit_sample(struct perf_emu *e, const unsigned char *data, uint32_t len)
{
    uint32_t raw = (uint32_t)(round8((uint64_t)len + 4) - 4);
    struct { struct perf_event_header h; uint32_t size; } __attribute__((packed)) hd = {
        {PERF_RECORD_SAMPLE, 0, (uint16_t)(sizeof(struct perf_event_header) + 4 + raw)}, raw};

    if (sizeof(struct perf_event_header) + 4 + raw > 0xffff)
        return 1; /* cannot be a perf record: the kernel refuses such outputs too */
    return pemit(e, &hd, sizeof(hd), data, len, hd.h.size);
}

static int pemit_lost(struct perf_emu *e, uint64_t lost)
{
    struct { struct perf_event_header h; uint64_t id, lost; } r = {{PERF_RECORD_LOST, 0, 24}, 0, lost};

    return pemit(e, &r, sizeof(r), NULL, 0, sizeof(r));
}

/* The kernel event's records, as they are: moved, -1 when ours filled up. */
static long pdrain_kernel(struct perf_emu *e)
{
    struct perf_event_mmap_page *k = e->kern;
    uint64_t dsize = e->len - e->page, head = __atomic_load_n(&k->data_head, __ATOMIC_ACQUIRE), tail = k->data_tail;
    unsigned char *data = (unsigned char *)k + e->page, buf[65536 + 8];
    long n = 0;

    while (tail < head) {
        struct perf_event_header h;
        uint64_t off;

        for (uint32_t i = 0; i < sizeof(h); i++)
            ((unsigned char *)&h)[i] = data[(tail + i) & (dsize - 1)];
        if (h.size < sizeof(h))
            break;
        off = tail & (dsize - 1);
        if (off + h.size <= dsize) {
            memcpy(buf, data + off, h.size);
        } else {
            memcpy(buf, data + off, dsize - off);
            memcpy(buf + (dsize - off), data, h.size - (dsize - off));
        }
        if (!pemit(e, buf, h.size, NULL, 0, h.size)) {
            n = n ? n : -1;
            break;
        }
        tail += h.size;
        n++;
    }
    __atomic_store_n(&k->data_tail, tail, __ATOMIC_RELEASE);
    return n;
}

/* The userspace ring of this entry: moved, -1 when ours filled up. */
static long pdrain_user(struct perf_emu *e, struct hybrid_map *hm)
{
    uint64_t a[4], cons, prod, size;
    unsigned char *data;
    long n = 0;

    if (H.ring_addresses(hm, e->index, a))
        return 0;
    cons = __atomic_load_n((uint64_t *)(uintptr_t)a[0], __ATOMIC_ACQUIRE);
    prod = __atomic_load_n((uint64_t *)(uintptr_t)a[1], __ATOMIC_ACQUIRE);
    data = (unsigned char *)(uintptr_t)a[2];
    size = a[3];
    e->pending_lost += H.perf_lost(hm, e->index, 1);
    if (e->pending_lost) {
        if (!pemit_lost(e, e->pending_lost))
            return -1;
        e->pending_lost = 0;
        n++;
    }
    while (cons < prod) {
        unsigned char *rec = data + (cons & (size - 1));
        uint32_t hdr = __atomic_load_n((uint32_t *)rec, __ATOMIC_ACQUIRE), len = hdr & ~(RB_BUSY | RB_DISCARD);

        if (hdr & RB_BUSY)
            break;
        if (!(hdr & RB_DISCARD)) {
            if (!pemit_sample(e, rec + RB_HDR, len))
                return n ? n : -1;
            n++;
        }
        cons += round8(len + RB_HDR);
        __atomic_store_n((uint64_t *)(uintptr_t)a[0], cons, __ATOMIC_RELEASE);
    }
    return n;
}

static void *perf_forwarder(void *arg)
{
    struct perf_emu *e = arg;
    uint64_t one = 1;

    while (!__atomic_load_n(&e->stop, __ATOMIC_RELAXED)) {
        struct hybrid_map *hm = __atomic_load_n(&e->hm, __ATOMIC_ACQUIRE);
        long moved = 0, r;
        int full = 0;

        if (e->kern) {
            r = pdrain_kernel(e);
            full |= r < 0;
            moved += r > 0 ? r : 0;
        }
        if (hm) {
            r = pdrain_user(e, hm);
            full |= r < 0;
            moved += r > 0 ? r : 0;
        }
        if (moved || full) {
            if (write(e->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                break;
            if (!moved)
                usleep(1000);
            continue;
        }
        if (hm) {
            H.perf_wait(hm, 5);
        } else {
            struct pollfd p = {e->fd, POLLIN, 0};

            poll(&p, 1, 50);
        }
    }
    return NULL;
}

static struct perf_emu *perf_emu_new(int fd, uint64_t len)
{
    struct perf_emu *e = calloc(1, sizeof(*e));
    uint64_t page = sysconf(_SC_PAGESIZE);

    if (!e || npemus == MAX_PEMU || len < 2 * page || ((len - page) & (len - page - 1)))
        goto fail;
    e->fd = fd;
    e->len = len;
    e->page = page;
    e->map_fd = -1;
    e->memfd = memfd_create("hybrid-perfbuf", MFD_CLOEXEC);
    e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->memfd < 0 || e->efd < 0 || ftruncate(e->memfd, len) < 0)
        goto fail;
    e->ours = real_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, e->memfd, 0);
    if (e->ours == MAP_FAILED)
        goto fail;
    e->ours->data_offset = page;
    e->ours->data_size = len - page;
    e->kern = real_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (e->kern == MAP_FAILED)
        e->kern = NULL;
    if (pthread_create(&e->thread, NULL, perf_forwarder, e))
        goto fail;
    pemus[npemus++] = e;
    return e;
fail:
    say("cannot set up the perf buffer of perf event fd %d: %s", fd, strerror(errno));
    free(e);
    return NULL;
}

static void perf_enable(struct perf_emu *e, struct hybrid_map *hm)
{
    uint32_t v = (uint32_t)e->fd;

    /* a userspace perf event array entry takes records once set (as the kernel's, with an event) */
    H.update(hm, &e->index, &v, BPF_ANY);
    __atomic_store_n(&e->hm, hm, __ATOMIC_RELEASE);
}

static void perf_map_served(int map_fd, struct hybrid_map *hm)
{
    for (int i = 0; i < npemus; i++)
        if (pemus[i] && pemus[i]->map_fd == map_fd)
            perf_enable(pemus[i], hm);
}

/* The loader stores (or removes) a perf event in a perf event array. */
static void perf_stored(struct fdinfo *mf, int map_fd, uint32_t key, int event_fd, int cmd)
{
    struct fdinfo *ef = known(event_fd);

    if (cmd == BPF_MAP_DELETE_ELEM) {
        for (int i = 0; i < npemus; i++)
            if (pemus[i] && pemus[i]->map_fd == map_fd && pemus[i]->index == key) {
                __atomic_store_n(&pemus[i]->hm, NULL, __ATOMIC_RELEASE);
                pemus[i]->map_fd = -1;
            }
        if (mf->hmap)
            H.del(mf->hmap, &key);
        return;
    }
    if (!ef || ef->kind != FD_PERFOUT || !ef->pemu)
        return;
    ef->pemu->map_fd = map_fd;
    ef->pemu->index = key;
    if (mf->hmap)
        perf_enable(ef->pemu, mf->hmap);
}

/* --- bpf() -------------------------------------------------------------------------------- */

static int good_fd(long fd)
{
    /* as libbpf's ensure_good_fd, so the number we report is the one the loader keeps */
    if (fd >= 0 && fd < 3) {
        int nfd = fcntl((int)fd, F_DUPFD_CLOEXEC, 3);

        if (nfd >= 0) {
            real_close((int)fd);
            return nfd;
        }
    }
    return (int)fd;
}

static long fail_errno(long e)
{
    errno = (int)-e;
    return -1;
}

static uint32_t possible_cpus(void)
{
    static uint32_t n;
    char buf[256] = "";
    int fd;

    if (n)
        return n;
    fd = open("/sys/devices/system/cpu/possible", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t r = read(fd, buf, sizeof(buf) - 1);

        real_close(fd);
        buf[r > 0 ? r : 0] = 0;
    }
    for (char *p = buf; *p;) { /* "0-3,5,7-8": the highest number + 1 */
        long a = strtol(p, &p, 10), b = a;

        if (*p == '-')
            b = strtol(p + 1, &p, 10);
        if ((uint32_t)b + 1 > n)
            n = (uint32_t)b + 1;
        if (*p != ',')
            break;
        p++;
    }
    if (!n)
        n = 1;
    return n;
}

static int is_percpu(uint32_t type)
{
    return type == BPF_MAP_TYPE_PERCPU_HASH || type == BPF_MAP_TYPE_PERCPU_ARRAY ||
           type == BPF_MAP_TYPE_LRU_PERCPU_HASH || type == BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE;
}

/* The BPF_MAP_*_BATCH commands over the element operations, with the kernel's contract: `count`
 * in, elements done out; -ENOENT once the end is reached (with what was copied); the batch token is
 * a u32 position (how many keys earlier calls returned). */
static long served_batch(int cmd, union bpf_attr *attr, struct fdinfo *f)
{
    uint32_t want = attr->batch.count, ks = f->key_size, done = 0, pos = 0;
    uint64_t vs = is_percpu(f->map_type) ? round8(f->value_size) * possible_cpus() : f->value_size;
    unsigned char *keys = (unsigned char *)(uintptr_t)attr->batch.keys;
    unsigned char *vals = (unsigned char *)(uintptr_t)attr->batch.values;
    unsigned char *cur, *next;
    long rc = 0;
    int have = 0;

    attr->batch.count = 0;
    if (!want || !keys)
        return -EINVAL;
    if (cmd == BPF_MAP_UPDATE_BATCH || cmd == BPF_MAP_DELETE_BATCH) {
        for (; done < want; done++) {
            rc = cmd == BPF_MAP_UPDATE_BATCH ? H.update(f->hmap, keys + (uint64_t)done * ks, vals + done * vs,
                                                        attr->batch.elem_flags)
                                             : H.del(f->hmap, keys + (uint64_t)done * ks);
            if (rc)
                break;
        }
        attr->batch.count = done;
        return rc;
    }
    if (!vals)
        return -EINVAL;
    if (attr->batch.in_batch && cmd == BPF_MAP_LOOKUP_BATCH)
        memcpy(&pos, (void *)(uintptr_t)attr->batch.in_batch, sizeof(pos));
    cur = malloc(ks);
    next = malloc(ks);
    if (!cur || !next) {
        free(cur);
        free(next);
        return -ENOMEM;
    }
    /* keys first (a deleted key would restart the walk), skipping those earlier calls returned */
    for (uint32_t skipped = 0; done < want;) {
        if (H.next_key(f->hmap, have ? cur : NULL, next) < 0) {
            rc = -ENOENT;
            break;
        }
        memcpy(cur, next, ks);
        have = 1;
        if (skipped < pos) {
            skipped++;
            continue;
        }
        memcpy(keys + (uint64_t)done * ks, cur, ks);
        done++;
    }
    for (uint32_t i = 0; i < done; i++) {
        long r = H.lookup_copy(f->hmap, keys + (uint64_t)i * ks, vals + i * vs);

        if (r == 0 && cmd == BPF_MAP_LOOKUP_AND_DELETE_BATCH)
            r = H.del(f->hmap, keys + (uint64_t)i * ks);
        if (r < 0) { /* gone since the walk (a program deleted it): drop it from the answer */
            memmove(keys + (uint64_t)i * ks, keys + (uint64_t)(i + 1) * ks, (uint64_t)(done - i - 1) * ks);
            memmove(vals + i * vs, vals + (i + 1) * vs, (done - i - 1) * vs);
            done--;
            i--;
        }
    }
    free(cur);
    free(next);
    attr->batch.count = done;
    if (attr->batch.out_batch) {
        uint32_t out = cmd == BPF_MAP_LOOKUP_BATCH ? pos + done : 0;

        memcpy((void *)(uintptr_t)attr->batch.out_batch, &out, sizeof(out));
    }
    return rc;
}

static long served_map_op(int cmd, union bpf_attr *attr, struct fdinfo *f)
{
    void *key = (void *)(uintptr_t)attr->key;
    void *val = (void *)(uintptr_t)attr->value;
    long rc;

    switch (cmd) {
    case BPF_MAP_LOOKUP_ELEM:
        rc = H.lookup_copy(f->hmap, key, val);
        break;
    case BPF_MAP_UPDATE_ELEM:
        rc = H.update(f->hmap, key, val, attr->flags);
        break;
    case BPF_MAP_DELETE_ELEM:
        rc = H.del(f->hmap, key);
        break;
    case BPF_MAP_GET_NEXT_KEY:
        rc = H.next_key(f->hmap, key, (void *)(uintptr_t)attr->next_key);
        break;
    case BPF_MAP_LOOKUP_AND_DELETE_ELEM:
        if (f->map_type == BPF_MAP_TYPE_QUEUE || f->map_type == BPF_MAP_TYPE_STACK) {
            rc = H.pop(f->hmap, val);
        } else {
            rc = H.lookup_copy(f->hmap, key, val);
            if (rc == 0)
                rc = H.del(f->hmap, key);
        }
        break;
    case BPF_MAP_LOOKUP_BATCH:
    case BPF_MAP_LOOKUP_AND_DELETE_BATCH:
    case BPF_MAP_UPDATE_BATCH:
    case BPF_MAP_DELETE_BATCH:
        rc = served_batch(cmd, attr, f);
        break;
    default:
        rc = -EINVAL;
    }
    return rc < 0 ? fail_errno(rc) : rc;
}

static long attach_to(int perf_fd, int prog_fd, uint64_t cookie, uint32_t kind, int *kernel)
{
    struct fdinfo *f = known(perf_fd);
    struct msg_attach a = {f->handle, prog_fd, kind, cookie};
    void *out = NULL;
    uint32_t outlen = 0;
    int64_t rc;

    *kernel = 0;
    pthread_mutex_lock(&lock);
    rc = ctl_call(OP_ATTACH, &a, sizeof(a), NULL, 0, &out, &outlen);
    if (rc == 0)
        apply_region(out, outlen);
    pthread_mutex_unlock(&lock);
    if (rc < 0 && out && outlen)
        say("%s", (char *)out);
    free(out);
    if (rc == 1) {
        /* the program cannot run in userspace: the kernel's event in place of the placeholder */
        struct msg_perf *p = f->perf;
        int real;

        if (p->attr_size >= 24 && ((struct perf_event_attr *)p->attr)->type != PERF_TYPE_TRACEPOINT &&
            f->path)
            ((struct perf_event_attr *)p->attr)->config1 = (uintptr_t)f->path;
        real = (int)real_syscall(__NR_perf_event_open, p->attr, p->pid, p->cpu, -1, p->flags);
        if (real < 0)
            return -1;
        if (dup3(real, perf_fd, O_CLOEXEC) < 0) {
            int e = errno;

            real_close(real);
            errno = e;
            return -1;
        }
        real_close(real);
        pthread_mutex_lock(&lock);
        ctl_call(OP_CLOSE, &f->handle, sizeof(f->handle), NULL, 0, NULL, NULL);
        free(f->perf);
        free(f->path);
        memset(f, 0, sizeof(*f));
        pthread_mutex_unlock(&lock);
        *kernel = 1;
        return 0;
    }
    return rc < 0 ? fail_errno(rc) : 0;
}

/* A program attached in the kernel: 0, or -errno when its maps already serve userspace programs. */
static int64_t note_kernel_attach(int prog_fd)
{
    struct fdinfo *pf = known(prog_fd);
    int64_t rc = 0;

    if (pf && pf->kind == FD_PROG) {
        struct msg_fd m = {prog_fd, 0};
        void *out = NULL;

        pthread_mutex_lock(&lock);
        rc = ctl_call(OP_KATTACH, &m, sizeof(m), NULL, 0, &out, NULL);
        pthread_mutex_unlock(&lock);
        if (rc < 0 && out)
            say("%s", (char *)out);
        free(out);
    }
    return rc == -ENOTCONN ? 0 : rc;
}

static long do_bpf(int cmd, union bpf_attr *attr, unsigned int size)
{
    struct fdinfo *f;
    int64_t rc;
    long fd;

    switch (cmd) {
    case BPF_MAP_CREATE:
        fd = good_fd(sys_bpf(cmd, attr, size));
        if (fd >= 0 && (f = fdi((int)fd))) {
            struct msg_fd m = {(int)fd, 0};

            pthread_mutex_lock(&lock);
            memset(f, 0, sizeof(*f));
            f->kind = FD_MAP;
            f->map_type = attr->map_type;
            f->key_size = attr->key_size;
            f->value_size = attr->value_size;
            ctl_call(OP_MAP, &m, sizeof(m), NULL, 0, NULL, NULL);
            pthread_mutex_unlock(&lock);
        }
        return fd;
    case BPF_PROG_LOAD:
        fd = good_fd(sys_bpf(cmd, attr, size));
        if (fd >= 0 && (attr->prog_type == BPF_PROG_TYPE_KPROBE || attr->prog_type == BPF_PROG_TYPE_TRACEPOINT) &&
            (f = fdi((int)fd))) {
            struct msg_prog m = {(int)fd, attr->prog_type, attr->expected_attach_type, attr->insn_cnt, {0}};

            memcpy(m.name, attr->prog_name, sizeof(m.name));
            pthread_mutex_lock(&lock);
            memset(f, 0, sizeof(*f));
            f->kind = FD_PROG;
            ctl_call(OP_PROG, &m, sizeof(m), (void *)(uintptr_t)attr->insns, attr->insn_cnt * 8u, NULL, NULL);
            pthread_mutex_unlock(&lock);
        }
        return fd;
    case BPF_LINK_CREATE:
        f = known(attr->link_create.target_fd);
        if (f && f->kind == FD_PERF && attr->link_create.attach_type == BPF_PERF_EVENT) {
            uint64_t cookie = size >= offsetof(union bpf_attr, link_create.perf_event.bpf_cookie) + 8
                                  ? attr->link_create.perf_event.bpf_cookie : 0;
            int kernel, lfd;
            uint64_t handle = f->handle;

            if (attach_to(attr->link_create.target_fd, attr->link_create.prog_fd, cookie, 1, &kernel) < 0)
                return -1;
            if (kernel)
                return good_fd(sys_bpf(cmd, attr, size));
            lfd = good_fd(eventfd(0, EFD_CLOEXEC));
            if (lfd < 0 || !(f = fdi(lfd))) {
                pthread_mutex_lock(&lock);
                ctl_call(OP_CLOSE, &handle, sizeof(handle), NULL, 0, NULL, NULL);
                pthread_mutex_unlock(&lock);
                return fail_errno(-EMFILE);
            }
            memset(f, 0, sizeof(*f));
            f->kind = FD_LINK;
            f->handle = handle;
            known(attr->link_create.target_fd)->handle = 0; /* the link owns the attachment now */
            return lfd;
        }
        if ((rc = note_kernel_attach(attr->link_create.prog_fd)) < 0)
            return fail_errno(rc);
        return good_fd(sys_bpf(cmd, attr, size));
    case BPF_RAW_TRACEPOINT_OPEN:
        if ((rc = note_kernel_attach(attr->raw_tracepoint.prog_fd)) < 0)
            return fail_errno(rc);
        return good_fd(sys_bpf(cmd, attr, size));
    case BPF_MAP_LOOKUP_ELEM:
    case BPF_MAP_UPDATE_ELEM:
    case BPF_MAP_DELETE_ELEM:
    case BPF_MAP_GET_NEXT_KEY:
    case BPF_MAP_LOOKUP_AND_DELETE_ELEM:
    case BPF_MAP_LOOKUP_BATCH:
    case BPF_MAP_LOOKUP_AND_DELETE_BATCH:
    case BPF_MAP_UPDATE_BATCH:
    case BPF_MAP_DELETE_BATCH:
        /* the batch commands keep the map fd after their pointers, not at the start */
        f = known(cmd >= BPF_MAP_LOOKUP_BATCH && cmd <= BPF_MAP_DELETE_BATCH ? (int)attr->batch.map_fd
                                                                            : (int)attr->map_fd);
        if (f && f->kind == FD_MAP && f->map_type == BPF_MAP_TYPE_PERF_EVENT_ARRAY &&
            (cmd == BPF_MAP_UPDATE_ELEM || cmd == BPF_MAP_DELETE_ELEM)) {
            /* the kernel's entry (kernel programs write it), and where the loader's buffer is fed from */
            uint32_t key;
            int32_t val = -1;
            long rc2 = sys_bpf(cmd, attr, size);

            if (rc2 == 0 && attr->key) {
                memcpy(&key, (void *)(uintptr_t)attr->key, 4);
                if (cmd == BPF_MAP_UPDATE_ELEM && attr->value)
                    memcpy(&val, (void *)(uintptr_t)attr->value, 4);
                pthread_mutex_lock(&lock);
                perf_stored(f, attr->map_fd, key, val, cmd);
                pthread_mutex_unlock(&lock);
            }
            return rc2;
        }
        if (f && f->kind == FD_MAP && f->hmap)
            return served_map_op(cmd, attr, f);
        return sys_bpf(cmd, attr, size);
    default:
        return sys_bpf(cmd, attr, size);
    }
}

/* --- perf_event_open ---------------------------------------------------------------------- */

static int uprobe_pmu = -2;

static int uprobe_type(void)
{
    if (uprobe_pmu == -2) {
        char buf[32] = "";
        int fd = open("/sys/bus/event_source/devices/uprobe/type", O_RDONLY | O_CLOEXEC);

        uprobe_pmu = -1;
        if (fd >= 0) {
            if (read(fd, buf, sizeof(buf) - 1) > 0)
                uprobe_pmu = atoi(buf);
            real_close(fd);
        }
    }
    return uprobe_pmu;
}

static long do_perf_event_open(struct perf_event_attr *attr, int pid, int cpu, int group_fd, unsigned long flags)
{
    struct msg_perf m = {pid, cpu, (uint32_t)flags, 0, {0}};
    const char *path = NULL;
    struct fdinfo *f;
    int64_t handle;
    int fd;

    if (attr && attr->type == PERF_TYPE_SOFTWARE && attr->config == PERF_COUNT_SW_BPF_OUTPUT) {
        fd = (int)real_syscall(__NR_perf_event_open, attr, pid, cpu, group_fd, flags);
        if (fd >= 0 && (f = fdi(fd))) {
            pthread_mutex_lock(&lock);
            memset(f, 0, sizeof(*f));
            f->kind = FD_PERFOUT;
            pthread_mutex_unlock(&lock);
        }
        return fd;
    }
    if (!attr || (attr->type != PERF_TYPE_TRACEPOINT && (int)attr->type != uprobe_type()) || group_fd != -1)
        return real_syscall(__NR_perf_event_open, attr, pid, cpu, group_fd, flags);
    m.attr_size = attr->size && attr->size <= sizeof(m.attr) ? attr->size : sizeof(m.attr);
    memcpy(m.attr, attr, m.attr_size < sizeof(*attr) ? m.attr_size : sizeof(*attr));
    if (attr->type != PERF_TYPE_TRACEPOINT)
        path = (const char *)(uintptr_t)attr->config1;
    pthread_mutex_lock(&lock);
    handle = ctl_call(OP_PERF, &m, sizeof(m), path ? path : "", path ? strlen(path) + 1 : 1, NULL, NULL);
    pthread_mutex_unlock(&lock);
    if (handle <= 0)
        return real_syscall(__NR_perf_event_open, attr, pid, cpu, group_fd, flags);
    fd = good_fd(eventfd(0, (flags & PERF_FLAG_FD_CLOEXEC) ? EFD_CLOEXEC : 0));
    if (fd < 0 || !(f = fdi(fd))) {
        pthread_mutex_lock(&lock);
        ctl_call(OP_CLOSE, &handle, sizeof(handle), NULL, 0, NULL, NULL);
        pthread_mutex_unlock(&lock);
        return fail_errno(-EMFILE);
    }
    memset(f, 0, sizeof(*f));
    f->kind = FD_PERF;
    f->handle = (uint64_t)handle;
    f->perf = malloc(sizeof(m));
    if (f->perf)
        memcpy(f->perf, &m, sizeof(m));
    f->path = path ? strdup(path) : NULL;
    return fd;
}

/* --- the interposed functions ------------------------------------------------------------- */

long syscall(long nr, ...)
{
    va_list ap;
    long a[6];

    INIT();
    va_start(ap, nr);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (nr == __NR_bpf)
        return do_bpf((int)a[0], (union bpf_attr *)a[1], (unsigned int)a[2]);
    if (nr == __NR_perf_event_open)
        return do_perf_event_open((struct perf_event_attr *)a[0], (int)a[1], (int)a[2], (int)a[3],
                                  (unsigned long)a[4]);
    return real_syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    void *arg;
    struct fdinfo *f;

    INIT();
    va_start(ap, req);
    arg = va_arg(ap, void *);
    va_end(ap);
    f = known(fd);
    if (f && f->kind == FD_PERF) {
        if (req == PERF_EVENT_IOC_SET_BPF) {
            int kernel;

            if (attach_to(fd, (int)(uintptr_t)arg, 0, 2, &kernel) < 0)
                return -1;
            if (kernel)
                return real_ioctl(fd, req, arg);
            return 0;
        }
        if (req == PERF_EVENT_IOC_ENABLE || req == PERF_EVENT_IOC_DISABLE)
            return 0;
        errno = ENOTTY;
        return -1;
    }
    if (req == PERF_EVENT_IOC_SET_BPF) {
        int64_t rc = note_kernel_attach((int)(uintptr_t)arg);

        if (rc < 0)
            return (int)fail_errno(rc);
    }
    return real_ioctl(fd, req, arg);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    struct fdinfo *f;

    INIT();
    f = known(fd);
    if (f && f->kind == FD_MAP && f->map_type == BPF_MAP_TYPE_RINGBUF) {
        pthread_mutex_lock(&lock);
        if (!f->ring_decided) {
            struct msg_fd m = {fd, 0};

            f->ring_decided = 1;
            if (ctl_call(OP_RING, &m, sizeof(m), NULL, 0, NULL, NULL) == 1) {
                f->emu = ring_emu_new(fd);
                if (f->emu && f->hmap)
                    ring_set_source(f->emu, f->hmap);
            }
        }
        pthread_mutex_unlock(&lock);
        if (f->emu) {
            struct ring_emu *e = f->emu;

            if (off == 0 && len <= e->page)
                return real_mmap(addr, len, prot, flags, e->memfd, 0);
            if ((uint64_t)off == e->page && len == e->page + 2 * e->size && !(prot & PROT_WRITE))
                return map_twice(e->memfd, e->page, e->page, e->size, prot);
            errno = EINVAL;
            return MAP_FAILED;
        }
    }
    if (f && f->kind == FD_PERFOUT && off == 0) {
        pthread_mutex_lock(&lock);
        if (!f->ring_decided) {
            struct msg_fd m = {fd, 0};

            f->ring_decided = 1;
            if (ctl_call(OP_PERFBUF, &m, sizeof(m), NULL, 0, NULL, NULL) == 1 && load_agent() == 0)
                f->pemu = perf_emu_new(fd, len);
        }
        pthread_mutex_unlock(&lock);
        if (f->pemu) {
            if (len != f->pemu->len) {
                errno = EINVAL;
                return MAP_FAILED;
            }
            return real_mmap(addr, len, prot, flags, f->pemu->memfd, 0);
        }
    }
    return real_mmap(addr, len, prot, flags, fd, off);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    struct fdinfo *f;

    INIT();
    f = known(fd);
    if (f && (f->emu || f->pemu)) {
        struct epoll_event e2;

        if (ev) {
            e2 = *ev;
            e2.events |= EPOLLET;
            ev = &e2;
        }
        return real_epoll_ctl(epfd, op, f->emu ? f->emu->efd : f->pemu->efd, ev);
    }
    return real_epoll_ctl(epfd, op, fd, ev);
}

int close(int fd)
{
    struct fdinfo *f;

    INIT();
    f = known(fd);
    if (f) {
        pthread_mutex_lock(&lock);
        if ((f->kind == FD_PERF || f->kind == FD_LINK) && f->handle) {
            ctl_call(OP_CLOSE, &f->handle, sizeof(f->handle), NULL, 0, NULL, NULL);
        } else if (f->kind == FD_MAP || f->kind == FD_PROG) {
            struct msg_fd m = {fd, 0};

            ctl_call(OP_FORGET, &m, sizeof(m), NULL, 0, NULL, NULL);
        }
        if (f->emu) {
            /* the forwarder keeps its own mappings; stop it before the map fd goes */
            __atomic_store_n(&f->emu->stop, 1, __ATOMIC_RELAXED);
            pthread_join(f->emu->thread, NULL);
        }
        if (f->pemu) {
            __atomic_store_n(&f->pemu->stop, 1, __ATOMIC_RELAXED);
            pthread_join(f->pemu->thread, NULL);
            for (int i = 0; i < npemus; i++)
                if (pemus[i] == f->pemu)
                    pemus[i] = NULL;
        }
        free(f->perf);
        free(f->path);
        memset(f, 0, sizeof(*f));
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}

/* libbpf is built with large-file support: it calls mmap64 (the same function on 64-bit). */
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap(addr, len, prot, flags, fd, off);
}
