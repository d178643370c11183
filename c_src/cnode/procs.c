/*
 * procs.c: `isolation => process`.  The C-node (the parent) runs each task
 * in a worker: a process of its own that is this same executable in thread
 * isolation with one thread, so that a hard fault ends one worker and the
 * one task running in it, not the node.
 *
 * DESIGN
 *
 * Threads.  Everything here runs on the parent's loop thread, which lives
 * as long as the parent: the parent starts no pool.  A worker's stdin and
 * stdout are pipes the loop writes and reads (libuv pipes, never
 * blocking); its stderr is the parent's (the errlog pipe), so what it
 * says before its own errlog starts still reaches the VM.
 *
 * Making workers.  A worker is forked by the fork server (forker.c): a
 * process spawned once, on the first spawn, that has already done what
 * every worker would do before serving (exec, dynamic linking, the copy
 * and dlopen of the libraries, decoding hello), so that a worker costs a
 * fork and its own loop, which runs its tasks (no pool thread).  The
 * parent makes the worker's pipes and passes their far ends along with
 * the request; the answer,
 * the worker's pid, comes back later on the server's socket, and until
 * then the worker is W_STARTING with pid 0: it is not reaped (waitpid(0)
 * would take any child), not killed (kill(0) would hit the process
 * group) and its stdout is not read, so no frame of it is handled before
 * the parent knows whom it came from.  A forked worker needs no hello
 * and answers ready by itself.  The parent is a child subreaper, so that
 * workers, forked by a child of the server that exits at once, become
 * its own children, reaped by pid with their true status.  The cost: a
 * process a task started and left behind when its worker died is the
 * parent's child too, and stays a zombie until the parent exits (the
 * parent never reaps a pid it does not know).  When the server is gone
 * (it died, its socket broke, or it was killed for leaving a request
 * unanswered too long: forker.c) the requests it had not answered are
 * failed spawns and count, as a failed posix_spawn did, and the next
 * spawn starts a new server; when a server cannot be started, or refuses
 * hello (a library started a thread, say: forker.c), workers are spawned
 * with posix_spawn from then on, as this executable told hello, one a
 * turn.  Either way a worker's parent-death signal follows this thread,
 * which lives as long as the parent.
 *
 * The protocol to a worker is the VM's (doc/cnode.md): hello with size 1,
 * max_queue PIPELINE, the node's libraries, and max_memory when set; then
 * run and cancel.  It answers ready, done, stopped and log.  Its frames
 * are not trusted: each one is checked and decoded with bounds
 * (moat__wframe_decode), and a malformed one, or one that does not fit
 * what the worker was asked (a tag it does not hold, a second ready),
 * kills the worker, whose running task (if any) ends {native_crash,
 * protocol}.
 *
 * Workers and pipelining.  The parent keeps size + spares live workers
 * (starting or ready), of which at most `size` hold runs; the spares are
 * idle processes ready to take over at once when one dies.  A worker
 * holds up to PIPELINE runs, sent and not yet answered, oldest first, so
 * that the pipe round trip is overlapped instead of paid per task.  It
 * runs its tasks in FIFO order, on its loop thread (a forked worker:
 * jobs.c, Run here) or its one pool thread (a spawned one), and writes
 * each outcome before it begins the next, so the only run that can have
 * begun is the oldest it holds, or, behind cancelled runs whose bodies
 * may still be running abandoned (on a spawned worker's replacement
 * thread), the oldest one not cancelled.  Runs wait in the
 * parent's FIFO queue; size + max_queue at most are admitted (held or
 * queued), and one beyond that is answered `overloaded`.
 *
 * Turns.  Dispatch, the outcomes for the VM and spawning wait for the
 * end of the loop turn (an idle handle, armed by whatever may need
 * them), so that they are done once for all the frames of the turn and
 * never in the middle of handling a death.  Dispatch
 * first gives one run to each worker holding none, while fewer than
 * `size` hold live runs (not cancelled: a worker holding only cancelled
 * runs, whose bodies are leaving or ignore the cancel, is abandoned work
 * and does not count, so that a spare takes its place); then, once
 * `size` workers hold live runs (not while one is still starting: it
 * would take the next run, which must not wait behind another's) and
 * while at least DEEP_QUEUE runs per worker still wait, it tops the
 * holders up, one run each round, to PIPELINE: only those whose oldest
 * run is not cancelled, that answered their last run fast (FAST_NS) and
 * whose oldest run has been held less than STALL_NS.  A run sent behind
 * a long task still waits for it even if another worker frees up: only
 * under a deep queue, where runs wait anyway, right after short tasks,
 * and for at most PIPELINE - 1 runs per long task.  Each worker's new
 * runs leave in one write; the turn's outcomes leave as one done frame
 * and one stopped frame.  Then, if workers are missing, a fork request is
 * sent for each (a sendmsg that never blocks), or, without a fork server,
 * one is spawned (a posix_spawn blocks the loop for a few hundred
 * microseconds, so one a turn, after the outcomes are out, and the next
 * turn's frames are read before the next one).
 *
 * Deaths.  SIGCHLD (a uv_signal_t) makes the loop call waitpid(pid,
 * WNOHANG) for each worker not yet reaped, never waitpid(-1).  A reaped
 * worker's stdout is read to its end first, so an outcome it wrote before
 * dying counts.  A forked worker that faults (MOAT_FAULT_SIGNALS, on any
 * of its threads) says so first: its handler writes the signal's number
 * to a pipe of its own, its crash notice, then dies of the signal.  The
 * kernel's teardown of a dying process (its other threads, its memory)
 * takes a few hundred microseconds, tens of milliseconds for a large one,
 * and SIGCHLD comes only after it: on the notice, the loop reads what
 * the worker's stdout holds (the worker writes each outcome before it
 * begins the next run, so everything before the fault is there) and
 * settles the runs at once, as the reaping would with that signal; the
 * reaping later only frees it.  A worker still unreaped NOTICE_GRACE_MS
 * after its notice is killed.  A library that installed its own handler
 * for a fault keeps it, and that fault is learnt from the reaping.  Then
 * its held runs are settled, oldest first: a
 * cancelled one is reported stopped; the first other one, which may have
 * begun, ends {native_crash, Signal} (sigsegv, sigabrt, ...),
 * {native_crash, enomem} for the worker's own out-of-memory exit status,
 * or {native_crash, {exit_status, N}}; the ones behind it had not begun
 * and go back to the front of the queue, to run once elsewhere.  After a
 * run the parent killed the worker for (below), nothing behind it had
 * begun.  A worker that died holding runs does not count toward the
 * intensity; one that died starting or idle, or could not be spawned,
 * does, and more than max_restarts such deaths within max_seconds end the
 * node (MOAT_CNODE_EXIT_WORKERS).  Every death is replaced at once, so
 * the spares never run out for long.
 *
 * Cancels.  A queued run is dropped and its tag reported stopped at once.
 * For the oldest run a worker holds, `killed` and `timeout` SIGKILL the
 * worker (a real kill); its tag is reported stopped once the worker is
 * reaped, and its other runs are settled as for any death.  Otherwise
 * the cancel is forwarded as `shutdown`: a run still queued in the worker
 * never begins and comes back stopped, a running one is the worker's to
 * stop (cooperative, as in thread isolation), and whatever the worker
 * answers goes to the VM as it is.  A forked worker reads nothing while
 * a body runs on its loop thread, so once the cancel frame is written
 * (its write callback) the parent also queues MOAT__CANCEL_SIGNAL with
 * the tag to the worker's main thread, which flags the body if it is
 * the one running or about to run (jobs.c, Run here).
 *
 * Shutdown.  moat__procs_stop first ends the fork server, after reading
 * the pids of the workers it was asked for, then closes every worker's
 * stdin (a worker exits with status 0 on EOF), SIGKILLs those still alive
 * after STOP_GRACE_MS, and reaps them all, so that no worker outlives the
 * parent.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

extern char **environ;

#define LEN_BYTES 4

/* A worker's frame larger than this is a protocol fault (the VM's own
 * bound on frames it sends). */
#define WORKER_MAX_FRAME (1u << 30)

/* A worker whose stdout has ended is reaped within milliseconds, its
 * death being why; one still alive this long after (a library closed
 * the frames' descriptor) can never answer again, and is killed, its
 * run ending {native_crash, protocol}. */
#define EOF_GRACE_MS 500

/* A worker whose crash notice came is dying of a fault: its runs are
 * settled at once, and it is reaped when the kernel has torn it down.
 * One still alive this long after (dumping a large core, say, or a task
 * that wrote the notice itself) is killed. */
#define NOTICE_GRACE_MS 5000

/* How long stop waits for workers to leave on their stdin's EOF before
 * SIGKILLing them: a worker leaves within its own 10 ms exit grace, plus
 * the sanitizers' exit reports in the test builds. */
#define STOP_GRACE_MS 200

/* The core's default max_queue (moat_core.h). */
#define DEFAULT_MAX_QUEUE 65536

/* Runs a worker holds at most.  A round trip to a worker and back costs
 * tens of microseconds of wake-ups, a trivial task a few: sixteen in
 * flight keep a worker busy, and a crash sends back at most fifteen. */
#define PIPELINE 16

/* Workers take more than one run only while at least this many runs per
 * worker wait in the queue: under that load every run waits anyway, and
 * below it a run never waits behind a task that may be long while another
 * worker could take it. */
#define DEEP_QUEUE PIPELINE

/* A worker takes more than one run only while it answers fast: its last
 * oldest run was answered within 500 us of becoming the oldest.  A fresh
 * worker, or one that has just run a long task, takes one at a time. */
#define FAST_NS 500000u

/* A worker whose oldest run has been held this long (1 ms) gets no more
 * runs until it answers one: a task that long gains nothing from
 * pipelining, and runs sent behind it would wait for it. */
#define STALL_NS 1000000u

/* How long a fork server may take to start and load the libraries
 * before the parent gives up on it and spawns workers instead: it takes
 * a few milliseconds, tens under a sanitizer. */
#define FORKER_START_MS 2000

typedef enum {
    W_STARTING, /* spawned, hello sent, no ready yet */
    W_READY,    /* serves: holds 0..PIPELINE runs */
    W_DYING,    /* killed by the parent or dead; settled once reaped */
    W_ENDING    /* its stdin closed by moat__procs_stop */
} wstate_t;

/* A packet to write: a run (queued, or held by a worker), a cancel or a
 * hello; the 4-byte length, then the term.  Counted references: the
 * queue or a worker's held list, and each write still using it. */
typedef struct packet_s {
    struct packet_s *next; /* in the queue, or in a worker's held list */
    uint64_t tag;
    unsigned refs;
    unsigned char cancelled; /* held: the VM has decided its outcome */
    unsigned char forwarded; /* held: a cancel for it went to the worker */
    unsigned char killed;    /* held: its worker was SIGKILLed for it */
    unsigned char signal;    /* a cancel: MOAT__CANCEL_SIGNAL follows it
                                once written */
    uint64_t seq;            /* a held run: its rank among the runs its
                                worker was given; a cancel: its run's */
    size_t len;
    char data[];
} packet_t;

/* One write of n packets to a worker's stdin. */
typedef struct wreq_s {
    uv_write_t req;
    struct worker_s *w;
    unsigned n;
    packet_t *k[];
} wreq_t;

typedef struct worker_s {
    struct worker_s *next;
    moat__procs_t *p;
    pid_t pid;        /* 0 while the fork server has not answered */
    int forked;       /* made by the fork server: it needs no hello */
    struct worker_s *fnext; /* in the fork server's unanswered requests */
    wstate_t state;
    const char *why;  /* W_DYING: what a run that may have begun ends
                         with, {native_crash, Why}; NULL: how it ended */
    int counts;       /* W_DYING: its death counts toward the intensity */
    packet_t *held, **held_tail; /* runs sent, not answered, oldest first */
    unsigned nheld;
    uint64_t since;   /* uv_hrtime() when the oldest held run became so */
    uint64_t eof_ms;  /* uv_now() when its stdout ended, not reaped yet */
    uint64_t notice_ms; /* uv_now() when its crash notice came */
    uint64_t last_ns; /* how long its last oldest run took to answer */
    uint64_t nsent;   /* runs it was given */
    packet_t *fresh[PIPELINE]; /* runs this dispatch gave it */
    unsigned nfresh;
    int reaped;
    int settled;      /* its runs were settled on its crash notice */
    int ignore;       /* its frames are no longer read */
    uv_pipe_t in, out;
    uv_poll_t notice; /* its crash notice's pipe (forked workers) */
    int notice_fd;    /* that pipe's read end, or -1 */
    int nopen;        /* handles not closed yet */
    int in_open, out_open, notice_open;
    moat__wbuf_t rd;  /* its stdout */
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
    unsigned nlive;          /* starting or ready */
    size_t nheld;            /* runs held by workers */
    packet_t *queue, **queue_tail;
    size_t nqueue;
    uint64_t *deaths;        /* ring: times of the last max_restarts + 1
                                deaths that count */
    size_t ndeaths, dhead;
    ei_x_buff done;          /* this turn's done frame, but its list's
                                length (at list_at) and tail */
    size_t ndone;
    int list_at;
    uint64_t *stopped;       /* this turn's stopped tags */
    size_t nstopped, capstopped;
    uv_signal_t sigchld;
    uv_idle_t turn;          /* armed: dispatch, flush and spawn at the
                                turn's end */
    uv_timer_t eof;          /* armed while a worker's stdout has ended
                                and the worker is not reaped */
    int sig_open, turn_open, eof_open;
    ei_x_buff hello;         /* the workers' hello, with its version */
    moat__forker_t *fk;      /* the fork server, or NULL */
    int fk_off;              /* a server could not start: spawn */
    worker_t *forking, **forking_tail; /* its requests, oldest first */
    int stopping;            /* no more spawning or dispatching */
};

static void replenish(moat__procs_t *p);
static void settle(worker_t *w, int st);
static void reap(moat__procs_t *p);

/* ------------------------------------------------------------ helpers */

/* A packet holding x's bytes, with one reference; NULL when memory is
 * short. */
static packet_t *packet_new(uint64_t tag, const ei_x_buff *x) {
    packet_t *k = malloc(sizeof *k + LEN_BYTES + (size_t)x->index);

    if (k == NULL)
        return NULL;
    memset(k, 0, sizeof *k);
    k->tag = tag;
    k->refs = 1;
    k->len = LEN_BYTES + (size_t)x->index;
    moat__put_be32(k->data, (uint32_t)x->index);
    memcpy(k->data + LEN_BYTES, x->buff, (size_t)x->index);
    return k;
}

static void unref(packet_t *k) {
    if (--k->refs == 0)
        free(k);
}

static void free_list(packet_t *k) {
    while (k != NULL) {
        packet_t *next = k->next;
        k->next = NULL;
        unref(k);
        k = next;
    }
}

/* The node cannot keep an outcome: it ends, and the VM gives every task
 * cnode_down (as the outbox does, cnode.h). */
static void nomem(moat__procs_t *p) {
    if (p->stopping)
        return;
    p->stopping = 1;
    p->fatal(p->data, MOAT_CNODE_EXIT_NOMEM);
}

static void on_turn(uv_idle_t *h);

/* Dispatch and flush at the end of this loop turn. */
static void arm(moat__procs_t *p) {
    if (p->turn_open && !p->stopping)
        uv_idle_start(&p->turn, on_turn);
}

/* Adds {Tag, ok | exit, Term} to this turn's done frame; `term` without
 * its version byte. */
static void emit_done(moat__procs_t *p, uint64_t tag, int kind,
                      const char *term, size_t len) {
    ei_x_buff *x = &p->done;

    if (p->ndone == 0) {
        x->index = 0;
        if (ei_x_encode_version(x) < 0 || ei_x_encode_tuple_header(x, 2) < 0 ||
            ei_x_encode_atom(x, "done") < 0)
            goto fail;
        p->list_at = x->index;
        /* a LIST_EXT whose length flush writes */
        if (ei_x_encode_list_header(x, 1) < 0)
            goto fail;
    }
    if (len > INT32_MAX || ei_x_encode_tuple_header(x, 3) < 0 ||
        ei_x_encode_ulonglong(x, tag) < 0 ||
        ei_x_encode_atom(x, kind == MOAT_OK ? "ok" : "exit") < 0 ||
        ei_x_append_buf(x, term, (int)len) < 0)
        goto fail;
    p->ndone++;
    arm(p);
    return;
fail:
    nomem(p);
}

static void emit_stopped(moat__procs_t *p, uint64_t tag) {
    if (p->nstopped == p->capstopped) {
        size_t cap = p->capstopped > 0 ? p->capstopped * 2 : 64;
        uint64_t *s = realloc(p->stopped, cap * sizeof *s);
        if (s == NULL) {
            nomem(p);
            return;
        }
        p->stopped = s;
        p->capstopped = cap;
    }
    p->stopped[p->nstopped++] = tag;
    arm(p);
}

/* Writes this turn's outcomes: one stopped frame, one done frame. */
static void flush(moat__procs_t *p) {
    ei_x_buff *x = &p->done;

    if (p->nstopped > 0) {
        moat__outbox_stopped(p->ob, p->stopped, p->nstopped);
        p->nstopped = 0;
    }
    if (p->ndone == 0)
        return;
    moat__put_be32(x->buff + p->list_at + 1, (uint32_t)p->ndone);
    if (ei_x_encode_empty_list(x) < 0 ||
        moat__outbox_frame(p->ob, x->buff, (size_t)x->index) != 0)
        nomem(p);
    p->ndone = 0;
    x->index = 0;
}

static void answer_atom(moat__procs_t *p, uint64_t tag, moat_atom_t a) {
    size_t len;
    const char *etf = moat_term_data(moat_atom(a), &len);

    emit_done(p, tag, MOAT_EXIT, etf + 1, len - 1);
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

/* {native_crash, What} for a run whose worker ended with wait status st:
 * `why` when set, else the signal, enomem for the worker's own
 * out-of-memory exit, or {exit_status, N}. */
static void answer_crash(moat__procs_t *p, uint64_t tag, const char *why,
                         int st) {
    char sig[32];
    int status = -1;
    ei_x_buff x;

    if (why == NULL && WIFSIGNALED(st)) {
        signal_name(WTERMSIG(st), sig, sizeof sig);
        why = sig;
    } else if (why == NULL && WEXITSTATUS(st) == MOAT_CNODE_EXIT_NOMEM) {
        why = "enomem";
    } else if (why == NULL) {
        status = WEXITSTATUS(st);
    }
    if (ei_x_new(&x) < 0 || ei_x_encode_tuple_header(&x, 2) < 0 ||
        ei_x_encode_atom(&x, "native_crash") < 0 ||
        (status >= 0
             ? ei_x_encode_tuple_header(&x, 2) < 0 ||
                   ei_x_encode_atom(&x, "exit_status") < 0 ||
                   ei_x_encode_long(&x, status) < 0
             : ei_x_encode_atom(&x, why) < 0)) {
        ei_x_free(&x);
        answer_atom(p, tag, MOAT_A_ENOMEM);
        return;
    }
    emit_done(p, tag, MOAT_EXIT, x.buff, (size_t)x.index);
    ei_x_free(&x);
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

void moat__signal_name(int sig, char *out, size_t cap) {
    signal_name(sig, out, cap);
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
    if (w->notice_fd >= 0)
        close(w->notice_fd);
    free_list(w->held);
    moat__wbuf_free(&w->rd);
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

static void close_notice(worker_t *w) {
    if (w->notice_open) {
        w->notice_open = 0;
        uv_close((uv_handle_t *)&w->notice, on_closed);
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

/* Takes w out of service (it is dead or about to be); its held runs wait
 * for settle. */
static void retire(worker_t *w) {
    moat__procs_t *p = w->p;

    if (w->state == W_STARTING || w->state == W_READY)
        p->nlive--;
    w->state = W_DYING;
}

/* The worker broke the protocol, or must go for another reason: SIGKILL,
 * its frames ignored from now on.  The run that may have begun ends
 * {native_crash, Crash} once it is reaped; an idle worker's death
 * counts. */
static void kill_worker(worker_t *w, const char *why, const char *crash) {
    moat__procs_t *p = w->p;

    moat__outbox_logf(p->ob, "error", "moat_cnode: worker %d: %s; killed",
                      (int)w->pid, why);
    w->ignore = 1;
    if (w->state == W_STARTING || w->state == W_READY) {
        w->counts = w->nheld == 0;
        w->why = crash;
        retire(w);
    }
    /* Not reaped yet: the pid is its own.  Without a pid yet, the fork
     * server's answer kills it (on_forked). */
    if (!w->reaped && w->pid > 0)
        kill(w->pid, SIGKILL);
    replenish(p);
    arm(p);
}

/* ------------------------------------------------------------ writing */

/* Queues the cancel signal for w's run of rank `seq` to w's main thread,
 * which runs its tasks (jobs.c, Run here).  Only while w is not reaped:
 * its pid is its own. */
static void signal_cancel(worker_t *w, uint64_t seq) {
    siginfo_t si;

    memset(&si, 0, sizeof si);
    si.si_signo = MOAT__CANCEL_SIGNAL;
    si.si_code = SI_QUEUE;
    si.si_pid = getpid();
    si.si_uid = getuid();
    si.si_value.sival_ptr = (void *)(uintptr_t)seq;
    (void)syscall(SYS_rt_tgsigqueueinfo, w->pid, w->pid, MOAT__CANCEL_SIGNAL,
                  &si);
}

static void on_written(uv_write_t *req, int status) {
    wreq_t *r = (wreq_t *)req;
    worker_t *w = r->w;

    /* status < 0: a dead worker's stdin, its reaping tells the rest.
     * Handles close after their writes' callbacks, so w is there. */
    for (unsigned i = 0; i < r->n; i++) {
        if (r->k[i]->signal && status == 0 && w->pid > 0 && !w->reaped)
            signal_cancel(w, r->k[i]->seq);
        unref(r->k[i]);
    }
    free(r);
}

/* Writes k[0..n) (n <= PIPELINE) to the worker's stdin in one write; the
 * write takes its own references. */
static void write_packets(worker_t *w, packet_t **k, unsigned n) {
    uv_buf_t b[PIPELINE] = {{0}};
    wreq_t *r;

    if (!w->in_open)
        return; /* its death settles what it holds */
    r = malloc(sizeof *r + n * sizeof *k);
    if (r == NULL) {
        kill_worker(w, "no memory to write to it", "enomem");
        return;
    }
    r->w = w;
    r->n = n;
    for (unsigned i = 0; i < n; i++) {
        r->k[i] = k[i];
        k[i]->refs++;
        b[i] = uv_buf_init(k[i]->data, (unsigned)k[i]->len);
    }
    if (uv_write(&r->req, (uv_stream_t *)&w->in, b, n, on_written) != 0) {
        for (unsigned i = 0; i < n; i++)
            unref(k[i]);
        free(r);
        kill_worker(w, "its stdin cannot be written", "epipe");
    }
}

/* ------------------------------------------------- frames from workers */

/* Where run `tag` sits in w's held list; NULL when it does not hold it. */
static packet_t **find_held(worker_t *w, uint64_t tag) {
    packet_t **pp = &w->held;

    while (*pp != NULL && (*pp)->tag != tag)
        pp = &(*pp)->next;
    return *pp != NULL ? pp : NULL;
}

/* Takes the held run at *pp out of w's list; the caller owns it. */
static packet_t *unhold(worker_t *w, packet_t **pp) {
    moat__procs_t *p = w->p;
    packet_t *k = *pp;

    *pp = k->next;
    if (w->held_tail == &k->next)
        w->held_tail = pp;
    k->next = NULL;
    if (pp == &w->held) {
        uint64_t now = uv_hrtime();
        w->last_ns = now - w->since;
        w->since = now;
    }
    w->nheld--;
    p->nheld--;
    return k;
}

static void handle_wframe(worker_t *w, const char *buf, size_t len) {
    moat__procs_t *p = w->p;
    moat__wframe_t f;
    packet_t **pp;
    int rc = moat__wframe_decode(buf, len, &f);

    if (rc == UV_ENOMEM) {
        moat__wframe_free(&f);
        nomem(p);
        return;
    }
    if (rc != 0) {
        char why[200];
        snprintf(why, sizeof why, "a malformed frame (%s)", f.why);
        kill_worker(w, why, "protocol");
        goto out;
    }
    switch (f.kind) {
    case MOAT__WFRAME_READY:
        if (w->state != W_STARTING) {
            kill_worker(w, "a second ready frame", "protocol");
            break;
        }
        w->state = W_READY;
        arm(p);
        break;
    case MOAT__WFRAME_ERROR:
        /* It refused hello (and exits 2): a death on its own. */
        kill_worker(w, "hello refused", "protocol");
        break;
    case MOAT__WFRAME_DONE:
        for (size_t i = 0; i < f.ndone && !w->ignore; i++) {
            const moat__wdone_t *d = &f.done[i];
            if ((pp = find_held(w, d->tag)) == NULL) {
                kill_worker(w, "a done entry for a task it does not hold",
                            "protocol");
                break;
            }
            unref(unhold(w, pp));
            emit_done(p, d->tag, d->kind, d->term, d->len);
        }
        arm(p);
        break;
    case MOAT__WFRAME_STOPPED:
        for (size_t i = 0; i < f.ntags && !w->ignore; i++) {
            if ((pp = find_held(w, f.tags[i])) == NULL || !(*pp)->forwarded) {
                kill_worker(w, "a stopped tag it was not asked to stop",
                            "protocol");
                break;
            }
            unref(unhold(w, pp));
            emit_stopped(p, f.tags[i]);
        }
        arm(p);
        break;
    case MOAT__WFRAME_LOG:
        moat__outbox_log(p->ob, f.level, f.msg, f.msg_len);
        break;
    default: /* a native servers' report: a task worker has no servers */
        kill_worker(w, "a frame out of place", "protocol");
        break;
    }
out:
    moat__wframe_free(&f);
}

/* A frame the worker wrote: handled unless it is no longer listened to. */
static int on_frame(void *data, const char *buf, size_t len) {
    worker_t *w = data;

    if (!w->ignore)
        handle_wframe(w, buf, len);
    return w->ignore;
}

static void parse_rc(worker_t *w, int rc) {
    if (rc == UV_E2BIG)
        kill_worker(w, "a frame over the size limit", "protocol");
    else if (rc == UV_ENOMEM)
        kill_worker(w, "no memory for its frames", "enomem");
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    worker_t *w = h->data;

    (void)hint;
    moat__wbuf_alloc(&w->rd, buf);
}

static void on_eof(uv_timer_t *t);

/* Looks for overdue workers (on_eof) until none is left to watch. */
static void watch_overdue(moat__procs_t *p) {
    if (p->eof_open && !uv_is_active((uv_handle_t *)&p->eof))
        uv_timer_start(&p->eof, on_eof, EOF_GRACE_MS / 2, EOF_GRACE_MS / 2);
}

/* Kills the workers whose stdout ended EOF_GRACE_MS ago, or whose crash
 * notice came NOTICE_GRACE_MS ago, while they live on; stops when none
 * is left to watch. */
static void on_eof(uv_timer_t *t) {
    moat__procs_t *p = t->data;
    uint64_t now = uv_now(p->loop);
    int watching = 0;

    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        if (w->reaped || w->state == W_ENDING)
            continue;
        if (w->notice_ms != 0 && now - w->notice_ms < NOTICE_GRACE_MS) {
            watching = 1;
        } else if (w->notice_ms != 0) {
            moat__outbox_logf(p->ob, "error",
                              "moat_cnode: worker %d: alive %d s after its "
                              "crash notice; killed",
                              (int)w->pid, NOTICE_GRACE_MS / 1000);
            w->notice_ms = 0;
            kill(w->pid, SIGKILL); /* not reaped: the pid is its own */
        }
        if (w->eof_ms == 0 || w->state == W_DYING)
            continue;
        if (now - w->eof_ms < EOF_GRACE_MS)
            watching = 1;
        else
            kill_worker(w, "its output ended but it lives on", "protocol");
    }
    if (!watching)
        uv_timer_stop(t);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    worker_t *w = s->data;
    moat__procs_t *p = w->p;

    (void)buf;
    if (nread < 0) {
        /* EOF: the worker is ending, and its reaping tells the rest,
         * unless it lives on (on_eof). */
        uv_read_stop(s);
        if (nread == UV_ENOBUFS) {
            kill_worker(w, "no memory for its frames", "enomem");
        } else if (!w->reaped && w->eof_ms == 0 && p->eof_open) {
            w->eof_ms = uv_now(p->loop);
            watch_overdue(p);
        }
        return;
    }
    if (w->ignore)
        return;
    w->rd.len += (size_t)nread;
    parse_rc(w, moat__wbuf_parse(&w->rd, WORKER_MAX_FRAME, on_frame, w));
}

/* Reads what a reaped worker left in its stdout, to the end. */
static void drain(worker_t *w) {
    int fd;

    if (w->out_open && !w->ignore &&
        uv_fileno((uv_handle_t *)&w->out, &fd) == 0)
        parse_rc(w, moat__wbuf_drain(&w->rd, fd, WORKER_MAX_FRAME, on_frame,
                                     w));
}

/* ---------------------------------------------------------- spawning */

int moat__spawn_exe(const char *exe, char *const argv[], int fd0, int fd1,
                    pid_t *pid) {
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t none;
    int rc;

    rc = -posix_spawn_file_actions_init(&fa);
    if (rc != 0)
        return rc;
    rc = -posix_spawnattr_init(&attr);
    if (rc != 0) {
        posix_spawn_file_actions_destroy(&fa);
        return rc;
    }
    sigemptyset(&none);
    /* Its own signal mask starts empty whatever the loop's is. */
    if ((rc = -posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK)) ==
            0 &&
        (rc = -posix_spawnattr_setsigmask(&attr, &none)) == 0 &&
        (rc = -posix_spawn_file_actions_adddup2(&fa, fd0, 0)) == 0 &&
        (fd1 < 0 ||
         (rc = -posix_spawn_file_actions_adddup2(&fa, fd1, 1)) == 0))
        rc = -posix_spawn(pid, exe, &fa, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    return rc;
}

int moat__spawn_worker(const char *exe, pid_t *pid, int *in_fd,
                       int *out_fd) {
    char *argv[2] = {(char *)exe, NULL};
    int in[2] = {-1, -1}, out[2] = {-1, -1}, rc;

    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0)
        rc = -errno;
    else
        rc = moat__spawn_exe(exe, argv, in[0], out[1], pid);
    if (in[0] >= 0)
        close(in[0]);
    if (out[1] >= 0)
        close(out[1]);
    if (rc != 0) {
        if (in[1] >= 0)
            close(in[1]);
        if (out[0] >= 0)
            close(out[0]);
        return rc;
    }
    *in_fd = in[1];
    *out_fd = out[0];
    return 0;
}

static void on_forked(void *data, int pid_or_error);
static void on_notice(uv_poll_t *h, int status, int events);

/* Starts the fork server, unless one is running or one could not be
 * started (then workers are spawned from now on). */
static void start_forker(moat__procs_t *p) {
    int rc;

    if (p->fk != NULL || p->fk_off || p->stopping)
        return;
    rc = moat__forker_start(p->loop, p->exe, p->hello.buff,
                            (size_t)p->hello.index, FORKER_START_MS,
                            on_forked, p, &p->fk);
    if (rc != 0) {
        p->fk_off = 1;
        moat__outbox_logf(p->ob, "warning",
                          "moat_cnode: cannot start the fork server (%s): "
                          "workers are spawned",
                          moat_strerror(rc));
    }
}

/* Asks the fork server for a worker on three new pipes (its stdin, its
 * stdout and its crash notice), whose other ends go to *in_fd, *out_fd
 * and *notice_fd.  Returns 0, or a negative error (nothing was asked). */
static int fork_worker(moat__procs_t *p, int *in_fd, int *out_fd,
                       int *notice_fd) {
    int fds[3][2], n, rc = 0;

    start_forker(p);
    if (!moat__forker_alive(p->fk))
        return UV_ENOSYS;
    for (n = 0; n < 3; n++)
        if ((n < 2 ? pipe2(fds[n], O_CLOEXEC)
                   : pipe2(fds[n], O_CLOEXEC | O_NONBLOCK)) < 0) {
            rc = -errno;
            break;
        }
    if (rc == 0)
        rc = moat__forker_fork(p->fk, fds[0][0], fds[1][1], fds[2][1]);
    for (int i = 0; i < n; i++) {
        close(fds[i][i == 0 ? 0 : 1]); /* the worker's ends */
        if (rc != 0)
            close(fds[i][i == 0 ? 1 : 0]);
    }
    if (rc != 0)
        return rc;
    *in_fd = fds[0][1];
    *out_fd = fds[1][0];
    *notice_fd = fds[2][0];
    return 0;
}

/* Starts one worker: forked by the fork server (it then reads its pipes
 * once its pid is known, and needs no hello), else spawned and sent
 * hello.  Returns 0 or a negative error (then there is no worker); a
 * failure after that kills the worker, which is reaped like any other.
 * *forked says which. */
static int spawn(moat__procs_t *p, int *forked) {
    worker_t *w = calloc(1, sizeof *w);
    packet_t *hello = NULL;
    int in = -1, out = -1, rc;

    *forked = 0;
    if (w == NULL)
        return UV_ENOMEM;
    w->notice_fd = -1;
    rc = fork_worker(p, &in, &out, &w->notice_fd);
    if (rc == 0) {
        w->forked = *forked = 1;
        *p->forking_tail = w;
        p->forking_tail = &w->fnext;
    } else {
        /* No fork server, or it cannot take a request now. */
        rc = moat__spawn_worker(p->exe, &w->pid, &in, &out);
    }
    if (rc != 0) {
        free(w);
        return rc;
    }
    w->p = p;
    w->state = W_STARTING;
    w->last_ns = UINT64_MAX; /* not known to be fast */
    w->held_tail = &w->held;
    w->next = p->workers;
    p->workers = w;
    p->nlive++;
    if (uv_pipe_init(p->loop, &w->in, 0) == 0) {
        w->in.data = w;
        w->in_open = 1;
        w->nopen++;
        if (uv_pipe_open(&w->in, in) == 0)
            in = -1;
    }
    if (uv_pipe_init(p->loop, &w->out, 0) == 0) {
        w->out.data = w;
        w->out_open = 1;
        w->nopen++;
        if (uv_pipe_open(&w->out, out) == 0) {
            out = -1;
            if (!w->forked)
                uv_read_start((uv_stream_t *)&w->out, on_alloc, on_read);
        }
    }
    if (w->notice_fd >= 0 &&
        uv_poll_init(p->loop, &w->notice, w->notice_fd) == 0) {
        w->notice.data = w;
        w->notice_open = 1;
        w->nopen++;
    }
    if (in < 0 && out < 0 && w->forked)
        return 0;
    if (in < 0 && out < 0)
        hello = packet_new(0, &p->hello);
    if (hello == NULL) {
        if (in >= 0)
            close(in);
        if (out >= 0)
            close(out);
        kill_worker(w, "its pipes could not be set up", "protocol");
        return 0;
    }
    write_packets(w, &hello, 1);
    unref(hello);
    return 0;
}

/* Asks the fork server for every missing worker, or spawns one; asks
 * for another turn while more are missing. */
static void spawn_missing(moat__procs_t *p) {
    int rc, forked = 1;

    while (forked && !p->stopping && p->nlive < p->size + p->spares) {
        rc = spawn(p, &forked);
        if (rc != 0) {
            moat__outbox_logf(p->ob, "error",
                              "moat_cnode: cannot spawn a worker: %s",
                              moat_strerror(rc));
            died_on_its_own(p);
        }
    }
    replenish(p);
}

/* The fork server's answer to the oldest request, or 0: it is gone. */
static void on_forked(void *data, int pid_or_error) {
    moat__procs_t *p = data;
    worker_t *w = p->forking;

    if (pid_or_error == 0) {
        /* The next spawn starts a new one. */
        if (!p->stopping)
            moat__outbox_logf(p->ob, "warning",
                              "moat_cnode: the fork server ended");
        moat__forker_close(p->fk, 0);
        p->fk = NULL;
        replenish(p);
        return;
    }
    if (w == NULL)
        return; /* cannot happen: one answer a request */
    p->forking = w->fnext;
    if (p->forking == NULL)
        p->forking_tail = &p->forking;
    w->fnext = NULL;
    if (pid_or_error < 0) {
        /* No worker: a failed spawn, which counts. */
        w->reaped = 1;
        w->ignore = 1;
        if (w->state == W_STARTING) {
            w->counts = 1;
            retire(w);
        }
        if (w->counts && !p->stopping) {
            moat__outbox_logf(p->ob, "error",
                              "moat_cnode: cannot fork a worker: %s",
                              moat_strerror(pid_or_error));
            died_on_its_own(p);
        }
        close_in(w);
        close_out(w);
        close_notice(w);
        replenish(p);
        return;
    }
    w->pid = pid_or_error;
    if (w->state == W_DYING) {
        kill(w->pid, SIGKILL); /* killed before its pid was known */
    } else if (!p->stopping && w->out_open) {
        uv_read_start((uv_stream_t *)&w->out, on_alloc, on_read);
        if (w->notice_open)
            uv_poll_start(&w->notice, UV_READABLE, on_notice);
    }
    reap(p); /* its SIGCHLD may have come before its pid */
}

/* Spawns what is missing at the end of the turn. */
static void replenish(moat__procs_t *p) {
    if (p->nlive < p->size + p->spares)
        arm(p);
}

/* ---------------------------------------------------------- dispatch */

static int serves(const worker_t *w) {
    return w->state == W_READY && !w->reaped && w->in_open;
}

/* Gives w the oldest queued run. */
static void give(moat__procs_t *p, worker_t *w) {
    packet_t *k = p->queue;

    p->queue = k->next;
    if (p->queue == NULL)
        p->queue_tail = &p->queue;
    p->nqueue--;
    k->next = NULL;
    if (w->nheld == 0)
        w->since = uv_hrtime();
    *w->held_tail = k;
    w->held_tail = &k->next;
    w->nheld++;
    p->nheld++;
    k->seq = ++w->nsent; /* the worker counts the runs it reads */
    w->fresh[w->nfresh++] = k;
}

/* Whether w holds a run whose outcome the VM has not decided.  A worker
 * holding only cancelled runs holds abandoned work (bodies leaving, or
 * ignoring the cancel), as an abandoned body's thread is in thread
 * isolation: it is not one of the `size` that hold runs. */
static int holds_live(const worker_t *w) {
    for (const packet_t *k = w->held; k != NULL; k = k->next)
        if (!k->cancelled)
            return 1;
    return 0;
}

/* Gives queued runs to workers (see DESIGN, Turns). */
static void dispatch(moat__procs_t *p) {
    unsigned busy = 0;
    uint64_t now;
    int gave;

    if (p->stopping || p->queue == NULL)
        return;
    for (worker_t *w = p->workers; w != NULL; w = w->next)
        busy += serves(w) && holds_live(w);
    for (worker_t *w = p->workers; w != NULL && p->queue != NULL; w = w->next)
        if (busy < p->size && serves(w) && w->nheld == 0) {
            give(p, w);
            busy++;
        }
    now = uv_hrtime();
    do {
        gave = 0;
        for (worker_t *w = p->workers;
             w != NULL && busy >= p->size &&
             p->nqueue >= (size_t)p->size * DEEP_QUEUE;
             w = w->next)
            if (serves(w) && w->nheld > 0 && w->nheld < PIPELINE &&
                !w->held->cancelled && w->last_ns < FAST_NS &&
                now - w->since < STALL_NS) {
                give(p, w);
                gave = 1;
            }
    } while (gave);
    for (worker_t *w = p->workers; w != NULL; w = w->next)
        if (w->nfresh > 0) {
            unsigned n = w->nfresh;
            w->nfresh = 0;
            write_packets(w, w->fresh, n);
        }
}

static void on_turn(uv_idle_t *h) {
    moat__procs_t *p = h->data;

    uv_idle_stop(h);
    dispatch(p);
    flush(p);
    spawn_missing(p);
}

/* ------------------------------------------------------------ reaping */

/* Ends the runs w held when it died with wait status st (see DESIGN,
 * Deaths). */
static void settle(worker_t *w, int st) {
    moat__procs_t *p = w->p;
    packet_t *k, *back = NULL, **back_tail = &back;
    size_t nback = 0;
    int begun = 1;

    while ((k = w->held) != NULL) {
        w->held = k->next;
        k->next = NULL;
        w->nheld--;
        p->nheld--;
        if (k->cancelled) {
            emit_stopped(p, k->tag);
            if (k->killed)
                begun = 0;
            unref(k);
        } else if (begun) {
            answer_crash(p, k->tag, w->why, st);
            begun = 0;
            unref(k);
        } else {
            *back_tail = k;
            back_tail = &k->next;
            nback++;
        }
    }
    w->held_tail = &w->held;
    if (back == NULL)
        return;
    if (p->stopping) {
        free_list(back);
        return;
    }
    *back_tail = p->queue;
    if (p->queue == NULL)
        p->queue_tail = back_tail;
    p->queue = back;
    p->nqueue += nback;
}

/* Worker w ended with wait status st: it was reaped, or its crash notice
 * says it is dying of a fault. */
static void ended(worker_t *w, int st) {
    moat__procs_t *p = w->p;
    char how[64];

    drain(w);
    if (w->state == W_STARTING || w->state == W_READY) {
        w->counts = w->nheld == 0;
        if (w->counts) {
            describe(st, how, sizeof how);
            moat__outbox_logf(p->ob, "warning",
                              "moat_cnode: worker %d died %s while %s",
                              (int)w->pid, how,
                              w->state == W_READY ? "idle" : "starting");
        }
        retire(w);
    }
    if (w->state == W_DYING) {
        settle(w, st);
        if (w->counts)
            died_on_its_own(p);
    }
    w->ignore = 1;
}

/* Worker w has been reaped with wait status st.  Its handles are closed
 * only now: the last one to close frees it, and an unreaped worker must
 * stay listed (reap). */
static void exited(worker_t *w, int st) {
    if (!w->settled)
        ended(w, st);
    close_in(w);
    close_out(w);
    close_notice(w);
}

/* Whether sig is one a worker's crash notice may name. */
static int is_fault(int sig) {
    static const int faults[] = {MOAT_FAULT_SIGNALS};

    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
        if (faults[i] == sig)
            return 1;
    return 0;
}

/* A forked worker's crash notice (see DESIGN, Deaths): the worker is
 * dying of the fault it names, so its runs are settled now, as its
 * reaping would settle them, without waiting for the kernel to tear it
 * down; a replacement is asked for at the end of the turn. */
static void crash_notice(worker_t *w, uint64_t sig) {
    moat__procs_t *p = w->p;

    close_notice(w); /* nothing can follow it */
    if (sig > INT_MAX || !is_fault((int)sig)) {
        kill_worker(w, "a crash notice of no fault", "protocol");
        return;
    }
    w->notice_ms = uv_now(p->loop);
    watch_overdue(p);
    ended(w, (int)sig); /* a wait status: killed by sig */
    w->settled = 1;
    replenish(p);
    arm(p);
}

/* A forked worker's skip notice: the cancel's signal came before run
 * `seq` began, and it never will (jobs.c, Run here).  Only for a run
 * whose cancel was forwarded. */
static void skip_notice(worker_t *w, uint64_t seq) {
    packet_t **pp = &w->held;

    while (*pp != NULL && (*pp)->seq != seq)
        pp = &(*pp)->next;
    if (*pp == NULL || !(*pp)->forwarded) {
        kill_worker(w, "a skip notice for a run it was not asked to stop",
                    "protocol");
        return;
    }
    emit_stopped(w->p, (*pp)->tag);
    unref(unhold(w, pp));
    arm(w->p);
}

/* A forked worker's notices (cnode.h, MOAT__NOTICE_LEN), read whole. */
static void on_notice(uv_poll_t *h, int status, int events) {
    worker_t *w = h->data;
    moat__procs_t *p = w->p;
    unsigned char b[MOAT__NOTICE_LEN * PIPELINE];
    ssize_t r;

    (void)events;
    for (;;) {
        do
            r = status == 0 ? read(w->notice_fd, b, sizeof b) : 0;
        while (r < 0 && errno == EINTR);
        if (r <= 0) {
            if (r == 0) /* its end: the worker is gone, and says nothing */
                close_notice(w);
            return;
        }
        if (w->reaped || w->ignore || p->stopping ||
            (w->state != W_STARTING && w->state != W_READY))
            continue; /* drained, unheard */
        if (r % MOAT__NOTICE_LEN != 0) {
            kill_worker(w, "a notice cut short", "protocol");
            return;
        }
        for (ssize_t i = 0; i < r && w->notice_open && !w->ignore;
             i += MOAT__NOTICE_LEN) {
            uint64_t v = moat__be64(b + i + 1);
            if (b[i] == MOAT__NOTICE_FAULT)
                crash_notice(w, v);
            else if (b[i] == MOAT__NOTICE_SKIP)
                skip_notice(w, v);
            else
                kill_worker(w, "a notice of no known kind", "protocol");
        }
        if (!w->notice_open || w->ignore)
            return;
    }
}

static void reap(moat__procs_t *p) {
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        int st;
        pid_t r;
        if (w->reaped || w->pid == 0) /* waitpid(0) is any child */
            continue;
        do
            r = waitpid(w->pid, &st, WNOHANG);
        while (r < 0 && errno == EINTR);
        if (r != w->pid)
            continue;
        w->reaped = 1;
        exited(w, st);
    }
}

static void on_sigchld(uv_signal_t *h, int signum) {
    moat__procs_t *p = h->data;

    (void)signum;
    reap(p);
    replenish(p);
    arm(p);
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

/* The workers' hello: {hello, #{size => 1, max_queue => PIPELINE,
 * libraries, isolation => thread, name[, max_memory]}}: the worker admits
 * every run it may hold. */
static int make_hello(moat__procs_t *p, const moat__hello_t *h) {
    ei_x_buff *x = &p->hello;

    if (ei_x_new_with_version(x) < 0)
        return UV_ENOMEM;
    if (ei_x_encode_tuple_header(x, 2) < 0 ||
        ei_x_encode_atom(x, "hello") < 0 ||
        ei_x_encode_map_header(x, h->max_memory > 0 ? 6 : 5) < 0 ||
        ei_x_encode_atom(x, "size") < 0 || ei_x_encode_long(x, 1) < 0 ||
        ei_x_encode_atom(x, "max_queue") < 0 ||
        ei_x_encode_long(x, PIPELINE) < 0 ||
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
    p->forking_tail = &p->forking;
    p->exe = strdup(exe);
    p->deaths = calloc((size_t)p->max_restarts + 1, sizeof *p->deaths);
    if (p->exe == NULL || p->deaths == NULL || ei_x_new(&p->done) < 0) {
        rc = UV_ENOMEM;
        goto fail;
    }
    rc = make_hello(p, h);
    if (rc != 0)
        goto fail;
    rc = uv_idle_init(loop, &p->turn);
    if (rc != 0)
        goto fail;
    p->turn_open = 1;
    p->turn.data = p;
    rc = uv_signal_init(loop, &p->sigchld);
    if (rc != 0)
        goto fail;
    p->sig_open = 1;
    p->sigchld.data = p;
    rc = uv_timer_init(loop, &p->eof);
    if (rc != 0)
        goto fail;
    p->eof_open = 1;
    p->eof.data = p;
    /* Before the first spawn, so that no death goes unnoticed. */
    rc = uv_signal_start(&p->sigchld, on_sigchld, SIGCHLD);
    if (rc != 0)
        goto fail;
    /* Workers the fork server forks are re-parented to this process,
     * whose children they must be to be reaped by pid (forker.c). */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
        p->fk_off = 1;
    while (p->nlive < p->size + p->spares) {
        int forked;
        rc = spawn(p, &forked);
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
    if (p->nheld + p->nqueue >= p->size + p->max_queue) {
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
    arm(p);
}

/* Tells w to cancel held run k (as `shutdown`). */
static void forward_cancel(worker_t *w, packet_t *k) {
    packet_t *c = NULL;
    ei_x_buff x;

    k->forwarded = 1;
    if (ei_x_new_with_version(&x) == 0 &&
        ei_x_encode_tuple_header(&x, 3) == 0 &&
        ei_x_encode_atom(&x, "cancel") == 0 &&
        ei_x_encode_ulonglong(&x, k->tag) == 0 &&
        ei_x_encode_atom(&x, "shutdown") == 0)
        c = packet_new(k->tag, &x);
    ei_x_free(&x);
    if (c == NULL) {
        /* No memory to ask it: end it for real instead. */
        kill_worker(w, "no memory to forward a cancel", "enomem");
        return;
    }
    /* A forked worker reads nothing while a body runs: the signal reaches
     * the body if the frame came too late to stop it first. */
    c->signal = (unsigned char)w->forked;
    c->seq = k->seq;
    write_packets(w, &c, 1);
    unref(c);
}

void moat__procs_cancel(moat__procs_t *p, uint64_t tag, moat_atom_t reason) {
    int hard = reason == MOAT_A_KILLED || reason == MOAT_A_TIMEOUT;
    packet_t **pp, *k;

    for (pp = &p->queue; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->tag != tag)
            continue;
        k = *pp;
        *pp = k->next;
        if (p->queue_tail == &k->next)
            p->queue_tail = pp;
        p->nqueue--;
        unref(k);
        emit_stopped(p, tag);
        return;
    }
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        if ((w->state != W_READY && w->state != W_DYING) ||
            (pp = find_held(w, tag)) == NULL)
            continue;
        k = *pp;
        k->cancelled = 1;
        if (w->state == W_DYING)
            return; /* settled stopped once reaped */
        if (hard && pp == &w->held) {
            /* The run that may be running: a real kill. */
            k->killed = 1;
            retire(w);
            kill(w->pid, SIGKILL); /* not reaped yet: the pid is its own */
            replenish(p);
            arm(p);
            return;
        }
        if (!k->forwarded)
            forward_cancel(w, k);
        return;
    }
}

void moat__procs_stop(moat__procs_t *p) {
    uint64_t deadline;
    int left_n;

    p->stopping = 1;
    free_list(p->queue);
    p->queue = NULL;
    p->queue_tail = &p->queue;
    p->nqueue = 0;
    /* The pids of the workers asked for, so that they are reaped too. */
    moat__forker_close(p->fk, STOP_GRACE_MS);
    p->fk = NULL;
    if (p->sig_open) {
        p->sig_open = 0;
        uv_close((uv_handle_t *)&p->sigchld, NULL);
    }
    if (p->turn_open) {
        p->turn_open = 0;
        uv_close((uv_handle_t *)&p->turn, NULL);
    }
    if (p->eof_open) {
        p->eof_open = 0;
        uv_close((uv_handle_t *)&p->eof, NULL);
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
        left_n = 0;
        for (worker_t *w = p->workers; w != NULL; w = w->next) {
            int st;
            if (w->reaped)
                continue;
            if (waitpid(w->pid, &st, WNOHANG) == w->pid)
                w->reaped = 1;
            else
                left_n++;
        }
        if (left_n > 0)
            uv_sleep(1);
        uv_update_time(p->loop);
    } while (left_n > 0 && uv_now(p->loop) < deadline);
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        int st;
        if (w->reaped)
            continue;
        kill(w->pid, SIGKILL);
        while (waitpid(w->pid, &st, 0) < 0 && errno == EINTR)
            ;
        w->reaped = 1;
    }
    for (worker_t *w = p->workers; w != NULL; w = w->next) {
        close_out(w);
        close_notice(w);
    }
}

void moat__procs_free(moat__procs_t *p) {
    if (p == NULL)
        return;
    /* Workers whose handles were never opened (a failed start). */
    while (p->workers != NULL) {
        worker_t *w = p->workers;
        p->workers = w->next;
        if (w->notice_fd >= 0)
            close(w->notice_fd);
        free_list(w->held);
        moat__wbuf_free(&w->rd);
        free(w);
    }
    free_list(p->queue);
    ei_x_free(&p->done);
    ei_x_free(&p->hello);
    free(p->stopped);
    free(p->deaths);
    free(p->exe);
    free(p);
}
