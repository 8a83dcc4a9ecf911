/* gm-diskbench: an in-guest disk writer for the geomirror disk benchmark (bench/disk.py).
 *
 * Usage: gm-diskbench FILE MB PLAN
 * Makes FILE MB MiB long (written once with zeros, O_DIRECT, then fdatasync: the blocks are
 * allocated before anything is measured), then runs PLAN, comma-separated phases:
 *   idle:SECONDS                       nothing (the disk idle, for pauses against a busy disk)
 *   randwrite:BS:SECONDS[:DEPTH]       BS-byte writes at uniformly random BS-aligned offsets
 *   write:BS:SECONDS[:DEPTH]           BS-byte writes in order through the file, wrapping
 * BS is bytes or with a k suffix (4k, 64k), a multiple of 4096 dividing the file; DEPTH (default
 * 1) threads each with one write in flight (pwrite on an O_DIRECT descriptor, as fio's psync
 * engine). Each write carries fresh pseudo-random bytes (xorshift64), so nothing on the way can
 * compress it. On stdout (the console), one line per event:
 *   GM-DISKBENCH prefill mb=MB seconds=S
 *   GM-DISKBENCH start I KIND bs=BS depth=D seconds=S
 *   GM-DISKBENCH done I KIND ios=N bytes=B seconds=S
 *   GM-DISKBENCH end
 *   GM-DISKBENCH error <sentence>
 * `seconds` in `done` is the guest's own clock, which stands still while the VM is stopped
 * (checkpoints): the benchmark times the phases by when the host saw these lines.
 * Built with `gcc -static -O2` by geomirror.disk_image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096
#define MAX_PHASES 32
#define MAX_DEPTH 64
#define PREFILL_BS (1 << 20)

enum kind { IDLE, RANDWRITE, WRITE };
static const char *kind_name[] = {"idle", "randwrite", "write"};

struct phase {
    enum kind kind;
    long bs;
    double seconds;
    int depth;
};

static int fd = -1;
static long nblocks_of_bs;  /* file size / bs of the running phase */
static long cur_bs;
static enum kind cur_kind;
static volatile int stop_flag;
static uint64_t seq_next; /* the next block for WRITE (atomic) */

struct worker {
    pthread_t t;
    uint64_t rng;
    uint64_t ios;
    int err;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void *run_worker(void *arg)
{
    struct worker *w = arg;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, ALIGN, (size_t)cur_bs) != 0) {
        w->err = ENOMEM;
        return NULL;
    }
    uint64_t *words = (uint64_t *)buf;
    size_t nwords = (size_t)cur_bs / 8;
    while (!stop_flag) {
        for (size_t i = 0; i < nwords; i++)
            words[i] = xorshift64(&w->rng);
        uint64_t block;
        if (cur_kind == RANDWRITE)
            block = xorshift64(&w->rng) % (uint64_t)nblocks_of_bs;
        else
            block = __atomic_fetch_add(&seq_next, 1, __ATOMIC_RELAXED) % (uint64_t)nblocks_of_bs;
        if (pwrite(fd, buf, (size_t)cur_bs, (off_t)(block * (uint64_t)cur_bs)) != cur_bs) {
            w->err = errno ? errno : EIO;
            break;
        }
        w->ios++;
    }
    free(buf);
    return NULL;
}

static int parse_long(const char *s, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || errno || v <= 0)
        return -1;
    if (*end == 'k' || *end == 'K') {
        v *= 1024;
        end++;
    }
    if (*end != '\0')
        return -1;
    *out = v;
    return 0;
}

static int parse_seconds(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || !(v > 0) || v > 86400)
        return -1;
    *out = v;
    return 0;
}

/* One phase "kind:a:b[:c]" -> p; -1 and a sentence in err otherwise. */
static int parse_phase(char *text, long file_bytes, struct phase *p, char *err, size_t cap)
{
    char *f[5];
    int n = 0;
    for (char *save = NULL, *tok = strtok_r(text, ":", &save); tok && n < 5; tok = strtok_r(NULL, ":", &save))
        f[n++] = tok;
    if (n == 2 && strcmp(f[0], "idle") == 0) {
        *p = (struct phase){.kind = IDLE, .bs = 0, .depth = 0};
        if (parse_seconds(f[1], &p->seconds) == 0)
            return 0;
    } else if ((n == 3 || n == 4) && (strcmp(f[0], "randwrite") == 0 || strcmp(f[0], "write") == 0)) {
        long depth = 1;
        *p = (struct phase){.kind = strcmp(f[0], "randwrite") == 0 ? RANDWRITE : WRITE};
        if (parse_long(f[1], &p->bs) == 0 && parse_seconds(f[2], &p->seconds) == 0
            && (n == 3 || parse_long(f[3], &depth) == 0)) {
            if (p->bs % ALIGN || file_bytes % p->bs) {
                snprintf(err, cap, "block size %ld is not a multiple of %d dividing the file", p->bs, ALIGN);
                return -1;
            }
            if (depth > MAX_DEPTH) {
                snprintf(err, cap, "depth %ld is over %d", depth, MAX_DEPTH);
                return -1;
            }
            p->depth = (int)depth;
            return 0;
        }
    }
    snprintf(err, cap, "phase is not idle:S, randwrite:BS:S[:DEPTH] or write:BS:S[:DEPTH]");
    return -1;
}

static int prefill(long file_bytes)
{
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size == file_bytes && st.st_blocks * 512 >= file_bytes)
        return 0; /* made by an earlier run on this disk */
    unsigned char *buf;
    if (posix_memalign((void **)&buf, ALIGN, PREFILL_BS) != 0)
        return -1;
    memset(buf, 0, PREFILL_BS);
    for (long off = 0; off < file_bytes; off += PREFILL_BS) {
        size_t len = (size_t)(file_bytes - off < PREFILL_BS ? file_bytes - off : PREFILL_BS);
        if (pwrite(fd, buf, len, off) != (ssize_t)len) {
            free(buf);
            return -1;
        }
    }
    free(buf);
    return fdatasync(fd);
}

int main(int argc, char **argv)
{
    long mb;
    if (argc != 4 || parse_long(argv[2], &mb) != 0) {
        fprintf(stderr, "usage: gm-diskbench FILE MB PLAN\n");
        return 2;
    }
    long file_bytes = mb << 20;
    struct phase phases[MAX_PHASES];
    int np = 0;
    char err[160];
    char *plan = strdup(argv[3]);
    for (char *save = NULL, *tok = strtok_r(plan, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (np == MAX_PHASES) {
            printf("GM-DISKBENCH error more than %d phases\n", MAX_PHASES);
            return 2;
        }
        char *copy = strdup(tok);
        if (parse_phase(copy, file_bytes, &phases[np], err, sizeof err) != 0) {
            printf("GM-DISKBENCH error %s: %s\n", tok, err);
            return 2;
        }
        free(copy);
        np++;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    fd = open(argv[1], O_RDWR | O_CREAT | O_DIRECT, 0600);
    if (fd < 0) {
        printf("GM-DISKBENCH error cannot open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    double t0 = now_s();
    if (prefill(file_bytes) != 0) {
        printf("GM-DISKBENCH error cannot write %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    printf("GM-DISKBENCH prefill mb=%ld seconds=%.3f\n", mb, now_s() - t0);

    struct worker workers[MAX_DEPTH];
    for (int i = 0; i < np; i++) {
        struct phase *p = &phases[i];
        printf("GM-DISKBENCH start %d %s bs=%ld depth=%d seconds=%g\n", i, kind_name[p->kind], p->bs, p->depth,
               p->seconds);
        double t = now_s();
        uint64_t ios = 0;
        int failed = 0;
        if (p->kind == IDLE) {
            struct timespec d = {(time_t)p->seconds, (long)((p->seconds - (double)(time_t)p->seconds) * 1e9)};
            while (nanosleep(&d, &d) != 0 && errno == EINTR)
                ;
        } else {
            cur_bs = p->bs;
            cur_kind = p->kind;
            nblocks_of_bs = file_bytes / p->bs;
            stop_flag = 0;
            for (int k = 0; k < p->depth; k++) {
                workers[k] = (struct worker){.rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(i * MAX_DEPTH + k + 1)};
                if (pthread_create(&workers[k].t, NULL, run_worker, &workers[k]) != 0) {
                    printf("GM-DISKBENCH error cannot start a writer thread\n");
                    return 1;
                }
            }
            struct timespec d = {(time_t)p->seconds, (long)((p->seconds - (double)(time_t)p->seconds) * 1e9)};
            while (nanosleep(&d, &d) != 0 && errno == EINTR)
                ;
            stop_flag = 1;
            for (int k = 0; k < p->depth; k++) {
                pthread_join(workers[k].t, NULL);
                ios += workers[k].ios;
                if (workers[k].err && !failed) {
                    failed = workers[k].err;
                }
            }
        }
        double el = now_s() - t;
        if (failed) {
            printf("GM-DISKBENCH error phase %d %s: write failed: %s\n", i, kind_name[p->kind], strerror(failed));
            return 1;
        }
        printf("GM-DISKBENCH done %d %s ios=%llu bytes=%llu seconds=%.3f\n", i, kind_name[p->kind],
               (unsigned long long)ios, (unsigned long long)(ios * (uint64_t)p->bs), el);
    }
    printf("GM-DISKBENCH end\n");
    close(fd);
    return 0;
}
