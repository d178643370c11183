/*
 * dist.c: the distribution transport.  moat_cnode joins the pool's VM as
 * a hidden C-node instead of speaking over its stdio (doc/cnode.md,
 * "Distribution").
 *
 * DESIGN
 *
 * Names.  The node name and cookie come from the environment, never from
 * argv (which any user of the machine can read).  The node listens on an
 * ephemeral port and publishes it to epmd; the VM connects when it sends
 * the first frame.
 *
 * Frames.  A message either way carries one frame of the port transport
 * as a binary.  The VM sends Frame: hello to the registered name `moat`,
 * the rest to this node's pid.  The node sends {moat_cnode, Self, Frame}
 * to the session's owner, the process that sent hello.  A port frame's
 * bytes, its 4-byte length first, are exactly the body of a BINARY_EXT, so
 * the outbox's frames leave as they are behind a constant prefix.  The
 * registered name `moat_echo` sends any message back to its sender: a
 * liveness check that needs no session.
 *
 * Threads.  ei answers ticks inside its receive, which therefore writes,
 * so the socket must never be written by two threads at once
 * (REFERENCE.md §6).  Rather than handing every outcome to the loop
 * thread (a wake-up that cost 90 us a round trip here, three times the
 * bare ei echo), the socket has a lock: the loop thread holds it for each
 * receive, and whichever thread writes the outbox holds it for each send.
 * The loop thread alone reads, so ticks are always answered.  A send
 * that fails shuts the socket down, and the loop thread, reading, ends
 * the session.
 *
 * Session.  One connection is served; later ones are accepted and closed
 * at once, without a handshake, and a hello from another process is
 * answered with an error.  (A frame sent to this node's pid carries no
 * sender, so it cannot be told from the owner's: any process of the
 * owner's node could send one.)
 * The session ends when the connection closes, or when the owner exits:
 * the owner links to this node's pid, so its exit arrives as an EXIT
 * message whatever its reason.  ei's receive fails with EIO both on a
 * closed connection and on a control message it does not handle (a
 * monitor, say), so a peek at the socket tells the two apart.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

/* How long a read waits for the rest of a message whose start came.
 * Past it the stream cannot be trusted (ei has read part of a message)
 * and the session ends. */
#define RECV_TMO_MS 10000
/* How long the handshake of a new connection may take. */
#define ACCEPT_TMO_MS 5000
/* Messages read per wake-up before the runs read so far are submitted. */
#define BATCH 256

/* A BINARY_EXT's tag and 4-byte length. */
#define BIN_HEAD 5

static void cloexec(int fd) {
    int fl = fcntl(fd, F_GETFD);
    if (fl >= 0)
        fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
}

static int pid_eq(const erlang_pid *a, const erlang_pid *b) {
    return a->num == b->num && a->serial == b->serial &&
           a->creation == b->creation && strcmp(a->node, b->node) == 0;
}

/* Says `msg`: to the owner once there is one, else on stderr. */
static void note(moat__dist_t *d, const char *level, const char *msg) {
    if (d->has_owner && !d->ended)
        moat__outbox_log(d->ob, level, msg, strlen(msg));
    else
        fprintf(stderr, "%s\n", msg);
}

static void end(moat__dist_t *d, const char *why) {
    if (d->ended)
        return;
    d->ended = 1;
    uv_mutex_lock(&d->lock);
    d->live = 0;
    uv_mutex_unlock(&d->lock);
    if (d->cpoll_open)
        uv_poll_stop(&d->cpoll);
    moat__outbox_discard(d->ob);
    d->on_end(d->data, why);
}

/* Sends {moat_cnode, Self, Frame} to `to`, the frame (its length first)
 * in iov[0..n).  Returns 0 or a negative error.  lock held. */
static int send_to(moat__dist_t *d, erlang_pid *to, struct iovec *iov,
                   int n) {
    size_t len = 0;

    d->tx.index = d->prefix;
    for (int k = 0; k < n; k++)
        len += iov[k].iov_len;
    if (len > INT32_MAX - (size_t)d->prefix)
        return UV_E2BIG;
    for (int k = 0; k < n; k++)
        if (ei_x_append_buf(&d->tx, iov[k].iov_base, (int)iov[k].iov_len) < 0)
            return UV_ENOMEM;
    if (ei_send(d->fd, to, d->tx.buff, d->tx.index) < 0)
        return UV_EIO;
    return 0;
}

/* The outbox's sink, on any thread.  With nobody to tell, the frame is
 * dropped.  When it cannot be sent, the socket is shut down: the VM sees
 * the node go rather than wait for outcomes that were lost, and the loop
 * thread sees the end of the connection. */
static int sink(void *data, struct iovec *iov, int n) {
    moat__dist_t *d = data;
    int rc = 0;

    uv_mutex_lock(&d->lock);
    if (d->live && d->has_owner) {
        rc = send_to(d, &d->owner, iov, n);
        if (rc != 0) {
            shutdown(d->fd, SHUT_RDWR);
            d->live = 0;
        }
    }
    uv_mutex_unlock(&d->lock);
    return rc;
}

/* Answers a hello from a process that is not the owner. */
static void refuse(moat__dist_t *d, erlang_pid *from) {
    static const char msg[] = "this moat_cnode serves another pool";
    char len[4];
    ei_x_buff x;
    struct iovec iov[2];

    if (ei_x_new_with_version(&x) < 0)
        return;
    if (ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, "error") == 0 &&
        ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, "busy") == 0 &&
        ei_x_encode_binary(&x, msg, (long)sizeof msg - 1) == 0) {
        moat__put_be32(len, (uint32_t)x.index);
        iov[0] = (struct iovec){len, 4};
        iov[1] = (struct iovec){x.buff, (size_t)x.index};
        uv_mutex_lock(&d->lock);
        if (d->live)
            send_to(d, from, iov, 2);
        uv_mutex_unlock(&d->lock);
    }
    ei_x_free(&x);
}

/* The frame a message carries: its binary's bytes.  Returns 0 or -1. */
static int frame_of(const ei_x_buff *x, const char **buf, size_t *len) {
    int i = 0, version, type, size;

    if (ei_decode_version(x->buff, &i, &version) < 0 ||
        ei_get_type(x->buff, &i, &type, &size) < 0 ||
        type != ERL_BINARY_EXT || size < 0 ||
        (long)x->index - (i + BIN_HEAD) != (long)size)
        return -1;
    *buf = x->buff + i + BIN_HEAD;
    *len = (size_t)size;
    return 0;
}

static void on_msg(moat__dist_t *d, erlang_msg *m) {
    const char *buf;
    size_t len;
    int reg = 0;

    switch (m->msgtype) {
    case ERL_REG_SEND:
    case ERL_REG_SEND_TT:
        reg = 1;
        break;
    case ERL_SEND:
    case ERL_SEND_TT:
        break;
    case ERL_EXIT:
    case ERL_EXIT2:
    case ERL_EXIT_TT:
    case ERL_EXIT2_TT:
        if (d->has_owner && pid_eq(&m->from, &d->owner))
            end(d, "the pool's owner exited");
        return;
    default: /* the owner's link, an unlink */
        return;
    }
    if (reg && strcmp(m->toname, "moat_echo") == 0) {
        uv_mutex_lock(&d->lock);
        if (d->live)
            ei_send(d->fd, &m->from, d->rx.buff, d->rx.index);
        uv_mutex_unlock(&d->lock);
        return;
    }
    if (reg && strcmp(m->toname, "moat") != 0) {
        note(d, "warning", "moat_cnode: a message to an unknown name was "
                           "ignored");
        return;
    }
    if (reg && !d->has_owner) {
        uv_mutex_lock(&d->lock);
        d->owner = m->from;
        d->has_owner = 1;
        uv_mutex_unlock(&d->lock);
    } else if (reg && !pid_eq(&m->from, &d->owner)) {
        refuse(d, &m->from);
        return;
    } else if (!d->has_owner) {
        note(d, "warning", "moat_cnode: a frame before hello was ignored");
        return;
    }
    if (frame_of(&d->rx, &buf, &len) != 0) {
        note(d, "error", "moat_cnode: a message that is not a binary frame "
                         "was ignored");
        return;
    }
    d->on_frame(d->data, buf, len);
}

/* Whether the connection is closed (or broken), without reading. */
static int closed(int fd) {
    char c;
    ssize_t r = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK &&
                      errno != EINTR);
}

static int readable(int fd) {
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP)) != 0;
}

static void on_conn(uv_poll_t *h, int status, int events) {
    moat__dist_t *d = h->data;
    erlang_msg msg;

    (void)events;
    if (status < 0) {
        end(d, "the connection failed");
        return;
    }
    for (int k = 0; k < BATCH && !d->ended; k++) {
        int rc, err;

        uv_mutex_lock(&d->lock);
        rc = ei_xreceive_msg_tmo(d->fd, &msg, &d->rx, RECV_TMO_MS);
        err = erl_errno;
        uv_mutex_unlock(&d->lock);
        if (rc == ERL_MSG) {
            on_msg(d, &msg);
        } else if (rc == ERL_ERROR && err == ETIMEDOUT) {
            /* Readable, yet the message did not come whole in time: part
             * of it has been read, so what follows would be misread. */
            shutdown(d->fd, SHUT_RDWR);
            end(d, "a message stalled halfway");
            return;
        } else if (rc == ERL_ERROR && closed(d->fd)) {
            end(d, "the connection closed");
            return;
        }
        if (d->ended || !readable(d->fd))
            break;
    }
    if (!d->ended)
        d->on_batch(d->data);
}

static void on_listen(uv_poll_t *h, int status, int events) {
    moat__dist_t *d = h->data;
    ErlConnect con;
    int fd;

    (void)events;
    if (status < 0)
        return;
    if (d->fd >= 0 || d->ended) {
        /* Serving already: no handshake, which would hold the loop (and
         * the session) while a peer takes its time. */
        fd = accept(d->lfd, NULL, NULL);
        if (fd >= 0) {
            close(fd);
            note(d, "warning", "moat_cnode: a second connection was refused");
        }
        return;
    }
    fd = ei_accept_tmo(&d->ec, d->lfd, &con, ACCEPT_TMO_MS);
    if (fd < 0) {
        note(d, "warning", "moat_cnode: a connection failed its handshake");
        return;
    }
    cloexec(fd);
    /* Frames are small and each one is awaited: no Nagle delay. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));
    if (uv_poll_init(d->loop, &d->cpoll, fd) != 0) {
        ei_close_connection(fd);
        return;
    }
    uv_mutex_lock(&d->lock);
    d->fd = fd;
    d->live = 1;
    uv_mutex_unlock(&d->lock);
    d->cpoll.data = d;
    d->cpoll_open = 1;
    uv_poll_start(&d->cpoll, UV_READABLE | UV_DISCONNECT, on_conn);
}

int moat__dist_start(moat__dist_t *d, uv_loop_t *loop, moat__outbox_t *ob,
                     const char *node, const char *cookie, const char **why) {
    const char *at = strchr(node, '@');
    char alive[EI_MAXALIVELEN + 1];
    struct in_addr addr;
    int port = 0, rc;

    d->loop = loop;
    d->ob = ob;
    d->lfd = d->epmd = d->fd = -1;
    rc = uv_mutex_init(&d->lock);
    if (rc != 0) {
        *why = "cannot make a lock";
        return rc;
    }
    d->lock_ready = 1;
    if (at == NULL || at == node || at[1] == '\0' ||
        (size_t)(at - node) > EI_MAXALIVELEN || strlen(node) > MAXNODELEN) {
        *why = "MOAT_NODE is not a node name, alive@host";
        return UV_EINVAL;
    }
    memcpy(alive, node, (size_t)(at - node));
    alive[at - node] = '\0';
    addr.s_addr = htonl(INADDR_LOOPBACK); /* unused by ei */
    if (ei_connect_xinit(&d->ec, at + 1, alive, node, &addr, cookie,
                         (short)(getpid() & 0x7fff)) < 0) {
        *why = "ei_connect_xinit refused the node name or cookie";
        return UV_EINVAL;
    }
    d->lfd = ei_listen(&d->ec, &port, 8);
    if (d->lfd < 0) {
        *why = "cannot listen";
        return UV_EIO;
    }
    cloexec(d->lfd);
    /* While this connection is open, epmd keeps the name published. */
    d->epmd = ei_publish(&d->ec, port);
    if (d->epmd < 0) {
        *why = "cannot publish the node name to epmd (is epmd running, "
               "and the name free?)";
        return UV_EIO;
    }
    cloexec(d->epmd);
    if (ei_x_new(&d->rx) < 0 || ei_x_new_with_version(&d->tx) < 0 ||
        ei_x_encode_tuple_header(&d->tx, 3) < 0 ||
        ei_x_encode_atom(&d->tx, "moat_cnode") < 0 ||
        ei_x_encode_pid(&d->tx, ei_self(&d->ec)) < 0 ||
        ei_x_append_buf(&d->tx, (const char[]){ERL_BINARY_EXT}, 1) < 0) {
        *why = "out of memory";
        return UV_ENOMEM;
    }
    d->prefix = d->tx.index;
    rc = uv_poll_init(loop, &d->lpoll, d->lfd);
    if (rc != 0) {
        *why = "cannot poll the listening socket";
        return rc;
    }
    d->lpoll.data = d;
    d->lpoll_open = 1;
    rc = uv_poll_start(&d->lpoll, UV_READABLE, on_listen);
    if (rc != 0) {
        *why = "cannot poll the listening socket";
        return rc;
    }
    moat__outbox_sink(ob, sink, d);
    return 0;
}

void moat__dist_stop(moat__dist_t *d) {
    d->ended = 1;
    if (d->cpoll_open)
        uv_close((uv_handle_t *)&d->cpoll, NULL);
    if (d->lpoll_open)
        uv_close((uv_handle_t *)&d->lpoll, NULL);
    d->cpoll_open = d->lpoll_open = 0;
    if (d->lock_ready) {
        uv_mutex_lock(&d->lock);
        d->live = 0;
        uv_mutex_unlock(&d->lock);
    }
    if (d->fd >= 0)
        ei_close_connection(d->fd);
    if (d->lfd >= 0)
        close(d->lfd);
    if (d->epmd >= 0)
        close(d->epmd); /* epmd forgets the name */
    d->fd = d->lfd = d->epmd = -1;
}

void moat__dist_free(moat__dist_t *d) {
    if (d->lock_ready)
        uv_mutex_destroy(&d->lock);
    d->lock_ready = 0;
    if (d->rx.buff != NULL)
        ei_x_free(&d->rx);
    if (d->tx.buff != NULL)
        ei_x_free(&d->tx);
}
