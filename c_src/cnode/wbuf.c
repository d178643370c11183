/*
 * wbuf.c: what a worker process of the C-node writes to its parent (a
 * task worker, procs.c; the servers' worker, srvworker.c), read into a
 * buffer and split into frames: a 4-byte big-endian length, then the
 * frame.  The buffer grows by doubling from WBUF_MIN; a length over the
 * caller's bound is the worker's fault, and so is whatever its frames
 * say (the caller checks each one with moat__wframe_decode).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

#define LEN_BYTES 4

/* A read asks for at least this much room. */
#define WBUF_MIN (64u * 1024u)

/* Makes room for a read.  Returns 0 or UV_ENOMEM. */
static int reserve(moat__wbuf_t *b) {
    size_t cap = b->cap > 0 ? b->cap : WBUF_MIN;
    char *p;

    while (cap - b->len < WBUF_MIN)
        cap *= 2;
    if (cap == b->cap)
        return 0;
    p = realloc(b->buf, cap);
    if (p == NULL)
        return UV_ENOMEM;
    b->buf = p;
    b->cap = cap;
    return 0;
}

void moat__wbuf_alloc(moat__wbuf_t *b, uv_buf_t *buf) {
    if (reserve(b) != 0)
        *buf = uv_buf_init(NULL, 0); /* the read gets UV_ENOBUFS */
    else
        *buf = uv_buf_init(b->buf + b->len, (unsigned)(b->cap - b->len));
}

int moat__wbuf_parse(moat__wbuf_t *b, uint32_t max, moat__wbuf_fn fn,
                     void *data) {
    size_t off = 0;
    int rc = 0;

    while (b->len - off >= LEN_BYTES) {
        uint32_t len = moat__be32(b->buf + off);
        if (len > max) {
            rc = UV_E2BIG;
            break;
        }
        if (b->len - off - LEN_BYTES < len)
            break;
        off += LEN_BYTES + (size_t)len;
        if (fn(data, b->buf + off - len, len) != 0) {
            rc = UV_ECANCELED;
            break;
        }
    }
    if (rc != 0) {
        b->len = 0; /* the rest is not read */
        return rc;
    }
    memmove(b->buf, b->buf + off, b->len - off);
    b->len -= off;
    return 0;
}

int moat__wbuf_drain(moat__wbuf_t *b, int fd, uint32_t max, moat__wbuf_fn fn,
                     void *data) {
    int rc = 0;

    while (rc == 0) {
        ssize_t r;
        if (reserve(b) != 0)
            return UV_ENOMEM;
        r = read(fd, b->buf + b->len, b->cap - b->len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break; /* the end, or a descendant still holds the pipe */
        b->len += (size_t)r;
        rc = moat__wbuf_parse(b, max, fn, data);
    }
    return rc;
}

void moat__wbuf_free(moat__wbuf_t *b) {
    free(b->buf);
    memset(b, 0, sizeof *b);
}
