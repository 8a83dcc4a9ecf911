/* gm-dirty: a memory-writing workload for the geomirror guest.
 *
 * Usage: gm-dirty MB PAGES_PER_S
 * Keeps a buffer of MB megabytes and, forever, writes a growing counter into
 * one word of PAGES_PER_S pages a second, cycling through the buffer, so that
 * every pass leaves each page with new content (the checkpointer sees it dirty).
 * Built with `gcc -static -O2` by geomirror.image.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define TICKS_PER_S 100

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_count(const char *s, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 0)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    long mb, pps;
    if (argc != 3 || parse_count(argv[1], &mb) || parse_count(argv[2], &pps) || mb == 0) {
        fprintf(stderr, "usage: gm-dirty MB PAGES_PER_S (MB > 0, PAGES_PER_S >= 0)\n");
        return 2;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t npages = (size_t)mb * 1024 * 1024 / page;
    unsigned char *buf = mmap(NULL, npages * page, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("gm-dirty: mmap");
        return 1;
    }
    printf("gm-dirty: started mb=%ld pages_per_s=%ld pages=%zu\n", mb, pps, npages);
    fflush(stdout);

    uint64_t counter = 0; /* pages written so far; also the value written */
    size_t idx = 0;
    double start = now_s();
    struct timespec tick = {0, 1000000000L / TICKS_PER_S};
    for (;;) {
        double owed = (now_s() - start) * (double)pps;
        /* After a long stall (e.g. the VM was paused) do not burst: drop the backlog. */
        if (owed - (double)counter > (double)pps) {
            counter = (uint64_t)owed - (uint64_t)(pps / TICKS_PER_S);
        }
        while ((double)counter < owed) {
            uint64_t *word = (uint64_t *)(buf + idx * page);
            *word = counter + 1;
            idx = (idx + 1) % npages;
            counter++;
        }
        nanosleep(&tick, NULL);
    }
}
