/* gm-journal: the disk guest's record journal on TCP (DESIGN "Guest services", port 7000).
 *
 * Usage: gm-journal FILE PORT [6]
 * One line in, one line out:
 *   append <hex>  -> ok <n>           record n (1-based, consecutive) is on the disk (fdatasync)
 *   read <n>      -> rec <n> <hex> | missing <n>
 *   count         -> count <n>
 *   anything else -> err <reason>
 * Layout: record n lives in slot n-1 of FILE, one 4 KiB slot each: a header (magic,
 * sequence number, length, FNV-1a 64 over sequence, length and data) and the data. Slots
 * are written with O_DIRECT from an aligned buffer and fdatasync'd before `ok`; reads and
 * `count` use O_DIRECT too, so they see what is on the disk, not the page cache. Appends
 * run one at a time (one thread, poll), so the valid slots are always a prefix of the file;
 * a torn last slot (a crash mid-write) fails its checksum, is not counted and is
 * overwritten by the next append. `count` is a binary search over that prefix.
 * With a third argument "6" it listens on [::] as well as on 0.0.0.0.
 * Built with `gcc -static -O2` by geomirror.disk_image.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define SLOT 4096
#define MAGIC 0x4c4e524aU /* "JRNL" */
#define HEADER 24         /* magic u32, len u32, seq u64, sum u64 */
#define MAX_DATA (SLOT - HEADER)
#define MAX_LINE (2 * MAX_DATA + 64)
#define MAX_CLIENTS 64

static int wfd = -1, rfd = -1;
static unsigned char *slot; /* SLOT-aligned, for O_DIRECT */
static uint64_t next_seq;   /* the number the next append gets */

static uint64_t fnv1a(uint64_t seq, uint32_t len, const unsigned char *data)
{
    uint64_t h = 1469598103934665603ULL;
    unsigned char head[12];
    memcpy(head, &seq, 8);
    memcpy(head + 8, &len, 4);
    for (int i = 0; i < 12; i++)
        h = (h ^ head[i]) * 1099511628211ULL;
    for (uint32_t i = 0; i < len; i++)
        h = (h ^ data[i]) * 1099511628211ULL;
    return h;
}

/* Read slot n-1 from the disk; its data length, or -1 if it holds no valid record n. */
static int read_slot(uint64_t n)
{
    ssize_t got = pread(rfd, slot, SLOT, (off_t)(n - 1) * SLOT);
    if (got != SLOT)
        return -1;
    uint32_t magic, len;
    uint64_t seq, sum;
    memcpy(&magic, slot, 4);
    memcpy(&len, slot + 4, 4);
    memcpy(&seq, slot + 8, 8);
    memcpy(&sum, slot + 16, 8);
    if (magic != MAGIC || seq != n || len > MAX_DATA || sum != fnv1a(seq, len, slot + HEADER))
        return -1;
    return (int)len;
}

/* The number of valid records: slots 1..count valid, count+1 not (binary search). */
static uint64_t disk_count(void)
{
    struct stat st;
    if (fstat(rfd, &st) != 0)
        return 0;
    uint64_t lo = 0, hi = (uint64_t)st.st_size / SLOT; /* lo valid (0: none), answer in [lo, hi] */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo + 1) / 2;
        if (read_slot(mid) >= 0)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static int append(const unsigned char *data, uint32_t len)
{
    memset(slot, 0, SLOT);
    uint32_t magic = MAGIC;
    uint64_t seq = next_seq, sum = fnv1a(seq, len, data);
    memcpy(slot, &magic, 4);
    memcpy(slot + 4, &len, 4);
    memcpy(slot + 8, &seq, 8);
    memcpy(slot + 16, &sum, 8);
    memcpy(slot + HEADER, data, len);
    if (pwrite(wfd, slot, SLOT, (off_t)(seq - 1) * SLOT) != SLOT || fdatasync(wfd) != 0)
        return -1;
    next_seq++;
    return 0;
}

static int unhex(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int parse_number(const char *s, uint64_t *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end != '\0' || errno || v == 0)
        return -1;
    *out = v;
    return 0;
}

/* One command line (no newline) -> the reply (with newline) in out. */
static void handle(char *line, char *out, size_t cap)
{
    static unsigned char data[MAX_DATA];
    size_t n = strlen(line);
    if (n && line[n - 1] == '\r')
        line[--n] = '\0';
    if (strncmp(line, "append ", 7) == 0) {
        const char *hex = line + 7;
        size_t h = strlen(hex);
        if (h == 0 || h % 2 || h / 2 > MAX_DATA) {
            snprintf(out, cap, "err append takes 1 to %d bytes as an even number of hex digits\n", MAX_DATA);
            return;
        }
        for (size_t i = 0; i < h / 2; i++) {
            int hi = unhex(hex[2 * i]), lo = unhex(hex[2 * i + 1]);
            if (hi < 0 || lo < 0) {
                snprintf(out, cap, "err append: not hex\n");
                return;
            }
            data[i] = (unsigned char)(hi << 4 | lo);
        }
        uint64_t seq = next_seq;
        if (append(data, (uint32_t)(h / 2)) != 0)
            snprintf(out, cap, "err append: write failed: %s\n", strerror(errno));
        else
            snprintf(out, cap, "ok %llu\n", (unsigned long long)seq);
    } else if (strncmp(line, "read ", 5) == 0) {
        uint64_t want;
        if (parse_number(line + 5, &want) != 0) {
            snprintf(out, cap, "err read takes a record number from 1\n");
            return;
        }
        int len = read_slot(want);
        if (len < 0) {
            snprintf(out, cap, "missing %llu\n", (unsigned long long)want);
            return;
        }
        int k = snprintf(out, cap, "rec %llu ", (unsigned long long)want);
        for (int i = 0; i < len; i++)
            k += snprintf(out + k, cap - k, "%02x", slot[HEADER + i]);
        snprintf(out + k, cap - k, "\n");
    } else if (strcmp(line, "count") == 0) {
        snprintf(out, cap, "count %llu\n", (unsigned long long)disk_count());
    } else {
        snprintf(out, cap, "err unknown command (append <hex>, read <n>, count)\n");
    }
}

static int listen_on(int family)
{
    int fd = socket(family, SOCK_STREAM, 0), one = 1;
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

struct client {
    int fd;
    size_t used;
    char *buf;
};

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "6") != 0)) {
        fprintf(stderr, "usage: gm-journal FILE PORT [6]\n");
        return 2;
    }
    int port = atoi(argv[2]);
    signal(SIGPIPE, SIG_IGN);
    if (posix_memalign((void **)&slot, SLOT, SLOT) != 0) {
        perror("gm-journal: posix_memalign");
        return 1;
    }
    wfd = open(argv[1], O_WRONLY | O_CREAT | O_DIRECT | O_CLOEXEC, 0644);
    rfd = open(argv[1], O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (wfd < 0 || rfd < 0) {
        fprintf(stderr, "gm-journal: cannot open %s with O_DIRECT: %s\n", argv[1], strerror(errno));
        return 1;
    }
    next_seq = disk_count() + 1;

    struct pollfd pfd[2 + MAX_CLIENTS];
    struct client cl[MAX_CLIENTS];
    int nl = 0;
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    int l4 = listen_on(AF_INET);
    if (l4 < 0 || bind(l4, (struct sockaddr *)&a4, sizeof a4) != 0 || listen(l4, 16) != 0) {
        fprintf(stderr, "gm-journal: cannot listen on 0.0.0.0:%d: %s\n", port, strerror(errno));
        return 1;
    }
    pfd[nl++] = (struct pollfd){.fd = l4, .events = POLLIN};
    if (argc == 4) {
        struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
        int l6 = listen_on(AF_INET6), one = 1;
        if (l6 >= 0)
            setsockopt(l6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        if (l6 < 0 || bind(l6, (struct sockaddr *)&a6, sizeof a6) != 0 || listen(l6, 16) != 0) {
            fprintf(stderr, "gm-journal: cannot listen on [::]:%d: %s\n", port, strerror(errno));
            return 1;
        }
        pfd[nl++] = (struct pollfd){.fd = l6, .events = POLLIN};
    }
    fprintf(stderr, "gm-journal: %s holds %llu records, listening on port %d\n", argv[1],
            (unsigned long long)(next_seq - 1), port);
    int nc = 0;
    static char reply[2 * MAX_DATA + 64];
    for (;;) {
        for (int i = 0; i < nc; i++)
            pfd[nl + i] = (struct pollfd){.fd = cl[i].fd, .events = POLLIN};
        if (poll(pfd, (nfds_t)(nl + nc), -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("gm-journal: poll");
            return 1;
        }
        int before = nc;
        for (int i = before - 1; i >= 0; i--) {
            if (!(pfd[nl + i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            struct client *c = &cl[i];
            ssize_t got = read(c->fd, c->buf + c->used, MAX_LINE - c->used);
            int drop = got <= 0;
            if (!drop) {
                c->used += (size_t)got;
                char *start = c->buf, *nlp;
                while (!drop && (nlp = memchr(start, '\n', c->buf + c->used - start))) {
                    *nlp = '\0';
                    handle(start, reply, sizeof reply);
                    drop = write_all(c->fd, reply, strlen(reply)) != 0;
                    start = nlp + 1;
                }
                c->used -= (size_t)(start - c->buf);
                memmove(c->buf, start, c->used);
                if (c->used == MAX_LINE) { /* a line longer than any command can be */
                    write_all(c->fd, "err line too long\n", 18);
                    drop = 1;
                }
            }
            if (drop) {
                close(c->fd);
                free(c->buf);
                cl[i] = cl[--nc];
            }
        }
        for (int j = 0; j < nl; j++) {
            if (!(pfd[j].revents & POLLIN))
                continue;
            int fd = accept4(pfd[j].fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0)
                continue;
            char *buf = nc < MAX_CLIENTS ? malloc(MAX_LINE) : NULL;
            if (!buf) {
                write_all(fd, "err too many clients\n", 21);
                close(fd);
                continue;
            }
            cl[nc++] = (struct client){.fd = fd, .used = 0, .buf = buf};
        }
    }
}
