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
 * Reading.  The loop thread reads the socket itself, without ei: ei's
 * receive reads a message in several system calls and, when only part of
 * it has come, waits for the rest, holding the loop.  Whatever the socket
 * has is read into a buffer in one call, split into packets, and each
 * packet decoded by moat__dist_decode (frame.c), which checks every bound;
 * a partial packet waits in the buffer for the next read.  The loop
 * answers the VM's ticks (empty packets) with one, and acknowledges an
 * unlink, as the protocol asks; it ignores the control messages it does
 * not act on (a monitor, a link) and logs a packet it cannot read.
 *
 * Writes.  Outcomes are sent by the pool thread that decided them, with
 * ei_send, rather than handed to the loop thread (a wake-up that cost 90
 * us a round trip here, three times the bare ei echo).  Two writers must
 * never interleave their bytes, so every write (ei_send, a tick's answer,
 * an acknowledgement) holds the socket's lock.  Reads take no lock.  A
 * send that fails shuts the socket down, and the loop thread, reading,
 * ends the session.
 *
 * Session.  One connection is served; later ones are accepted and closed
 * at once, without a handshake, and a hello from another process is
 * answered with an error.  (A frame sent to this node's pid carries no
 * sender, so it cannot be told from the owner's: any process of the
 * owner's node could send one.)
 * The session ends when the connection closes, or when the owner exits:
 * the owner links to this node's pid, so its exit arrives as an EXIT
 * message whatever its reason.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cnode.h"
#include "etf.h"
#include "frame.h"

/* How long the handshake of a new connection may take. */
#define ACCEPT_TMO_MS 5000
/* Reads per wake-up, each of up to the buffer's room, before the runs
 * read so far are submitted. */
#define READS 16

/* The longest packet read: a port frame's bound (moat_cnode.c). */
#define MAX_PACKET (1u << 30)

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

/* The frame a message carries: the bytes of the binary that is the whole
 * message (version byte first).  Returns 0 or -1. */
static int frame_of(const char *msg, size_t len, const char **buf,
                    size_t *flen) {
    if (len < 1 + BIN_HEAD || (unsigned char)msg[0] != ETF_VERSION ||
        msg[1] != TAG_BINARY ||
        moat__be32(msg + 2) != len - 1 - BIN_HEAD)
        return -1;
    *buf = msg + 1 + BIN_HEAD;
    *flen = len - 1 - BIN_HEAD;
    return 0;
}

/* A pid of a packet as ei has it.  Returns 0, or -1 when its node's name
 * is not one. */
static int pid_of(const moat__pid_t *p, erlang_pid *out) {
    size_t n = moat__atom_utf8(&p->node, out->node, sizeof out->node);
    if (n == 0 || n > MAXNODELEN || (!p->node.latin1 && n != p->node.len))
        return -1;
    out->num = p->num;
    out->serial = p->serial;
    out->creation = p->creation;
    return 0;
}

/* Writes all of buf[0..len) to the connection.  Returns 0 or -1.  lock
 * held. */
static int write_all(moat__dist_t *d, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t w = send(d->fd, buf, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Writes one packet, its length first, unless the session is over; one
 * that cannot be written shuts the socket down (see sink). */
static void put_packet(moat__dist_t *d, const char *buf, size_t len) {
    uv_mutex_lock(&d->lock);
    if (d->live && write_all(d, buf, len) != 0) {
        shutdown(d->fd, SHUT_RDWR);
        d->live = 0;
    }
    uv_mutex_unlock(&d->lock);
}

/* Acknowledges an unlink: {UNLINK_ID_ACK, Id, To, From} of the unlink's
 * {UNLINK_ID, Id, From, To}. */
static void unlink_ack(moat__dist_t *d, const moat__dist_msg_t *m) {
    /* the length, filled in below, and the pass-through byte */
    static const char head[5] = {0, 0, 0, 0, MOAT__PASS_THROUGH};
    erlang_pid from, to;
    ei_x_buff x;

    if (pid_of(&m->from, &from) != 0 || pid_of(&m->to, &to) != 0)
        return;
    if (ei_x_new(&x) < 0)
        return;
    if (ei_x_append_buf(&x, head, sizeof head) == 0 &&
        ei_x_encode_version(&x) == 0 &&
        ei_x_encode_tuple_header(&x, 4) == 0 &&
        ei_x_encode_long(&x, MOAT__OP_UNLINK_ID_ACK) == 0 &&
        ei_x_append_buf(&x, m->id, (int)m->id_len) == 0 &&
        ei_x_encode_pid(&x, &to) == 0 && ei_x_encode_pid(&x, &from) == 0) {
        moat__put_be32(x.buff, (uint32_t)x.index - 4);
        put_packet(d, x.buff, (size_t)x.index);
    }
    ei_x_free(&x);
}

/* A message: to `moat` (hello, or a frame), to this node's pid (a frame),
 * or to `moat_echo`. */
static void on_send(moat__dist_t *d, const moat__dist_msg_t *m) {
    const moat__atom_t *to = &m->toname; /* reg only */
    int reg = m->kind == MOAT__DIST_REG_SEND;
    erlang_pid from;
    const char *buf;
    size_t len;

    if (reg && pid_of(&m->from, &from) != 0) {
        note(d, "error", "moat_cnode: a message from a pid that cannot be "
                         "read was ignored");
        return;
    }
    if (reg && to->len == 9 && memcmp(to->name, "moat_echo", 9) == 0) {
        uv_mutex_lock(&d->lock);
        if (d->live)
            ei_send(d->fd, &from, (char *)m->msg, (int)m->msg_len);
        uv_mutex_unlock(&d->lock);
        return;
    }
    if (reg && !(to->len == 4 && memcmp(to->name, "moat", 4) == 0)) {
        note(d, "warning", "moat_cnode: a message to an unknown name was "
                           "ignored");
        return;
    }
    if (reg && !d->has_owner) {
        uv_mutex_lock(&d->lock);
        d->owner = from;
        d->has_owner = 1;
        uv_mutex_unlock(&d->lock);
    } else if (reg && !pid_eq(&from, &d->owner)) {
        refuse(d, &from);
        return;
    } else if (!d->has_owner) {
        note(d, "warning", "moat_cnode: a frame before hello was ignored");
        return;
    }
    if (frame_of(m->msg, m->msg_len, &buf, &len) != 0) {
        note(d, "error", "moat_cnode: a message that is not a binary frame "
                         "was ignored");
        return;
    }
    d->on_frame(d->data, buf, len);
}

/* One packet's body, buf[0..len).  Returns nonzero once the session is
 * over, which stops the parse. */
static int on_packet(void *data, const char *buf, size_t len) {
    static const char tock[4] = {0, 0, 0, 0};
    moat__dist_t *d = data;
    moat__dist_msg_t m;
    erlang_pid from;

    if (d->ended)
        return 1;
    if (moat__dist_decode(buf, len, &m) != 0) {
        note(d, "error", "moat_cnode: a distribution packet that cannot be "
                         "read was ignored");
        return 0;
    }
    switch (m.kind) {
    case MOAT__DIST_TICK:
        put_packet(d, tock, sizeof tock);
        break;
    case MOAT__DIST_SEND:
    case MOAT__DIST_REG_SEND:
        on_send(d, &m);
        break;
    case MOAT__DIST_EXIT:
        if (d->has_owner && pid_of(&m.from, &from) == 0 &&
            pid_eq(&from, &d->owner))
            end(d, "the pool's owner exited");
        break;
    case MOAT__DIST_UNLINK_ID:
        unlink_ack(d, &m);
        break;
    case MOAT__DIST_OTHER: /* the owner's link, a monitor, ... */
        break;
    }
    return d->ended;
}

static void on_conn(uv_poll_t *h, int status, int events) {
    moat__dist_t *d = h->data;

    (void)events;
    if (status < 0) {
        end(d, "the connection failed");
        return;
    }
    for (int k = 0; k < READS && !d->ended; k++) {
        uv_buf_t room;
        ssize_t r;
        int rc;

        moat__wbuf_alloc(&d->rd, &room);
        if (room.base == NULL) {
            shutdown(d->fd, SHUT_RDWR);
            end(d, "out of memory for a packet");
            return;
        }
        r = recv(d->fd, room.base, room.len, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (r <= 0) {
            end(d, "the connection closed");
            return;
        }
        d->rd.len += (size_t)r;
        rc = moat__wbuf_parse(&d->rd, MAX_PACKET, on_packet, d);
        if (rc == UV_E2BIG) {
            shutdown(d->fd, SHUT_RDWR);
            end(d, "a packet longer than 1 GiB");
            return;
        }
        if ((size_t)r < room.len)
            break; /* all there was */
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
    if (ei_x_new_with_version(&d->tx) < 0 ||
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
    moat__wbuf_free(&d->rd);
    if (d->tx.buff != NULL)
        ei_x_free(&d->tx);
}
