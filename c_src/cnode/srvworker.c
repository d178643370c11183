/*
 * srvworker.c: the native servers of `isolation => process`.  The parent
 * (procs.c runs its tasks) keeps the servers out of its own address space
 * and out of the task workers: they run in one more child, the server
 * worker, which is this executable in thread isolation with the pool's
 * servers, spoken to with the VM's own protocol (doc/cnode.md).
 *
 * DESIGN
 *
 * Why one process.  The native supervisor supervises the core's native
 * processes, so its servers must share an address space with it; a
 * process per server would make every restart a spawn (milliseconds, not
 * microseconds) and the strategies a second implementation.  The server
 * worker is the native supervisor's process: its hard fault is the
 * supervisor dying, which the parent reports as the supervisor giving up,
 * {gave_up, {native_crash, Signal}}, so the OTP tree above restarts the
 * pool (DESIGN.md §8, escalation).  A task's hard fault still costs only
 * its task worker: the servers keep their state.
 *
 * Relaying.  Everything runs on the parent's loop thread.  hello's
 * servers go to the servers' worker in a hello of its own (thread
 * isolation, the pool's size, libraries, servers, strategy and
 * intensity; no max_memory, which caps the task workers), and the parent
 * answers the VM's hello once the servers' worker has answered its own:
 * ready, or its {error, Reason} as it is.  Afterwards the VM's call, cast,
 * which_children, count_children and stop_servers frames, and the cancels
 * of the tags it holds, are forwarded byte for byte.  Its done and
 * stopped frames come back through the parent's outbox, and its reports
 * (restarts, crashed, gave_up, servers_stopped) as they are.
 *
 * Trust.  The servers' worker runs library code, so its frames are checked
 * as a task worker's are (moat__wframe_decode): a malformed frame, a
 * frame out of place, or an outcome for a tag it does not hold kills it
 * (SIGKILL), and its end is then reported with `protocol`.  The parent
 * keeps the tags it forwarded and not yet answered, so that each one
 * gets exactly one outcome however the servers' worker ends.
 *
 * Its end.  It is reaped by pid on SIGCHLD (its own signal handle: libuv
 * calls every handle of a signal), after its stdout has been read to the
 * end.  Each tag it held then ends {native_crash, Why} (the VM answers a
 * query that ends so as if no answer could come: every server
 * `restarting`), and the VM is told {gave_up, {native_crash, Why}}, or
 * {servers_stopped} when it was stopping them.  Before its ready, its
 * end fails the VM's hello.  Requests that come afterwards are answered
 * as a thread-isolation C-node whose supervisor gave up answers them:
 * noproc.
 *
 * Shutdown.  moat__srvw_stop closes its stdin (it exits on EOF, which
 * ends its servers with `shutdown`), SIGKILLs it after STOP_GRACE_MS,
 * and reaps it.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

#define LEN_BYTES 4

/* A frame of the servers' worker's larger than this is a protocol fault. */
#define MAX_FRAME (1u << 30)

/* How long stop waits for it to leave on its stdin's EOF (it leaves
 * within its own 10 ms exit grace, plus the sanitizers' reports). */
#define STOP_GRACE_MS 200

/* Its stdout's end is followed by its reaping within milliseconds, its
 * death being why; alive this long after (server code closed the
 * frames' descriptor), it can never answer again and is killed. */
#define EOF_GRACE_MS 500

typedef enum {
    S_STARTING, /* hello sent, no answer yet */
    S_READY,
    S_ENDED     /* refused hello, or its end was reported */
} sstate_t;

/* A tag forwarded to it and not answered. */
typedef struct {
    uint64_t tag;
    int cancelled; /* a cancel for it was forwarded: it may answer stopped */
} held_t;

struct moat__srvw_s {
    uv_loop_t *loop;
    moat__outbox_t *ob;
    moat__srvw_ready_cb ready;
    moat__procs_fatal_cb fatal;
    void *data;
    pid_t pid;
    sstate_t state;
    int reaped;
    int ignore;        /* its frames are no longer read */
    const char *why;   /* set when the parent killed it: the crash atom */
    int gave_up;       /* it reported {gave_up, _} itself */
    int stopping;      /* stop_servers forwarded */
    int stopped;       /* servers_stopped sent to the VM */
    held_t *held;      /* in no order */
    size_t nheld, capheld;
    uv_pipe_t in, out;
    int in_open, out_open;
    uv_signal_t sigchld;
    int sig_open;
    uv_timer_t eof;    /* armed once its stdout ended, until it is reaped */
    int eof_open;
    moat__wbuf_t rd;   /* its stdout */
};

/* One write: the 4-byte length, then the frame. */
typedef struct {
    uv_write_t req;
    char data[];
} wreq_t;

/* ------------------------------------------------------------- helpers */

static void on_written(uv_write_t *req, int status) {
    (void)status; /* a broken pipe: its reaping tells the rest */
    free(req);
}

/* Writes one frame (version byte first) to its stdin.  A failure is
 * left to its reaping: a servers' worker that cannot be written to is
 * ending, or is killed here for want of memory. */
static void fault(moat__srvw_t *s, const char *what, const char *why);

static void send_frame(moat__srvw_t *s, const char *etf, size_t len) {
    wreq_t *w;
    uv_buf_t b;

    if (!s->in_open || len > MAX_FRAME)
        return;
    w = malloc(sizeof *w + LEN_BYTES + len);
    if (w == NULL) {
        fault(s, "could not be written to (no memory)", "enomem");
        return;
    }
    moat__put_be32(w->data, (uint32_t)len);
    memcpy(w->data + LEN_BYTES, etf, len);
    b = uv_buf_init(w->data, (unsigned)(LEN_BYTES + len));
    if (uv_write(&w->req, (uv_stream_t *)&s->in, &b, 1, on_written) != 0)
        free(w);
}

static int hold(moat__srvw_t *s, uint64_t tag) {
    if (s->nheld == s->capheld) {
        size_t cap = s->capheld > 0 ? 2 * s->capheld : 64;
        held_t *h = realloc(s->held, cap * sizeof *h);
        if (h == NULL)
            return UV_ENOMEM;
        s->held = h;
        s->capheld = cap;
    }
    s->held[s->nheld++] = (held_t){tag, 0};
    return 0;
}

/* The held entry of `tag`, or NULL. */
static held_t *find(moat__srvw_t *s, uint64_t tag) {
    for (size_t i = 0; i < s->nheld; i++)
        if (s->held[i].tag == tag)
            return &s->held[i];
    return NULL;
}

static void unhold(moat__srvw_t *s, held_t *h) {
    *h = s->held[--s->nheld];
}

static void answer_atom(moat__srvw_t *s, uint64_t tag, moat_atom_t a) {
    size_t len;
    const char *etf = moat_term_data(moat_atom(a), &len);

    moat__outbox_done(s->ob, tag, MOAT_EXIT, etf + 1, len - 1);
}

/* {servers_stopped}, the answer to each stop_servers. */
static void send_servers_stopped(moat__srvw_t *s) {
    static const char frame[] = {(char)131, 104, 1, 119, 15,
                                 's', 'e', 'r', 'v', 'e', 'r', 's', '_',
                                 's', 't', 'o', 'p', 'p', 'e', 'd'};

    moat__outbox_frame(s->ob, frame, sizeof frame);
    s->stopped = 1;
}

/* Kills it for a fault of its own; its end is reported once reaped. */
static void fault(moat__srvw_t *s, const char *what, const char *why) {
    if (s->ignore)
        return;
    moat__outbox_logf(s->ob, "error",
                      "moat_cnode: the servers' worker (pid %ld) %s: killed",
                      (long)s->pid, what);
    s->ignore = 1;
    s->why = why;
    if (!s->reaped) /* else the pid may be another process's by now */
        kill(s->pid, SIGKILL);
}

/* --------------------------------------------------------------- hello */

static const char *restart_name(int r) {
    return r == MOAT_PERMANENT   ? "permanent"
           : r == MOAT_TRANSIENT ? "transient"
                                 : "temporary";
}

static const char *strategy_name(int s) {
    return s == MOAT_ONE_FOR_ALL    ? "one_for_all"
           : s == MOAT_REST_FOR_ONE ? "rest_for_one"
                                    : "one_for_one";
}

/* Appends a core term's encoding, without its version byte. */
static int x_term(ei_x_buff *x, const moat_term_t *t) {
    size_t len;
    const char *d = moat_term_data(t, &len);
    return ei_x_append_buf(x, d + 1, (int)(len - 1));
}

/* The servers' worker's hello: the VM's, in thread isolation. */
static int make_hello(ei_x_buff *x, const moat__hello_t *h) {
    const char *name = h->name[0] != '\0' ? h->name : "cnode";
    int ok;

    ok = ei_x_encode_tuple_header(x, 2) == 0 &&
         ei_x_encode_atom(x, "hello") == 0 &&
         ei_x_encode_map_header(x, 6 + (h->size > 0) + (h->max_queue > 0)) ==
             0 &&
         ei_x_encode_atom(x, "name") == 0 &&
         ei_x_encode_atom_len_as(x, name, (int)strlen(name), ERLANG_UTF8,
                                 ERLANG_UTF8) == 0 &&
         ei_x_encode_atom(x, "strategy") == 0 &&
         ei_x_encode_atom(x, strategy_name(h->strategy)) == 0 &&
         ei_x_encode_atom(x, "max_restarts") == 0 &&
         ei_x_encode_ulong(x, h->max_restarts) == 0 &&
         ei_x_encode_atom(x, "max_seconds") == 0 &&
         ei_x_encode_ulong(x, h->max_seconds) == 0 &&
         (h->size == 0 || (ei_x_encode_atom(x, "size") == 0 &&
                           ei_x_encode_ulong(x, h->size) == 0)) &&
         (h->max_queue == 0 || (ei_x_encode_atom(x, "max_queue") == 0 &&
                                ei_x_encode_ulong(x, h->max_queue) == 0)) &&
         ei_x_encode_atom(x, "libraries") == 0 &&
         (h->nlibraries == 0 ||
          ei_x_encode_list_header(x, (long)h->nlibraries) == 0);
    for (size_t i = 0; ok && i < h->nlibraries; i++)
        ok = ei_x_encode_binary(x, h->libraries[i],
                                (long)strlen(h->libraries[i])) == 0;
    ok = ok && ei_x_encode_empty_list(x) == 0 &&
         ei_x_encode_atom(x, "servers") == 0 &&
         ei_x_encode_list_header(x, (long)h->nservers) == 0;
    for (size_t i = 0; ok && i < h->nservers; i++) {
        const moat__child_t *c = &h->servers[i];
        ok = ei_x_encode_tuple_header(x, 6) == 0 && x_term(x, c->id) == 0 &&
             ei_x_encode_ulong(x, c->lib) == 0 &&
             ei_x_append_buf(x, c->server.etf, (int)c->server.etf_len) == 0 &&
             x_term(x, c->args) == 0 &&
             ei_x_encode_atom(x, restart_name(c->restart)) == 0 &&
             (c->shutdown_ms == MOAT_SHUTDOWN_BRUTAL
                  ? ei_x_encode_atom(x, "brutal_kill") == 0
              : c->shutdown_ms == MOAT_SHUTDOWN_INFINITY
                  ? ei_x_encode_atom(x, "infinity") == 0
                  : ei_x_encode_long(x, c->shutdown_ms) == 0);
    }
    ok = ok && ei_x_encode_empty_list(x) == 0;
    return ok ? 0 : UV_ENOMEM;
}

/* -------------------------------------------------------------- frames */

static void handle_wframe(moat__srvw_t *s, const char *buf, size_t len) {
    moat__wframe_t f;
    int rc = moat__wframe_decode(buf, len, &f);
    char what[200];

    if (rc != 0) {
        snprintf(what, sizeof what, "sent a malformed frame (%s)",
                 rc == UV_ENOMEM ? "no memory to read it" : f.why);
        fault(s, what, rc == UV_ENOMEM ? "enomem" : "protocol");
        moat__wframe_free(&f);
        return;
    }
    if (f.kind == MOAT__WFRAME_LOG) {
        moat__outbox_log(s->ob, f.level, f.msg, f.msg_len);
    } else if (s->state == S_STARTING) {
        if (f.kind == MOAT__WFRAME_READY) {
            s->state = S_READY;
            s->ready(s->data, NULL, 0, NULL);
        } else if (f.kind == MOAT__WFRAME_ERROR) {
            s->state = S_ENDED; /* it exits with status 2 */
            s->ignore = 1;
            s->ready(s->data, f.reason, f.reason_len, NULL);
        } else {
            fault(s, "answered hello with neither ready nor error",
                  "protocol");
        }
    } else {
        switch (f.kind) {
        case MOAT__WFRAME_DONE:
            for (size_t i = 0; i < f.ndone && !s->ignore; i++) {
                const moat__wdone_t *d = &f.done[i];
                held_t *h = find(s, d->tag);
                if (h == NULL) {
                    fault(s, "answered a tag it does not hold", "protocol");
                } else {
                    unhold(s, h);
                    moat__outbox_done(s->ob, d->tag, d->kind, d->term,
                                      d->len);
                }
            }
            break;
        case MOAT__WFRAME_STOPPED:
            for (size_t i = 0; i < f.ntags && !s->ignore; i++) {
                held_t *h = find(s, f.tags[i]);
                if (h == NULL || !h->cancelled) {
                    fault(s, "stopped a tag it was not asked to stop",
                          "protocol");
                } else {
                    unhold(s, h);
                    moat__outbox_stopped(s->ob, &f.tags[i], 1);
                }
            }
            break;
        case MOAT__WFRAME_SERVERS_STOPPED:
            if (!s->stopping || s->stopped)
                fault(s, "said servers_stopped unasked", "protocol");
            else
                send_servers_stopped(s);
            break;
        case MOAT__WFRAME_GAVE_UP:
            s->gave_up = 1;
            moat__outbox_frame(s->ob, buf, len);
            break;
        case MOAT__WFRAME_RESTARTS:
        case MOAT__WFRAME_CRASHED:
            moat__outbox_frame(s->ob, buf, len);
            break;
        default:
            fault(s, "sent a frame out of place", "protocol");
            break;
        }
    }
    moat__wframe_free(&f);
}

/* A frame it wrote: handled unless it is no longer listened to. */
static int on_frame(void *data, const char *buf, size_t len) {
    moat__srvw_t *s = data;

    if (!s->ignore)
        handle_wframe(s, buf, len);
    return s->ignore;
}

static void parse_rc(moat__srvw_t *s, int rc) {
    if (rc == UV_E2BIG)
        fault(s, "sent a frame over the size limit", "protocol");
    else if (rc == UV_ENOMEM)
        fault(s, "left no memory for its frames", "enomem");
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    moat__srvw_t *s = h->data;

    (void)hint;
    moat__wbuf_alloc(&s->rd, buf);
}

static void on_eof(uv_timer_t *t) {
    fault(t->data, "lives on after its output ended", "protocol");
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
    moat__srvw_t *s = st->data;

    (void)buf;
    if (nread < 0) {
        /* EOF: it is ending, and its reaping tells the rest, unless it
         * lives on (on_eof). */
        uv_read_stop(st);
        if (nread == UV_ENOBUFS)
            fault(s, "left no memory for its frames", "enomem");
        else if (!s->reaped && s->eof_open)
            uv_timer_start(&s->eof, on_eof, EOF_GRACE_MS, 0);
        return;
    }
    if (s->ignore)
        return;
    s->rd.len += (size_t)nread;
    parse_rc(s, moat__wbuf_parse(&s->rd, MAX_FRAME, on_frame, s));
}

/* Reads what it left in its stdout once reaped, to the end. */
static void drain(moat__srvw_t *s) {
    int fd;

    if (s->out_open && !s->ignore &&
        uv_fileno((uv_handle_t *)&s->out, &fd) == 0)
        parse_rc(s, moat__wbuf_drain(&s->rd, fd, MAX_FRAME, on_frame, s));
}

/* ----------------------------------------------------------------- end */

static void close_handles(moat__srvw_t *s) {
    if (s->in_open) {
        s->in_open = 0;
        uv_close((uv_handle_t *)&s->in, NULL);
    }
    if (s->out_open) {
        s->out_open = 0;
        uv_close((uv_handle_t *)&s->out, NULL);
    }
    if (s->sig_open) {
        s->sig_open = 0;
        uv_close((uv_handle_t *)&s->sigchld, NULL);
    }
    if (s->eof_open) {
        s->eof_open = 0;
        uv_close((uv_handle_t *)&s->eof, NULL);
    }
}

/* {native_crash, Why} for an end with wait status st. */
static int crash_reason(moat__srvw_t *s, int st, ei_x_buff *x) {
    char why[32];

    if (s->why != NULL)
        snprintf(why, sizeof why, "%s", s->why);
    else if (WIFSIGNALED(st))
        moat__signal_name(WTERMSIG(st), why, sizeof why);
    else if (WEXITSTATUS(st) == MOAT_CNODE_EXIT_NOMEM)
        snprintf(why, sizeof why, "enomem");
    else
        why[0] = '\0';
    if (ei_x_encode_tuple_header(x, 2) < 0 ||
        ei_x_encode_atom(x, "native_crash") < 0)
        return UV_ENOMEM;
    if (why[0] != '\0')
        return ei_x_encode_atom(x, why) < 0 ? UV_ENOMEM : 0;
    return ei_x_encode_tuple_header(x, 2) < 0 ||
                   ei_x_encode_atom(x, "exit_status") < 0 ||
                   ei_x_encode_long(x, WEXITSTATUS(st)) < 0
               ? UV_ENOMEM
               : 0;
}

/* It ended with wait status st: see DESIGN, "Its end". */
static void ended(moat__srvw_t *s, int st) {
    sstate_t was = s->state;
    ei_x_buff reason, x;
    char what[32];

    s->state = S_ENDED;
    close_handles(s);
    if (was == S_ENDED)
        return;
    if (ei_x_new(&reason) < 0 || crash_reason(s, st, &reason) != 0) {
        ei_x_free(&reason);
        s->fatal(s->data, MOAT_CNODE_EXIT_NOMEM); /* outcomes would be lost */
        return;
    }
    if (WIFSIGNALED(st))
        snprintf(what, sizeof what, "signal %d", WTERMSIG(st));
    else
        snprintf(what, sizeof what, "exit status %d", WEXITSTATUS(st));
    if (was == S_STARTING) {
        char msg[200];
        snprintf(msg, sizeof msg, "the servers' worker ended (%s) before ready",
                 what);
        s->ready(s->data, NULL, 0, msg);
        ei_x_free(&reason);
        return;
    }
    moat__outbox_logf(s->ob, "error",
                      "moat_cnode: the servers' worker (pid %ld) ended (%s); "
                      "the pool's servers are gone",
                      (long)s->pid, what);
    for (size_t i = 0; i < s->nheld; i++)
        moat__outbox_done(s->ob, s->held[i].tag, MOAT_EXIT, reason.buff,
                          (size_t)reason.index);
    s->nheld = 0;
    if (s->stopping || s->stopped) { /* the owner is stopping the pool */
        if (!s->stopped)
            send_servers_stopped(s);
    } else if (!s->gave_up) {
        if (ei_x_new_with_version(&x) == 0 &&
            ei_x_encode_tuple_header(&x, 2) == 0 &&
            ei_x_encode_atom(&x, "gave_up") == 0 &&
            ei_x_append_buf(&x, reason.buff, reason.index) == 0)
            moat__outbox_frame(s->ob, x.buff, (size_t)x.index);
        ei_x_free(&x);
        s->gave_up = 1;
    }
    ei_x_free(&reason);
}

static void on_sigchld(uv_signal_t *h, int signum) {
    moat__srvw_t *s = h->data;
    int st;

    (void)signum;
    /* Without a pid (its spawn failed) there is nothing of its own to
     * reap: waitpid(0) would take any child's death. */
    if (s->pid <= 0 || s->reaped || waitpid(s->pid, &st, WNOHANG) != s->pid)
        return;
    s->reaped = 1;
    drain(s);
    ended(s, st);
}

/* ------------------------------------------------------------------ API */

int moat__srvw_start(uv_loop_t *loop, moat__outbox_t *ob, const char *exe,
                     const moat__hello_t *h, moat__srvw_ready_cb ready,
                     moat__procs_fatal_cb fatal, void *data,
                     moat__srvw_t **out) {
    moat__srvw_t *s = calloc(1, sizeof *s);
    ei_x_buff x;
    int in = -1, fd_out = -1, rc;

    *out = s;
    if (s == NULL)
        return UV_ENOMEM;
    s->loop = loop;
    s->ob = ob;
    s->ready = ready;
    s->fatal = fatal;
    s->data = data;
    s->state = S_ENDED; /* until it has been spawned and written to */
    if (ei_x_new_with_version(&x) < 0)
        return UV_ENOMEM;
    rc = make_hello(&x, h);
    if (rc == 0 && (rc = uv_signal_init(loop, &s->sigchld)) == 0) {
        s->sig_open = 1;
        s->sigchld.data = s;
        /* Before the spawn, so that its end cannot go unnoticed. */
        rc = uv_signal_start(&s->sigchld, on_sigchld, SIGCHLD);
    }
    if (rc == 0 && (rc = uv_timer_init(loop, &s->eof)) == 0) {
        s->eof_open = 1;
        s->eof.data = s;
    }
    if (rc != 0 || (rc = moat__spawn_worker(exe, &s->pid, &in, &fd_out)) != 0)
        goto done;
    if ((rc = uv_pipe_init(loop, &s->in, 0)) != 0)
        goto fail;
    s->in.data = s;
    s->in_open = 1;
    if ((rc = uv_pipe_open(&s->in, in)) != 0)
        goto fail;
    in = -1;
    if ((rc = uv_pipe_init(loop, &s->out, 0)) != 0)
        goto fail;
    s->out.data = s;
    s->out_open = 1;
    if ((rc = uv_pipe_open(&s->out, fd_out)) != 0)
        goto fail;
    fd_out = -1;
    if ((rc = uv_read_start((uv_stream_t *)&s->out, on_alloc, on_read)) != 0)
        goto fail;
    s->state = S_STARTING;
    send_frame(s, x.buff, (size_t)x.index);
    goto done;
fail: /* spawned: killed here, reaped by moat__srvw_stop */
    s->ignore = 1;
    kill(s->pid, SIGKILL);
    if (in >= 0)
        close(in);
    if (fd_out >= 0)
        close(fd_out);
done:
    ei_x_free(&x);
    return rc;
}

int moat__srvw_frame(moat__srvw_t *s, const moat__frame_t *f,
                     const char *buf, size_t len) {
    int ready = s->state == S_READY && !s->ignore;
    held_t *h;

    switch (f->kind) {
    case MOAT__FRAME_CALL:
    case MOAT__FRAME_WHICH_CHILDREN:
    case MOAT__FRAME_COUNT_CHILDREN:
        if (!ready)
            answer_atom(s, f->tag, MOAT_A_NOPROC);
        else if (hold(s, f->tag) != 0)
            answer_atom(s, f->tag, MOAT_A_ENOMEM);
        else
            send_frame(s, buf, len);
        return 1;
    case MOAT__FRAME_CAST:
        if (ready)
            send_frame(s, buf, len);
        return 1;
    case MOAT__FRAME_STOP_SERVERS:
        if (!ready || s->stopped) {
            send_servers_stopped(s);
        } else if (!s->stopping) {
            s->stopping = 1;
            send_frame(s, buf, len);
        }
        return 1;
    case MOAT__FRAME_CANCEL:
        if ((h = find(s, f->tag)) == NULL)
            return 0; /* a task's */
        if (ready) {
            h->cancelled = 1;
            send_frame(s, buf, len);
        } else { /* killed, not reaped yet: its answer will not come */
            unhold(s, h);
            moat__outbox_stopped(s->ob, &f->tag, 1);
        }
        return 1;
    default:
        return 0;
    }
}

void moat__srvw_stop(moat__srvw_t *s) {
    uint64_t deadline;
    int st;

    if (s == NULL)
        return;
    s->ignore = 1;
    if (s->in_open) { /* EOF on its stdin */
        s->in_open = 0;
        uv_close((uv_handle_t *)&s->in, NULL);
    }
    if (s->pid > 0 && !s->reaped) {
        deadline = uv_hrtime() + (uint64_t)STOP_GRACE_MS * 1000000u;
        while (waitpid(s->pid, &st, WNOHANG) != s->pid) {
            if (uv_hrtime() >= deadline) {
                kill(s->pid, SIGKILL);
                while (waitpid(s->pid, &st, 0) < 0 && errno == EINTR)
                    ;
                break;
            }
            uv_sleep(1);
        }
        s->reaped = 1;
    }
    s->state = S_ENDED;
    close_handles(s);
}

void moat__srvw_free(moat__srvw_t *s) {
    if (s == NULL)
        return;
    free(s->held);
    moat__wbuf_free(&s->rd);
    free(s);
}
