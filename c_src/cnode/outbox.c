/*
 * outbox.c: the one path to moat_cnode's stdout.
 *
 * DESIGN
 *
 * Threads.  Outcomes are produced on pool threads (the complete callback),
 * and logs, replies to bad frames and stopped tags on the loop thread.
 * Whoever queues something and finds no writer at work becomes the writer:
 * it takes everything queued, writes it with blocking writes (unlocked),
 * and goes back for more until the outbox is empty, then stops being the
 * writer.  There is no thread of its own, so an outcome on an idle node
 * costs no wake-up: the worker that produced it writes it at once.  A
 * thread may also hold the writer's role across calls
 * (moat__outbox_hold): the loop thread does while it polls for the
 * outcomes of the runs it just submitted (jobs.c, Watching), so that the
 * outcome is written from the CPU where the VM's scheduler sleeps.
 *
 * Batching.  Outcomes that arrive while the writer writes pile up in
 * `done` (the encoded {Tag, ok | exit, Term} elements) and leave as one
 * {done, [...]} frame on the writer's next round; stopped tags likewise in
 * `stopped`.  The writer swaps those buffers with its spares under the
 * lock, so producers keep appending while it writes, and no buffer is
 * allocated in the steady state.  Each frame is written with writev: a
 * small header (length, version, tuple, atom, list header), the elements
 * as they are, and the list's tail.
 *
 * Ordering.  Within a round: whole frames (ready, logs) in queue order,
 * then the stopped frame, then the done frame.  The protocol orders
 * nothing between different tags, and ready is queued before any task
 * can exist.
 *
 * Sink.  Over the distribution transport the writer hands each whole
 * frame to the transport's sink (dist.c) instead of writing it to a file
 * descriptor.
 *
 * Shutdown.  moat__outbox_discard makes every later append a no-op.  A
 * write error (EPIPE when the VM has gone) does the same.  An outcome that
 * cannot be queued for want of memory ends the process (cnode.h).
 *
 * Lock: `lock` guards every field but fd, and the spares while a writer
 * holds them.  It is never held while writing, and no other lock is taken
 * under it.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

/* {packet, 4}: the length is four bytes, big-endian. */
#define LEN_BYTES 4

/* A list frame's header: length, version, {, 2, the atom (at most
 * `stopped`), the list header. */
#define HEADER_MAX 32

/* An outcome that cannot be kept: the VM must see the node die. */
static void out_of_memory(void) { _exit(MOAT_CNODE_EXIT_NOMEM); }

/* ------------------------------------------------------------ writing */

/* Writes every byte of iov[0..n) or fails.  Returns 0 or -errno. */
static int write_all(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                /* stdout shares a non-blocking description (a socket
                 * given as both stdin and stdout): wait for room */
                struct pollfd p = {fd, POLLOUT, 0};
                if (poll(&p, 1, -1) < 0 && errno != EINTR)
                    return -errno;
                continue;
            }
            return -errno;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static int put(moat__outbox_t *ob, struct iovec *iov, int n);

/* Writes {Atom, [Elements]} whose n elements are encoded in x. */
static int write_list_frame(moat__outbox_t *ob, const char *atom,
                            ei_x_buff *x, size_t n) {
    char head[HEADER_MAX], tail = ERL_NIL_EXT;
    int i = LEN_BYTES;
    size_t len;
    struct iovec iov[3];

    if (ei_encode_version(head, &i) < 0 ||
        ei_encode_tuple_header(head, &i, 2) < 0 ||
        ei_encode_atom(head, &i, atom) < 0 ||
        ei_encode_list_header(head, &i, (int)n) < 0)
        return -EINVAL;
    len = (size_t)(i - LEN_BYTES) + (size_t)x->index + 1;
    if (len > UINT32_MAX)
        return -EMSGSIZE;
    moat__put_be32(head, (uint32_t)len);
    iov[0] = (struct iovec){head, (size_t)i};
    iov[1] = (struct iovec){x->buff, (size_t)x->index};
    iov[2] = (struct iovec){&tail, 1};
    return put(ob, iov, 3);
}

static void free_blobs(moat__blob_t *b) {
    while (b != NULL) {
        moat__blob_t *next = b->next;
        free(b);
        b = next;
    }
}

/* Drops what is queued.  lock held. */
static void drop_queued(moat__outbox_t *ob) {
    free_blobs(ob->frames);
    ob->frames = NULL;
    ob->frames_tail = &ob->frames;
    ob->done.index = 0;
    ob->ndone = 0;
    ob->stopped.index = 0;
    ob->nstopped = 0;
}

/* Writes one whole frame where this outbox's frames go. */
static int put(moat__outbox_t *ob, struct iovec *iov, int n) {
    return ob->sink != NULL ? ob->sink(ob->sink_data, iov, n)
                            : write_all(ob->fd, iov, n);
}

/* Writes everything queued, as the writer.  Called and returns with the
 * lock held.  Returns the done entries written. */
static size_t write_queued(moat__outbox_t *ob) {
    size_t written = 0;
    while (!ob->discard &&
           (ob->frames != NULL || ob->ndone > 0 || ob->nstopped > 0)) {
        moat__blob_t *frames = ob->frames;
        ei_x_buff t;
        size_t ndone = ob->ndone, nstopped = ob->nstopped;
        int rc = 0;

        ob->frames = NULL;
        ob->frames_tail = &ob->frames;
        t = ob->done;
        ob->done = ob->spare_done;
        ob->spare_done = t;
        ob->ndone = 0;
        t = ob->stopped;
        ob->stopped = ob->spare_stopped;
        ob->spare_stopped = t;
        ob->nstopped = 0;
        uv_mutex_unlock(&ob->lock);

        for (moat__blob_t *b = frames; b != NULL && rc == 0; b = b->next) {
            struct iovec iov = {b->data, b->len};
            rc = put(ob, &iov, 1);
        }
        free_blobs(frames);
        if (rc == 0 && nstopped > 0)
            rc = write_list_frame(ob, "stopped", &ob->spare_stopped,
                                  nstopped);
        if (rc == 0 && ndone > 0)
            rc = write_list_frame(ob, "done", &ob->spare_done, ndone);
        ob->spare_done.index = 0;
        ob->spare_stopped.index = 0;
        written += ndone;

        uv_mutex_lock(&ob->lock);
        if (rc != 0) {
            /* The VM is gone (EPIPE) or stdout is broken: nothing more
             * can reach it, and stdin's end will end the node. */
            ob->discard = 1;
            drop_queued(ob);
        }
    }
    return written;
}

/* Called with the lock held; returns with it released.  Becomes the
 * writer unless there is one, and writes until the outbox is empty. */
static void drain(moat__outbox_t *ob) {
    if (ob->writing || ob->discard) {
        uv_mutex_unlock(&ob->lock);
        return;
    }
    ob->writing = 1;
    write_queued(ob);
    ob->writing = 0;
    uv_mutex_unlock(&ob->lock);
}

/* ---------------------------------------------------------------- API */

int moat__outbox_init(moat__outbox_t *ob, int fd) {
    int rc;

    memset(ob, 0, sizeof *ob);
    ob->fd = fd;
    ob->frames_tail = &ob->frames;
    if (ei_x_new(&ob->done) < 0 || ei_x_new(&ob->stopped) < 0 ||
        ei_x_new(&ob->spare_done) < 0 || ei_x_new(&ob->spare_stopped) < 0) {
        rc = UV_ENOMEM;
        goto fail;
    }
    ob->done.index = ob->stopped.index = 0;
    ob->spare_done.index = ob->spare_stopped.index = 0;
    rc = uv_mutex_init(&ob->lock);
    if (rc != 0)
        goto fail;
    return 0;

fail:
    ei_x_free(&ob->done);
    ei_x_free(&ob->stopped);
    ei_x_free(&ob->spare_done);
    ei_x_free(&ob->spare_stopped);
    return rc;
}

void moat__outbox_sink(moat__outbox_t *ob, moat__sink_fn sink, void *data) {
    ob->sink = sink;
    ob->sink_data = data;
}

void moat__outbox_close(moat__outbox_t *ob) {
    drop_queued(ob);
    if (ob->fd >= 0)
        close(ob->fd);
    ei_x_free(&ob->done);
    ei_x_free(&ob->stopped);
    ei_x_free(&ob->spare_done);
    ei_x_free(&ob->spare_stopped);
    uv_mutex_destroy(&ob->lock);
}

void moat__outbox_done(moat__outbox_t *ob, uint64_t tag, int kind,
                       const char *term, size_t len) {
    int start;

    uv_mutex_lock(&ob->lock);
    if (ob->discard) {
        uv_mutex_unlock(&ob->lock);
        return;
    }
    start = ob->done.index;
    if (len > INT32_MAX ||
        ei_x_encode_tuple_header(&ob->done, 3) < 0 ||
        ei_x_encode_ulonglong(&ob->done, tag) < 0 ||
        ei_x_encode_atom(&ob->done, kind == MOAT_OK ? "ok" : "exit") < 0 ||
        ei_x_append_buf(&ob->done, term, (int)len) < 0) {
        ob->done.index = start;
        out_of_memory();
    }
    ob->ndone++;
    drain(ob);
}

void moat__outbox_stopped(moat__outbox_t *ob, const uint64_t *tags,
                          size_t n) {
    uv_mutex_lock(&ob->lock);
    if (ob->discard) {
        uv_mutex_unlock(&ob->lock);
        return;
    }
    for (size_t i = 0; i < n; i++)
        if (ei_x_encode_ulonglong(&ob->stopped, tags[i]) < 0)
            out_of_memory();
    ob->nstopped += n;
    drain(ob);
}

int moat__outbox_frame(moat__outbox_t *ob, const char *etf, size_t len) {
    moat__blob_t *b;

    if (len > UINT32_MAX)
        return UV_EINVAL;
    b = malloc(sizeof *b + LEN_BYTES + len);
    if (b == NULL)
        return UV_ENOMEM;
    b->next = NULL;
    b->len = LEN_BYTES + len;
    moat__put_be32(b->data, (uint32_t)len);
    memcpy(b->data + LEN_BYTES, etf, len);
    uv_mutex_lock(&ob->lock);
    if (ob->discard) {
        uv_mutex_unlock(&ob->lock);
        free(b);
        return 0;
    }
    *ob->frames_tail = b;
    ob->frames_tail = &b->next;
    drain(ob);
    return 0;
}

void moat__outbox_log(moat__outbox_t *ob, const char *level, const char *msg,
                      size_t len) {
    ei_x_buff x;

    if (len > MOAT__LOG_MAX)
        len = MOAT__LOG_MAX;
    if (ei_x_new_with_version(&x) < 0)
        return;
    if (ei_x_encode_tuple_header(&x, 3) == 0 &&
        ei_x_encode_atom(&x, "log") == 0 && ei_x_encode_atom(&x, level) == 0 &&
        ei_x_encode_binary(&x, msg, (long)len) == 0)
        moat__outbox_frame(ob, x.buff, (size_t)x.index);
    ei_x_free(&x);
}

void moat__outbox_logf(moat__outbox_t *ob, const char *level,
                       const char *fmt, ...) {
    char msg[MOAT__LOG_MAX + 1];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    moat__outbox_log(ob, level, msg,
                     (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
}

int moat__outbox_hold(moat__outbox_t *ob) {
    int took;

    uv_mutex_lock(&ob->lock);
    took = !ob->writing && !ob->discard;
    if (took)
        ob->writing = 1;
    uv_mutex_unlock(&ob->lock);
    return took;
}

size_t moat__outbox_flush(moat__outbox_t *ob) {
    size_t written;

    uv_mutex_lock(&ob->lock);
    written = write_queued(ob);
    uv_mutex_unlock(&ob->lock);
    return written;
}

void moat__outbox_release(moat__outbox_t *ob) {
    uv_mutex_lock(&ob->lock);
    write_queued(ob);
    ob->writing = 0;
    uv_mutex_unlock(&ob->lock);
}

int moat__outbox_discard(moat__outbox_t *ob) {
    int writing;

    uv_mutex_lock(&ob->lock);
    ob->discard = 1;
    drop_queued(ob);
    writing = ob->writing;
    uv_mutex_unlock(&ob->lock);
    return writing;
}
