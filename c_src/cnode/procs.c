/*
 * procs.c: `isolation => process`.  The C-node (the parent) runs each task
 * in a worker: a process of its own that is this same executable in thread
 * isolation with one thread, so that a hard fault ends one worker and the
 * one task in it, not the node.
 *
 * DESIGN
 *
 * Threads.  Everything here runs on the parent's loop thread, which lives
 * as long as the parent: the parent starts no pool.  Workers are spawned
 * from it with posix_spawn (fast whatever the parent's size, REFERENCE.md
 * §7), so their parent-death signal, which follows the spawning thread,
 * fires only when the parent is gone.  A worker's stdin and stdout are
 * pipes the loop writes and reads (libuv pipes, never blocking); its
 * stderr is the parent's (the errlog pipe), so what it says before its
 * own errlog starts still reaches the VM.
 *
 * The protocol to a worker is the VM's (doc/cnode.md): hello with size 1,
 * max_queue 1, the node's libraries, and max_memory when set; then run
 * and cancel.  It answers ready, done, stopped and log.  Its frames are
 * not trusted: each one is checked and decoded with bounds
 * (moat__wframe_decode), and a malformed one, or one that does not fit
 * what the worker was asked (a tag it does not hold, a second ready),
 * kills the worker, whose task (if any) ends {native_crash, protocol}.
 *
 * Workers.  The parent keeps size + spares live workers (starting, idle
 * or busy), of which at most `size` are busy; the spares are idle
 * processes ready to take over at once when a busy one dies.  A run goes
 * to an idle worker or waits in a FIFO queue; size + max_queue tasks at
 * most are admitted (running or queued), as the thread pool admits them,
 * and a run beyond that is answered `overloaded`.  A worker's done entry
 * for its task goes to the VM and the worker becomes idle.
 *
 * Deaths.  SIGCHLD (a uv_signal_t) makes the loop call waitpid(pid,
 * WNOHANG) for each worker not yet reaped, never waitpid(-1).  A reaped
 * worker's stdout is read to its end first, so a done it wrote before
 * dying counts.  A worker that died with its task gives that task
 * {native_crash, Signal} (sigsegv, sigabrt, ...), {native_crash, enomem}
 * for the worker's own out-of-memory exit status, or {native_crash,
 * {exit_status, N}}, and does not count toward the intensity; one that
 * died starting or idle does, and more than max_restarts such deaths
 * within max_seconds end the node (MOAT_CNODE_EXIT_WORKERS).  Every death
 * is replaced at once, so the spares never run out for long.
 *
 * Cancels.  A queued run is dropped and its tag reported stopped at once.
 * For a running one, `killed` and `timeout` SIGKILL the worker (a real
 * kill), and its tag is reported stopped once the worker is reaped;
 * `shutdown` is forwarded, and the worker answers stopped or done, which
 * goes to the VM as it is.
 *
 * Shutdown.  moat__procs_stop closes every worker's stdin (a worker exits
 * with status 0 on EOF), SIGKILLs those still alive after STOP_GRACE_MS,
 * and reaps them all, so that no worker outlives the parent.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

extern char **environ;

#define LEN_BYTES 4

/* A worker's frame larger than this is a protocol fault (the VM's own
 * bound on frames it sends). */
#define WORKER_MAX_FRAME (1u << 30)

/* A read from a worker asks for at least this much room. */
#define READ_MIN (64u * 1024u)

/* How long stop waits for workers to leave on their stdin's EOF before
 * SIGKILLing them: a worker leaves within its own 10 ms exit grace, plus
 * the sanitizers' exit reports in the test builds. */
#define STOP_GRACE_MS 200

/* The core's default max_queue (moat_core.h). */
#define DEFAULT_MAX_QUEUE 65536

typedef enum {
    W_STARTING, /* spawned, hello sent, no ready yet */
    W_IDLE,
    W_BUSY,     /* runs `tag` */
    W_DYING,    /* killed by the parent; gone once reaped */
    W_ENDING    /* its stdin closed by moat__procs_stop */
} wstate_t;

/* A packet to write (a worker's run, cancel or hello, or a queued run):
 * the 4-byte length, then the term.  The write request comes first, so
 * that the write callback can free it. */
typedef struct packet_s {
    uv_write_t req;
    struct packet_s *next; /* in the queue */
    uint64_t tag;
    size_t len;
    char data[];
} packet_t;

typedef struct worker_s {
    struct worker_s *next;
    moat__procs_t *p;
    pid_t pid;
    wstate_t state;
    uint64_t tag;     /* W_BUSY: its task; W_DYING: see stop_tag */
    int stop_tag;     /* W_DYING: report `tag` stopped once reaped */
    int cancelled;    /* W_BUSY: a shutdown cancel was forwarded */
    int reaped;
    int ignore;       /* its frames are no longer read */
    uv_pipe_t in, out;
    int nopen;        /* handles not closed yet */
    int in_open, out_open;
    char *rbuf;
    size_t rlen, rcap;
} worker_t;

struct moat__procs_s {
    uv_loop_t *loop;
    moat__outbox_t *ob;
    moat__procs_fatal_cb fatal;
    void *data;
    char *exe;
    unsigned size, spares, max_restarts;
    uint64_t max_ms;         /* max_seconds in ms */
    size_t max_queue;
    worker_t *workers;       /* every worker not yet freed */
    unsigned nlive;          /* starting, idle or busy */
    unsigned nbusy;
    packet_t *queue, **queue_tail;
    size_t nqueue;
    uint64_t *deaths;        /* ring: times of the last max_restarts + 1
                                deaths that count */
    size_t ndeaths, dhead;
    uv_signal_t sigchld;
    int sig_open;
    ei_x_buff hello;         /* the workers' hello, with its version */
    int stopping;            /* no more spawning */
};

static void replenish(moat__procs_t *p);
static void dispatch(moat__procs_t *p);

/* ------------------------------------------------------------ helpers */

static void put_be32(char *b, uint32_t v) {
    b[0] = (char)(v >> 24);
    b[1] = (char)(v >> 16);
    b[2] = (char)(v >> 8);
    b[3] = (char)v;
}

static uint32_t be32(const char *b) {
    const unsigned char *u = (const unsigned char *)b;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 |
           u[3];
}

/* A packet holding x's bytes; NULL when memory is short. */
static packet_t *packet_new(uint64_t tag, const ei_x_buff *x) {
    packet_t *k = malloc(sizeof *k + LEN_BYTES + (size_t)x->index);

    if (k == NULL)
        return NULL;
    k->next = NULL;
    k->tag = tag;
    k->len = LEN_BYTES + (size_t)x->index;
    put_be32(k->data, (uint32_t)x->index);
    memcpy(k->data + LEN_BYTES, x->buff, (size_t)x->index);
    return k;
}

static void on_written(uv_write_t *req, int status) {
    (void)status; /* a dead worker's stdin: its reaping tells the rest */
    free(req);
}

/* Writes packet k (owned from now on) to the worker's stdin. */
static void send_packet(worker_t *w, packet_t *k) {
    uv_buf_t b = uv_buf_init(k->data, (unsigned)k->len);

    if (!w->in_open ||
        uv_write(&k->req, (uv_stream_t *)&w->in, &b, 1, on_written) != 0)
        free(k);
}

/* Answers {Tag, exit, Term}, Term encoded in x without a version. */
static void answer_x(moat__procs_t *p, uint64_t tag, ei_x_buff *x) {
    moat__outbox_done(p->ob, tag, MOAT_EXIT, x->buff, (size_t)x->index);
}

static void answer_atom(moat__procs_t *p, uint64_t tag, moat_atom_t a) {
    size_t len;
    const char *etf = moat_term_data(moat_atom(a), &len);

    moat__outbox_done(p->ob, tag, MOAT_EXIT, etf + 1, len - 1);
}

/* {native_crash, What}: `what` an atom, or with `status` >= 0 the tuple
 * {exit_status, Status}. */
static void answer_crash(moat__procs_t *p, uint64_t tag, const char *what,
                         int status) {
    ei_x_buff x;

    if (ei_x_new(&x) < 0 || ei_x_encode_tuple_header(&x, 2) < 0 ||
        ei_x_encode_atom(&x, "native_crash") < 0 ||
        (status >= 0
             ? ei_x_encode_tuple_header(&x, 2) < 0 ||
                   ei_x_encode_atom(&x, "exit_status") < 0 ||
                   ei_x_encode_long(&x, status) < 0
             : ei_x_encode_atom(&x, what) < 0)) {
        ei_x_free(&x);
        answer_atom(p, tag, MOAT_A_ENOMEM);
        return;
    }
    answer_x(p, tag, &x);
    ei_x_free(&x);
}

/* The lowercase name of a signal, "sigsegv"; "signal_N" when unknown. */
static void signal_name(int sig, char *out, size_t cap) {
    const char *abbrev = sigabbrev_np(sig);

    if (abbrev == NULL) {
        snprintf(out, cap, "signal_%d", sig);
        return;
    }
    snprintf(out, cap, "sig%s", abbrev);
    for (char *c = out; *c != '\0'; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c = (char)(*c - 'A' + 'a');
}

/* Describes a wait status for logs. */
static void describe(int st, char *out, size_t cap) {
    char sig[32];

    if (WIFSIGNALED(st)) {
        signal_name(WTERMSIG(st), sig, sizeof sig);
        snprintf(out, cap, "on %s", sig);
    } else {
        snprintf(out, cap, "with exit status %d", WEXITSTATUS(st));
    }
}

/* ---------------------------------------------------------- lifetime */

static void on_closed(uv_handle_t *h) {
    worker_t *w = h->data;
    moat__procs_t *p = w->p;

    if (--w->nopen > 0)
        return;
    for (worker_t **pp = &p->workers; *pp != NULL; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    free(w->rbuf);
    free(w);
}

static void close_in(worker_t *w) {
    if (w->in_open) {
        w->in_open = 0;
        uv_close((uv_handle_t *)&w->in, on_closed);
    }
}

static void close_out(worker_t *w) {
    if (w->out_open) {
        w->out_open = 0;
        uv_close((uv_handle_t *)&w->out, on_closed);
    }
}

/* Whether the deaths that count have gone past the intensity; records
 * this one. */
static int count_death(moat__procs_t *p) {
    size_t cap = (size_t)p->max_restarts + 1;
    uint64_t now = uv_now(p->loop), oldest;

    p->deaths[p->dhead] = now;
    p->dhead = (p->dhead + 1) % cap;
    if (p->ndeaths < cap)
        p->ndeaths++;
    if (p->ndeaths < cap)
        return 0;
    oldest = p->deaths[p->dhead]; /* the max_restarts + 1'th last */
    return now - oldest < p->max_ms;
}

/* A death that counts: ends the node past the intensity. */
static void died_on_its_own(moat__procs_t *p) {
    if (p->stopping || !count_death(p))
        return;
    moat__outbox_logf(p->ob, "error",
                      "moat_cnode: more than %u workers died on their own "
                      "within %llu s; the node ends",
                      p->max_restarts,
                      (unsigned long long)(p->max_ms / 1000));
    p->stopping = 1;
    p->fatal(p->data, MOAT_CNODE_EXIT_WORKERS);
}

/* The worker broke the protocol, or must go for another reason: SIGKILL.
 * Its task, unless cancelled, ends {native_crash, protocol}. */
static void kill_worker(worker_t *w, const char *why) {
    moat__procs_t *p = w->p;

    moat__outbox_logf(p->ob, "error", "moat_cnode: worker %d: %s; killed",
                      (int)w->pid, why);
    w->ignore = 1;
    if (w->state == W_BUSY) {
        if (w->cancelled) {
            w->stop_tag = 1;
        } else {
            answer_crash(p, w->tag, "protocol", -1);
        }
        p->nbusy--;
    }
    if (w->state == W_STARTING || w->state == W_IDLE) {
        /* counts as a death on its own, once reaped */
        if (!w->reaped)
            kill(w->pid, SIGKILL);
        return;
    }
    if (w->state != W_DYING && w->state != W_ENDING) {
        p->nlive--;
        w->state = W_DYING;
    }
    if (!w->reaped)
        kill(w->pid, SIGKILL);
    replenish(p);
    dispatch(p);
}

/* ------------------------------------------------- frames from workers */

static void handle_wframe(worker_t *w, const char *buf, size_t len) {
    moat__procs_t *p = w->p;
    moat__wframe_t f;
    int rc = moat__wframe_decode(buf, len, &f);

    if (rc == UV_ENOMEM) {
        moat__wframe_free(&f);
        p->stopping = 1;
        p->fatal(p->data, MOAT_CNODE_EXIT_NOMEM);
        return;
    }
    if (rc != 0) {
        char why[200];
        snprintf(why, sizeof why, "a malformed frame (%s)", f.why);
        kill_worker(w, why);
        goto out;
    }
    switch (f.kind) {
    case MOAT__WFRAME_READY:
        if (w->state != W_STARTING) {
            kill_worker(w, "a second ready frame");
            break;
        }
        w->state = W_IDLE;
        dispatch(p);
        break;
    case MOAT__WFRAME_ERROR:
        /* It refused hello (and exits 2): a death on its own. */
        kill_worker(w, "hello refused");
        break;
    case MOAT__WFRAME_DONE:
        for (size_t i = 0; i < f.ndone && !w->ignore; i++) {
            const moat__wdone_t *d = &f.done[i];
            if (w->state != W_BUSY || d->tag != w->tag) {
                kill_worker(w, "a done entry for a task it does not hold");
                break;
            }
            moat__outbox_done(p->ob, d->tag, d->kind, d->term, d->len);
            w->state = W_IDLE;
            w->cancelled = 0;
            p->nbusy--;
        }
        dispatch(p);
        break;
    case MOAT__WFRAME_STOPPED:
        for (size_t i = 0; i < f.ntags && !w->ignore; i++) {
            if (w->state != W_BUSY || !w->cancelled || f.tags[i] != w->tag) {
                kill_worker(w, "a stopped tag it was not asked to stop");
                break;
            }
            moat__outbox_stopped(p->ob, &w->tag, 1);
            w->state = W_IDLE;
            w->cancelled = 0;
            p->nbusy--;
        }
        dispatch(p);
        break;
    case MOAT__WFRAME_LOG:
        moat__outbox_log(p->ob, f.level, f.msg, f.msg_len);
        break;
    default:
        break;
    }
out:
    moat__wframe_free(&f);
}

/* Handles the whole frames in w->rbuf and keeps the rest. */
static void parse(worker_t *w) {
    size_t off = 0;

    while (!w->ignore && w->rlen - off >= LEN_BYTES) {
        uint32_t len = be32(w->rbuf + off);
        if (len > WORKER_MAX_FRAME) {
            kill_worker(w, "a frame over the size limit");
            break;
        }
        if (w->rlen - off - LEN_BYTES < len)
            break;
        handle_wframe(w, w->rbuf + off + LEN_BYTES, len);
        off += LEN_BYTES + (size_t)len;
    }
    if (w->ignore) {
        w->rlen = 0;
        return;
    }
    memmove(w->rbuf, w->rbuf + off, w->rlen - off);
    w->rlen -= off;
}

/* Room for READ_MIN more bytes.  Returns 0 or UV_ENOMEM. */
static int reserve(worker_t *w) {
    size_t cap = w->rcap > 0 ? w->rcap : READ_MIN;
    char *b;

    while (cap - w->rlen < READ_MIN)
        cap *= 2;
    if (cap == w->rcap)
        return 0;
    b = realloc(w->rbuf, cap);
    if (b == NULL)
        return UV_ENOMEM;
    w->rbuf = b;
    w->rcap = cap;
    return 0;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    worker_t *w = h->data;

    (void)hint;
    if (reserve(w) != 0) {
        *buf = uv_buf_init(NULL, 0); /* on_read gets UV_ENOBUFS */
        return;
    }
    *buf = uv_buf_init(w->rbuf + w->rlen, (unsigned)(w->rcap - w->rlen));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    worker_t *w = s->data;

    (void)buf;
    if (nread < 0) {
        /* EOF: the worker is ending, and its reaping tells the rest. */
        uv_read_stop(s);
        if (nread == UV_ENOBUFS)
            kill_worker(w, "no memory for its frames");
        return;
    }
    if (w->ignore)
        return;
    w->rlen += (size_t)nread;
    parse(w);
}

/* Reads what a reaped worker left in its stdout, to the end. */
static void drain(worker_t *w) {
    int fd;

    if (!w->out_open || w->ignore || uv_fileno((uv_handle_t *)&w->out,
                                               &fd) != 0)
        return;
    while (!w->ignore && reserve(w) == 0) {
        ssize_t r = read(fd, w->rbuf + w->rlen, w->rcap - w->rlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break; /* the end, or a descendant still holds the pipe */
        w->rlen += (size_t)r;
        parse(w);
    }
}

/* ---------------------------------------------------------- spawning */

/* Starts one worker.  Returns 0 or a negative error. */
static int spawn(moat__procs_t *p) {
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t none;
    char *argv[2] = {p->exe, NULL};
    int in[2] = {-1, -1}, out[2] = {-1, -1}, rc, fa_ok = 0, attr_ok = 0;
    worker_t *w = calloc(1, sizeof *w);
    packet_t *hello;

    if (w == NULL)
        return UV_ENOMEM;
    w->p = p;
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0) {
        rc = -errno;
        goto fail;
    }
    rc = -posix_spawn_file_actions_init(&fa);
    if (rc != 0)
        goto fail;
    fa_ok = 1;
    rc = -posix_spawnattr_init(&attr);
    if (rc != 0)
        goto fail;
    attr_ok = 1;
    sigemptyset(&none);
    /* Its own signal mask starts empty whatever the loop's is. */
    if ((rc = -posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK)) != 0 ||
        (rc = -posix_spawnattr_setsigmask(&attr, &none)) != 0 ||
        (rc = -posix_spawn_file_actions_adddup2(&fa, in[0], 0)) != 0 ||
        (rc = -posix_spawn_file_actions_adddup2(&fa, out[1], 1)) != 0)
        goto fail;
    rc = -posix_spawn(&w->pid, p->exe, &fa, &attr, argv, environ);
    if (rc != 0)
        goto fail;
    close(in[0]);
    close(out[1]);
    in[0] = out[1] = -1;
    /* From here on the worker exists: any failure kills it, and it is
     * reaped like any other. */
    w->state = W_STARTING;
    w->next = p->workers;
    p->workers = w;
    p->nlive++;
    if (uv_pipe_init(p->loop, &w->in, 0) == 0) {
        w->in.data = w;
        w->in_open = 1;
        w->nopen++;
        if (uv_pipe_open(&w->in, in[1]) == 0)
            in[1] = -1;
    }
    if (uv_pipe_init(p->loop, &w->out, 0) == 0) {
        w->out.data = w;
        w->out_open = 1;
        w->nopen++;
        if (uv_pipe_open(&w->out, out[0]) == 0) {
            out[0] = -1;
            uv_read_start((uv_stream_t *)&w->out, on_alloc, on_read);
        }
    }
    hello = packet_new(0, &p->hello);
    if (in[1] >= 0 || out[0] >= 0 || hello == NULL) {
        if (in[1] >= 0)
            close(in[1]);
        if (out[0] >= 0)
            close(out[0]);
        free(hello);
        kill_worker(w, "its pipes could not be set up");
        return 0;
    }
    send_packet(w, hello);
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    return 0;

fail:
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0)
            close(in[i]);
        if (out[i] >= 0)
            close(out[i]);
    }
    if (attr_ok)
        posix_spawnattr_destroy(&attr);
    if (fa_ok)
        posix_spawn_file_actions_destroy(&fa);
    free(w);
    return rc;
}

/* Spawns workers until size + spares are live. */
static void replenish(moat__procs_t *p) {
    while (!p->stopping && p->nlive < p->size + p->spares) {
        int rc = spawn(p);
        if (rc != 0) {
            moat__outbox_logf(p->ob, "error",
                              "moat_cnode: cannot spawn a worker: %s",
                              moat_strerror(rc));
            died_on_its_own(p);
        }
    }
}

/* Gives queued runs to idle workers, at most `size` busy. */
static void dispatch(moat__procs_t *p) {
    while (p->queue != NULL && p->nbusy < p->size && !p->stopping) {
        worker_t *w = p->workers;
        packet_t *k;
        /* A reaped worker may still read as idle while its last frames
         * are drained. */
        while (w != NULL && (w->state != W_IDLE || w->reaped))
            w = w->next;
        if (w == NULL)
            return;
        k = p->queue;
        p->queue = k->next;
        if (p->queue == NULL)
            p->queue_tail = &p->queue;
        p->nqueue--;
        k->next = NULL;
        w->state = W_BUSY;
        w->tag = k->tag;
        w->cancelled = 0;
        p->nbusy++;
        send_packet(w, k);
    }
}

/* ------------------------------------------------------------ reaping */

/* Worker w has been reaped with wait status st. */
static void exited(worker_t *w, int st) {
    moat__procs_t *p = w->p;
    char how[64], sig[32];

    drain(w);
    switch (w->state) {
    case W_BUSY:
        if (w->cancelled) {
            /* the VM already has its outcome: the body has left */
            moat__outbox_stopped(p->ob, &w->tag, 1);
        } else if (WIFSIGNALED(st)) {
            signal_name(WTERMSIG(st), sig, sizeof sig);
            answer_crash(p, w->tag, sig, -1);
        } else if (WEXITSTATUS(st) == MOAT_CNODE_EXIT_NOMEM) {
            answer_crash(p, w->tag, "enomem", -1);
        } else {
            answer_crash(p, w->tag, NULL, WEXITSTATUS(st));
        }
        p->nbusy--;
        p->nlive--;
        break;
    case W_DYING:
        if (w->stop_tag)
            moat__outbox_stopped(p->ob, &w->tag, 1);
        break;
    case W_STARTING:
    case W_IDLE:
        p->nlive--;
        describe(st, how, sizeof how);
        moat__outbox_logf(p->ob, "warning",
                          "moat_cnode: worker %d died %s while %s",
                          (int)w->pid, how,
                          w->state == W_IDLE ? "idle" : "starting");
        w->state = W_DYING;
        died_on_its_own(p);
        break;
    case W_ENDING:
        break;
    }
    w->state = W_DYING;
    w->ignore = 1;
    close_in(w);
    close_out(w);
}

static void on_sigchld(uv_signal_t *h, int signum) {
    moat__procs_t *p = h->data;

    (void)signum;
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        int st;
        pid_t r;
        if (w->reaped)
            continue;
        do
            r = waitpid(w->pid, &st, WNOHANG);
        while (r < 0 && errno == EINTR);
        if (r != w->pid)
            continue;
        w->reaped = 1;
        exited(w, st);
    }
    replenish(p);
    dispatch(p);
}

/* ---------------------------------------------------------------- API */

int moat__limit_memory(uint64_t bytes) {
    unsigned long long pages = 0;
    uint64_t now, limit;
    struct rlimit rl;
    FILE *f = fopen("/proc/self/statm", "r");

    if (f == NULL)
        return -errno;
    if (fscanf(f, "%llu", &pages) != 1) {
        fclose(f);
        return UV_EINVAL;
    }
    fclose(f);
    now = (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE);
    limit = bytes > UINT64_MAX - now ? UINT64_MAX : now + bytes;
    rl.rlim_cur = rl.rlim_max = limit >= RLIM_INFINITY ? RLIM_INFINITY
                                                       : (rlim_t)limit;
    return setrlimit(RLIMIT_AS, &rl) == 0 ? 0 : -errno;
}

/* The workers' hello: {hello, #{size => 1, max_queue => 1, libraries,
 * isolation => thread, name[, max_memory]}}. */
static int make_hello(moat__procs_t *p, const moat__hello_t *h) {
    ei_x_buff *x = &p->hello;

    if (ei_x_new_with_version(x) < 0)
        return UV_ENOMEM;
    if (ei_x_encode_tuple_header(x, 2) < 0 ||
        ei_x_encode_atom(x, "hello") < 0 ||
        ei_x_encode_map_header(x, h->max_memory > 0 ? 6 : 5) < 0 ||
        ei_x_encode_atom(x, "size") < 0 || ei_x_encode_long(x, 1) < 0 ||
        ei_x_encode_atom(x, "max_queue") < 0 || ei_x_encode_long(x, 1) < 0 ||
        ei_x_encode_atom(x, "isolation") < 0 ||
        ei_x_encode_atom(x, "thread") < 0 || ei_x_encode_atom(x, "name") < 0 ||
        ei_x_encode_atom_len_as(x, h->name[0] != '\0' ? h->name : "cnode",
                                (int)strlen(h->name[0] != '\0' ? h->name
                                                               : "cnode"),
                                ERLANG_UTF8, ERLANG_UTF8) < 0 ||
        ei_x_encode_atom(x, "libraries") < 0 ||
        (h->nlibraries > 0 &&
         ei_x_encode_list_header(x, (long)h->nlibraries) < 0))
        return UV_ENOMEM;
    for (size_t i = 0; i < h->nlibraries; i++)
        if (ei_x_encode_binary(x, h->libraries[i],
                               (long)strlen(h->libraries[i])) < 0)
            return UV_ENOMEM;
    if (ei_x_encode_empty_list(x) < 0)
        return UV_ENOMEM;
    if (h->max_memory > 0 && (ei_x_encode_atom(x, "max_memory") < 0 ||
                              ei_x_encode_ulonglong(x, h->max_memory) < 0))
        return UV_ENOMEM;
    return 0;
}

int moat__procs_start(uv_loop_t *loop, moat__outbox_t *ob, const char *exe,
                      const moat__hello_t *h, moat__procs_fatal_cb fatal,
                      void *data, moat__procs_t **out) {
    moat__procs_t *p = calloc(1, sizeof *p);
    long cpus;
    int rc;

    if (p == NULL)
        return UV_ENOMEM;
    p->loop = loop;
    p->ob = ob;
    p->fatal = fatal;
    p->data = data;
    cpus = sysconf(_SC_NPROCESSORS_ONLN);
    p->size = h->size > 0 ? h->size : cpus > 0 ? (unsigned)cpus : 1;
    p->spares = h->spares;
    p->max_restarts = h->max_restarts;
    p->max_ms = (uint64_t)h->max_seconds * 1000;
    p->max_queue = h->max_queue > 0 ? h->max_queue : DEFAULT_MAX_QUEUE;
    p->queue_tail = &p->queue;
    p->exe = strdup(exe);
    p->deaths = calloc((size_t)p->max_restarts + 1, sizeof *p->deaths);
    if (p->exe == NULL || p->deaths == NULL) {
        rc = UV_ENOMEM;
        goto fail;
    }
    rc = make_hello(p, h);
    if (rc != 0)
        goto fail;
    rc = uv_signal_init(loop, &p->sigchld);
    if (rc != 0)
        goto fail;
    p->sig_open = 1;
    p->sigchld.data = p;
    /* Before the first spawn, so that no death goes unnoticed. */
    rc = uv_signal_start(&p->sigchld, on_sigchld, SIGCHLD);
    if (rc != 0)
        goto fail;
    while (p->nlive < p->size + p->spares) {
        rc = spawn(p);
        if (rc != 0)
            goto fail;
    }
    *out = p;
    return 0;

fail:
    moat__procs_stop(p);
    /* The closes complete on the caller's next run of the loop; the
     * workers were freed there, so only p is left for procs_free. */
    *out = p;
    return rc;
}

void moat__procs_run(moat__procs_t *p, uint64_t tag, const moat__atom_t *task,
                     const moat_term_t *args) {
    const char *etf;
    size_t len;
    packet_t *k;
    ei_x_buff x;

    if (p->stopping) {
        answer_atom(p, tag, MOAT_A_NOPROC);
        return;
    }
    if (p->nbusy + p->nqueue >= p->size + p->max_queue) {
        answer_atom(p, tag, MOAT_A_OVERLOADED);
        return;
    }
    etf = moat_term_data(args, &len);
    if (ei_x_new_with_version(&x) < 0) {
        answer_atom(p, tag, MOAT_A_ENOMEM);
        return;
    }
    if (ei_x_encode_tuple_header(&x, 4) < 0 ||
        ei_x_encode_atom(&x, "run") < 0 ||
        ei_x_encode_ulonglong(&x, tag) < 0 ||
        ei_x_append_buf(&x, task->etf, (int)task->etf_len) < 0 ||
        len > INT32_MAX || ei_x_append_buf(&x, etf + 1, (int)len - 1) < 0 ||
        (k = packet_new(tag, &x)) == NULL) {
        ei_x_free(&x);
        answer_atom(p, tag, MOAT_A_ENOMEM);
        return;
    }
    ei_x_free(&x);
    *p->queue_tail = k;
    p->queue_tail = &k->next;
    p->nqueue++;
    dispatch(p);
}

void moat__procs_cancel(moat__procs_t *p, uint64_t tag, moat_atom_t reason) {
    ei_x_buff x;
    packet_t *k;

    for (packet_t **pp = &p->queue; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->tag != tag)
            continue;
        k = *pp;
        *pp = k->next;
        if (p->queue_tail == &k->next)
            p->queue_tail = pp;
        p->nqueue--;
        free(k);
        moat__outbox_stopped(p->ob, &tag, 1);
        return;
    }
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        if (w->state != W_BUSY || w->tag != tag)
            continue;
        if (reason == MOAT_A_KILLED || reason == MOAT_A_TIMEOUT) {
            w->state = W_DYING;
            w->stop_tag = 1;
            w->ignore = 1;
            p->nbusy--;
            p->nlive--;
            kill(w->pid, SIGKILL); /* not reaped yet: the pid is its own */
            replenish(p);
            dispatch(p);
            return;
        }
        if (w->cancelled)
            return;
        w->cancelled = 1;
        if (ei_x_new_with_version(&x) == 0 &&
            ei_x_encode_tuple_header(&x, 3) == 0 &&
            ei_x_encode_atom(&x, "cancel") == 0 &&
            ei_x_encode_ulonglong(&x, tag) == 0 &&
            ei_x_encode_atom(&x, "shutdown") == 0 &&
            (k = packet_new(tag, &x)) != NULL) {
            send_packet(w, k);
        } else {
            /* No memory to ask it: end it for real instead. */
            kill_worker(w, "no memory to forward a cancel");
        }
        ei_x_free(&x);
        return;
    }
}

void moat__procs_stop(moat__procs_t *p) {
    uint64_t deadline;
    int left;

    p->stopping = 1;
    while (p->queue != NULL) {
        packet_t *k = p->queue;
        p->queue = k->next;
        free(k);
    }
    p->queue_tail = &p->queue;
    p->nqueue = 0;
    if (p->sig_open) {
        p->sig_open = 0;
        uv_close((uv_handle_t *)&p->sigchld, NULL);
    }
    /* EOF on each stdin (uv_close closes the descriptor at once). */
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        if (w->state != W_DYING)
            w->state = W_ENDING;
        w->ignore = 1;
        close_in(w);
    }
    uv_update_time(p->loop);
    deadline = uv_now(p->loop) + STOP_GRACE_MS;
    do {
        left = 0;
        for (worker_t *w = p->workers; w != NULL; w = w->next) {
            int st;
            if (w->reaped)
                continue;
            if (waitpid(w->pid, &st, WNOHANG) == w->pid)
                w->reaped = 1;
            else
                left++;
        }
        if (left > 0)
            uv_sleep(1);
        uv_update_time(p->loop);
    } while (left > 0 && uv_now(p->loop) < deadline);
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        int st;
        if (w->reaped)
            continue;
        kill(w->pid, SIGKILL);
        while (waitpid(w->pid, &st, 0) < 0 && errno == EINTR)
            ;
        w->reaped = 1;
    }
    for (worker_t *w = p->workers; w != NULL; w = w->next)
        close_out(w);
}

void moat__procs_free(moat__procs_t *p) {
    if (p == NULL)
        return;
    /* Workers whose handles were never opened (a failed start). */
    while (p->workers != NULL) {
        worker_t *w = p->workers;
        p->workers = w->next;
        free(w->rbuf);
        free(w);
    }
    ei_x_free(&p->hello);
    free(p->deaths);
    free(p->exe);
    free(p);
}
