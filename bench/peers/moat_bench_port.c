/*
 * bench/peers/moat_bench_port.c: the "port round trip per job" peer of
 * moat_bench, the port program people write when they do not use moat.
 *
 * It reads {packet, 4} frames on stdin and answers each on stdout, in
 * order.  A frame's first byte says what to do:
 *
 *   'e' ...     echo: the frame comes back unchanged
 *   's' U32     spin: busy-wait U32 microseconds on CLOCK_MONOTONIC (the
 *               loop of moat_demo's `spin`), then answer the one byte 's'
 *   'x'         crash: write through a null pointer (SIGSEGV)
 *
 * Input is read in large blocks and the answers to every complete frame
 * of a block go out in one write, as /bin/cat would, so that a pipelined
 * peer pays one system call per block rather than per frame.  It exits on
 * stdin EOF, like any port program.  Built by `make bench`, `make shell`
 * and `make iex` into _build/c/plain/bench/, never into priv/.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define IN_SIZE (1 << 16)

static long long now_ns(void) {
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
           (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static int write_all(const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, p, n);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Appends the answer to one frame to out; returns its new length. */
static size_t answer(const unsigned char *frame, uint32_t len,
                     unsigned char *out, size_t used) {
    static const unsigned char spun[] = {0, 0, 0, 1, 's'};
    volatile int *volatile nowhere = NULL;

    if (len >= 5 && frame[0] == 's') {
        long long deadline = now_ns() + (long long)get32(frame + 1) * 1000LL;

        while (now_ns() < deadline)
            ;
        memcpy(out + used, spun, sizeof spun);
        return used + sizeof spun;
    }
    if (len >= 1 && frame[0] == 'x')
        *nowhere = 1;
    memcpy(out + used, frame - 4, 4 + (size_t)len);
    return used + 4 + len;
}

int main(void) {
    static unsigned char in[IN_SIZE], out[2 * IN_SIZE];
    size_t have = 0;

    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        size_t at = 0, used = 0;
        ssize_t r = read(0, in + have, sizeof in - have);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 0;
        have += (size_t)r;
        while (have - at >= 4) {
            uint32_t len = get32(in + at);

            if (len > IN_SIZE - 4)
                return 1; /* no frame of this protocol is that long */
            if (have - at - 4 < len)
                break;
            used = answer(in + at + 4, len, out, used);
            at += 4 + len;
        }
        if (used > 0 && write_all(out, used) < 0)
            return 0;
        memmove(in, in + at, have - at);
        have -= at;
    }
}
