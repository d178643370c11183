/*
 * errlog.c: whatever is written to moat_cnode's stderr (by a task
 * library, by libc) reaches the VM as {log, warning, Line} frames, since
 * the pool's owner logs what the port sends and nothing reads the port's
 * stderr (doc/cnode.md).  So does what a library prints to stdout, which
 * would otherwise corrupt the frames there.
 *
 * fds 1 and 2 become the write end of a pipe whose read end the loop
 * reads; the outbox writes frames to its own copy of the original fd 1.
 * Lines are cut at '\n' (a '\r' before it is dropped), and a line longer
 * than MOAT__ERRLOG_LINE is sent in pieces.  Loop thread only; writers on
 * any thread just write to fd 2.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "cnode.h"

static void send_line(moat__errlog_t *el) {
    size_t n = el->len;

    if (n > 0 && el->line[n - 1] == '\r')
        n--;
    if (n > 0)
        moat__outbox_log(el->ob, "warning", el->line, n);
    el->len = 0;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    moat__errlog_t *el = h->data;

    (void)hint;
    *buf = uv_buf_init(el->rbuf, sizeof el->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    moat__errlog_t *el = s->data;

    if (nread < 0) {
        /* Only when fd 2 no longer points at the pipe (errlog_stop). */
        send_line(el);
        uv_read_stop(s);
        return;
    }
    for (ssize_t i = 0; i < nread; i++) {
        char c = buf->base[i];
        if (c == '\n') {
            send_line(el);
            continue;
        }
        el->line[el->len++] = c;
        if (el->len == sizeof el->line)
            send_line(el);
    }
}

int moat__errlog_start(moat__errlog_t *el, uv_loop_t *loop,
                       moat__outbox_t *ob) {
    int fds[2] = {-1, -1}, rc;

    el->ob = ob;
    el->len = 0;
    el->open = 0;
    el->saved_fd = fcntl(2, F_DUPFD_CLOEXEC, 3);
    if (pipe2(fds, O_CLOEXEC) < 0) {
        rc = -errno;
        goto fail;
    }
    rc = uv_pipe_init(loop, &el->pipe, 0);
    if (rc != 0)
        goto fail;
    el->open = 1;
    el->pipe.data = el;
    rc = uv_pipe_open(&el->pipe, fds[0]);
    if (rc != 0)
        goto fail;
    fds[0] = -1; /* the handle's now */
    rc = uv_read_start((uv_stream_t *)&el->pipe, on_alloc, on_read);
    if (rc != 0)
        goto fail;
    if (dup2(fds[1], 2) < 0) {
        rc = -errno;
        goto fail;
    }
    if (dup2(fds[1], 1) < 0) {
        rc = -errno;
        dup2(el->saved_fd, 2);
        goto fail;
    }
    close(fds[1]);
    return 0;

fail:
    if (fds[0] >= 0)
        close(fds[0]);
    if (fds[1] >= 0)
        close(fds[1]);
    if (el->open) {
        uv_close((uv_handle_t *)&el->pipe, NULL);
        el->open = 0;
    }
    if (el->saved_fd >= 0)
        close(el->saved_fd);
    el->saved_fd = -1;
    return rc;
}

void moat__errlog_stop(moat__errlog_t *el) {
    if (el->saved_fd >= 0) {
        dup2(el->saved_fd, 2);
        close(el->saved_fd);
        el->saved_fd = -1;
    }
    if (el->open) {
        uv_close((uv_handle_t *)&el->pipe, NULL);
        el->open = 0;
    }
}
