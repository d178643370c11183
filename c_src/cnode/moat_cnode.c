/*
 * moat_cnode.c: the C-node executable, `backend => cnode` over the port
 * transport or the distribution transport (dist.c; doc/cnode.md is the
 * protocol), in `isolation => thread` (below) or `isolation => process`
 * (procs.c: this node is then the parent of worker processes, each one
 * this executable in thread isolation with one thread).
 *
 * DESIGN
 *
 * Threads.  The main thread runs a libuv loop that reads stdin (frames:
 * a 4-byte big-endian length, then one term in the external term format),
 * reads the stderr pipe (errlog.c), and polls cancelled bodies (jobs.c).
 * The core pool's threads run the task bodies and send each outcome
 * themselves, through the outbox (outbox.c), the only writer of frames;
 * a worker of process isolation forked by the fork server runs them on
 * its loop thread instead, one at a time (jobs.c, Run here).
 * It writes to its own copy of stdout: fd 1 and fd 2 both become the
 * errlog pipe, so what a library prints reaches the VM as log frames and
 * can never corrupt the frames.
 *
 * Frames.  Every frame is decoded by frame.c, which does no I/O and trusts
 * nothing it has not checked.  The first frame must be hello: it opens the
 * libraries, starts the pool and is answered with ready; anything else, or
 * a hello that cannot be served, is answered with {error, _} and the node
 * exits with status 2.  Afterwards (also while ready waits for a servers'
 * worker, in process isolation) a malformed frame is logged and its
 * readable tags answered badarg, and a second hello is logged and
 * ignored; the node never exits for one.  The run
 * frames of one read are submitted as one batch (at the end of the read,
 * or before a cancel, so a cancel always finds the tasks sent before it).
 *
 * Servers.  In thread isolation hello may bring native servers: the loop
 * thread starts the core's native supervisor and them (each init on this
 * thread) before it answers ready.  Calls are jobs (jobs.c), casts and
 * the which_children/count_children queries are served on the loop
 * thread from the supervisor's tables, and servers run on the pool's
 * threads.  The supervisor's callbacks (a restart, a crash, giving up)
 * run on pool threads: they leave their news under the servers' lock and
 * wake the loop with a uv_async_t, which sends the report frames.
 * stop_servers drains the pool and waits for the supervisor to stop its
 * servers on a thread of libuv's work queue (a terminate may take
 * seconds), then the loop answers servers_stopped.  Lock order: the
 * servers' lock is taken alone.  In process isolation the servers run in
 * a worker process of their own (srvworker.c): hello is answered once it
 * has answered its own, and the servers' frames are relayed to it.
 *
 * Shutdown.  stdin's end ends the node with status 0.  The outbox drops
 * what follows (the VM has stopped listening); the pool is closed, which
 * decides every outcome at once; bodies that heed cancellation get
 * EXIT_GRACE_MS to leave.  If none is left on a thread, the pool is
 * stopped (its threads joined, so no complete callback still runs), then
 * everything is freed before exiting, so that leak checkers see nothing;
 * otherwise the node exits at once, because a body that ignores
 * cancellation cannot be waited for (it runs until it returns).  The
 * parent-death signal covers a VM killed outright.  In process isolation
 * there is no pool: the workers, and the servers' worker, are ended and
 * reaped (procs.c, srvworker.c) before the node exits.
 *
 * Distribution.  With MOAT_NODE (and MOAT_COOKIE) in its environment the
 * node joins as a hidden C-node (dist.c) and its frames travel as
 * messages; the same dispatcher below handles them.  Started by a pool's
 * owner, stdin is then only its lifeline (its end still ends the node),
 * stdout and stderr go to the VM's log as lines, and the line
 * "moat_cnode listening" says that the name is published.  Started by
 * hand with --serve, it is a small parent that runs one session at a
 * time in a child (this executable with --session): the child publishes
 * the name, serves one pool and exits when the session ends, or dies of
 * a fault in thread isolation, and the parent starts the next child.  So
 * nothing of a session outlives it, not even a body that ignored its
 * cancel.  The two variables are removed from the environment at start,
 * so that worker processes do not see them.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

/* Frames larger than this are dropped unread (and logged) rather than
 * buffered: arguments that large belong in a file. */
#define MAX_FRAME (1u << 30)

/* A read asks for at least this much room; the buffer shrinks back to
 * READ_MIN after a frame larger than SHRINK_ABOVE. */
#define READ_MIN (64u * 1024u)
#define SHRINK_ABOVE (4u * 1024u * 1024u)

/* How long stdin's end waits for cancelled bodies that heed the cancel
 * (the demo's sleep leaves within 1 ms) before exiting without them. */
#define EXIT_GRACE_MS 10

#define LEN_BYTES 4

typedef struct node_s {
    uv_loop_t loop;
    uv_pipe_t in;
    int in_open;
    char *rbuf;        /* bytes read from stdin, not yet handled */
    size_t rlen, rcap;
    uint64_t skip;     /* bytes of an oversized frame still to drop */
    int hello_seen;    /* the first frame, hello, was handled */
    int hello_done;    /* ready was sent */
    int stop;          /* the loop is ending: no more frames */
    int status;        /* the exit status */
    moat_lib_t **libs;
    size_t nlibs;
    moat_pool_t *pool;        /* thread isolation */
    struct servers_s *servers; /* thread isolation, with servers */
    moat__procs_t *procs;     /* process isolation */
    moat__srvw_t *srvw;       /* process isolation, with servers */
    moat__outbox_t ob;
    moat__jobs_t jobs;
    moat__errlog_t errlog;
    moat__dist_t dist;
    int loop_ready, ob_ready, jobs_ready, errlog_ready, dist_ready;
    int distributed;   /* frames travel over distribution */
    int session;       /* --session: a child of --serve, no lifeline */
    int forked;        /* a worker forked by the fork server */
} node_t;

/* The native servers of thread isolation (see DESIGN): the supervisor
 * and its children's ids, and what the supervisor's callbacks leave for
 * the loop thread to report. */
typedef struct servers_s {
    moat_pid_t sup;
    moat_term_t **ids;        /* the specs' own terms, in start order */
    size_t n;
    atomic_uint_fast64_t restarts;
    uint64_t restarts_sent;   /* loop thread */
    uv_async_t report;        /* wakes the loop to send the reports */
    int report_open;
    uv_mutex_t lock;          /* guards the four fields below */
    uint64_t ncrashed;        /* children ended abnormally, unreported */
    moat_term_t *crash_id, *crash_reason; /* the last of them */
    moat_term_t *gave_up;     /* the supervisor's reason, unreported */
    uv_work_t stop_req;       /* {stop_servers}: drain and stop */
    int stopping;             /* loop thread: stop_req is queued */
    int stopped;              /* loop thread: stop_req is done */
    node_t *node;
} servers_t;

/* A child's start argument: the core's server child, and the node to
 * count its restarts in. */
typedef struct {
    moat_server_child_t c;
    servers_t *sv;
    int started; /* it started once: any later start is a restart.  Only
                    its starts use it, which its supervisor serializes. */
} child_arg_t;

/* Static, so that all of it stays reachable when the node exits with
 * bodies still running. */
static node_t node;

/* This executable, which process isolation spawns as its workers: read
 * once at start, from /proc/self/exe (which valgrind answers with the
 * program it runs, not itself). */
static char exe_path[PATH_MAX];

static void finish(node_t *n, int status) {
    if (n->stop)
        return;
    n->stop = 1;
    n->status = status;
    if (n->in_open)
        uv_read_stop((uv_stream_t *)&n->in);
    uv_stop(&n->loop);
}

/* ------------------------------------------------------------- replies */

/* Answers {Tag, exit, Atom}. */
static void reply_atom(node_t *n, uint64_t tag, moat_atom_t a) {
    size_t len;
    const char *etf = moat_term_data(moat_atom(a), &len);

    moat__outbox_done(&n->ob, tag, MOAT_EXIT, etf + 1, len - 1);
}

/* Answers {Tag, exit, {unknown_task, Task}}, Task as the frame had it. */
static void reply_unknown(node_t *n, uint64_t tag, const moat__atom_t *task) {
    ei_x_buff x;

    if (ei_x_new(&x) < 0 || ei_x_encode_tuple_header(&x, 2) < 0 ||
        ei_x_encode_atom(&x, "unknown_task") < 0 ||
        ei_x_append_buf(&x, task->etf, (int)task->etf_len) < 0) {
        ei_x_free(&x);
        reply_atom(n, tag, MOAT_A_ENOMEM);
        return;
    }
    moat__outbox_done(&n->ob, tag, MOAT_EXIT, x.buff, (size_t)x.index);
    ei_x_free(&x);
}

/* Answers hello with {error, {Kind, <<Message>>}}, then ends the node with
 * status 2. */
static void hello_fail(node_t *n, const char *kind, const char *msg) {
    ei_x_buff x;

    if (ei_x_new_with_version(&x) == 0 &&
        ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, "error") == 0 &&
        ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, kind) == 0 &&
        ei_x_encode_binary(&x, msg, (long)strlen(msg)) == 0)
        moat__outbox_frame(&n->ob, x.buff, (size_t)x.index);
    ei_x_free(&x);
    finish(n, MOAT_CNODE_EXIT_HELLO);
}

/* ------------------------------------------------------------- servers */

/* Sends one frame built in x (with its version byte); drops it when no
 * memory is left (reports are best effort, as logs are). */
static void send_x(node_t *n, ei_x_buff *x) {
    moat__outbox_frame(&n->ob, x->buff, (size_t)x->index);
}

/* Appends a core term's encoding, without its version byte. */
static int x_term(ei_x_buff *x, const moat_term_t *t) {
    size_t len;
    const char *d = moat_term_data(t, &len);
    return ei_x_append_buf(x, d + 1, (int)(len - 1));
}

/* The loop's side of the supervisor's callbacks: {restarts, Total},
 * {crashed, N, LastId, LastReason} and {gave_up, Reason}, each sent when
 * there is something new, so a crash loop costs one frame of each a loop
 * turn however many crashes it holds. */
static void on_report(uv_async_t *a) {
    servers_t *sv = a->data;
    node_t *n = sv->node;
    uint64_t restarts = atomic_load(&sv->restarts), ncrashed;
    moat_term_t *id, *reason, *gave_up;
    ei_x_buff x;

    uv_mutex_lock(&sv->lock);
    ncrashed = sv->ncrashed;
    id = sv->crash_id;
    reason = sv->crash_reason;
    gave_up = sv->gave_up;
    sv->ncrashed = 0;
    sv->crash_id = sv->crash_reason = sv->gave_up = NULL;
    uv_mutex_unlock(&sv->lock);
    if (restarts != sv->restarts_sent && ei_x_new_with_version(&x) == 0) {
        if (ei_x_encode_tuple_header(&x, 2) == 0 &&
            ei_x_encode_atom(&x, "restarts") == 0 &&
            ei_x_encode_ulonglong(&x, restarts) == 0)
            send_x(n, &x);
        ei_x_free(&x);
        sv->restarts_sent = restarts;
    }
    if (ncrashed > 0 && ei_x_new_with_version(&x) == 0) {
        if (ei_x_encode_tuple_header(&x, 4) == 0 &&
            ei_x_encode_atom(&x, "crashed") == 0 &&
            ei_x_encode_ulonglong(&x, ncrashed) == 0 && x_term(&x, id) == 0 &&
            x_term(&x, reason) == 0)
            send_x(n, &x);
        ei_x_free(&x);
    }
    if (gave_up != NULL && ei_x_new_with_version(&x) == 0) {
        if (ei_x_encode_tuple_header(&x, 2) == 0 &&
            ei_x_encode_atom(&x, "gave_up") == 0 && x_term(&x, gave_up) == 0)
            send_x(n, &x);
        ei_x_free(&x);
    }
    moat_term_unref(id);
    moat_term_unref(reason);
    moat_term_unref(gave_up);
}

/* The start callback of every child: the core's, counting each start of
 * a child after its first as a restart (the supervisor counts the same
 * ones in the pool's stats).  On the supervisor's thread, or the loop
 * thread for the first starts. */
static int child_start(moat_pool_t *pool, moat_pid_t sup, void *arg,
                       moat_pid_t *pid, moat_term_t **reason) {
    child_arg_t *a = arg;
    int rc = moat_server_child_start(pool, sup, &a->c, pid, reason);

    if (rc == 0 && a->started) {
        atomic_fetch_add(&a->sv->restarts, 1);
        uv_async_send(&a->sv->report);
    }
    if (rc == 0)
        a->started = 1;
    return rc;
}

static void child_arg_free(void *arg) {
    child_arg_t *a = arg;
    moat_term_unref(a->c.args);
    free(a);
}

/* The supervisor's child_crashed callback.  On its thread. */
static void on_child_crashed(moat_pid_t sup, moat_term_t *id,
                             moat_term_t *reason, void *data) {
    servers_t *sv = data;

    (void)sup;
    moat_term_ref(id);
    moat_term_ref(reason);
    uv_mutex_lock(&sv->lock);
    sv->ncrashed++;
    moat_term_unref(sv->crash_id);
    moat_term_unref(sv->crash_reason);
    sv->crash_id = id;
    sv->crash_reason = reason;
    uv_mutex_unlock(&sv->lock);
    uv_async_send(&sv->report);
}

/* The supervisor's escalate callback: it gave up.  On a pool thread. */
static void on_gave_up(moat_pid_t sup, moat_term_t *reason, void *data) {
    servers_t *sv = data;

    (void)sup;
    moat_term_ref(reason);
    uv_mutex_lock(&sv->lock);
    moat_term_unref(sv->gave_up);
    sv->gave_up = reason;
    uv_mutex_unlock(&sv->lock);
    uv_async_send(&sv->report);
}

/* Waits until supervisor `sup` has ended, after telling it to stop (exit
 * `shutdown` from outside, as its parent would) if `stop`: its children
 * stop in reverse order, each within its shutdown.  Also returns when the
 * pool closes under it.  Any thread but a pool thread. */
static void sup_wait(moat_pool_t *pool, moat_pid_t sup, int stop) {
    moat_pid_t w;
    moat_msg_t *m;
    uint64_t ref;

    if (moat_proc_open(pool, &w) != 0)
        return;
    if (moat_proc_monitor(pool, w, sup, &ref) == 0) {
        if (stop)
            moat_proc_exit(pool, 0, sup, moat_atom(MOAT_A_SHUTDOWN));
        while (moat_proc_receive(pool, w, -1, &m) == 0) {
            int down = m->kind == MOAT_MSG_DOWN && m->ref == ref;
            moat_msg_free(m);
            if (down)
                break;
        }
    }
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

static void servers_free(servers_t *sv) {
    if (sv == NULL)
        return;
    for (size_t i = 0; i < sv->n; i++)
        moat_term_unref(sv->ids[i]);
    free(sv->ids);
    moat_term_unref(sv->crash_id);
    moat_term_unref(sv->crash_reason);
    moat_term_unref(sv->gave_up);
    uv_mutex_destroy(&sv->lock);
    free(sv);
}

/* {error, Reason} with Reason's encoding (no version byte) as it is, in
 * answer to hello; then the node ends with status 2. */
static void hello_fail_term(node_t *n, const char *etf, size_t len) {
    ei_x_buff x;

    if (ei_x_new_with_version(&x) == 0 &&
        ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, "error") == 0 &&
        ei_x_append_buf(&x, etf, (int)len) == 0)
        moat__outbox_frame(&n->ob, x.buff, (size_t)x.index);
    ei_x_free(&x);
    finish(n, MOAT_CNODE_EXIT_HELLO);
}

/* The server's definition in its library, by the name the frame had. */
static const moat_server_def_t *find_server(node_t *n,
                                            const moat__child_t *c) {
    char utf8[2 * 255 + 1]; /* a Latin-1 atom doubles at most */
    size_t len = moat__atom_utf8(&c->server, utf8, sizeof utf8);

    return moat_lib_server(n->libs[c->lib], utf8, len);
}

/* Answers hello with {error, {shutdown, {failed_to_start_child, Id,
 * {unknown_server, Server}}}}, as the NIF backend's start fails. */
static void unknown_server(node_t *n, const moat__child_t *c) {
    ei_x_buff x;

    if (ei_x_new(&x) == 0 && ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, "shutdown") == 0 &&
        ei_x_encode_tuple_header(&x, 3) == 0 &&
        ei_x_encode_atom(&x, "failed_to_start_child") == 0 &&
        x_term(&x, c->id) == 0 && ei_x_encode_tuple_header(&x, 2) == 0 &&
        ei_x_encode_atom(&x, "unknown_server") == 0 &&
        ei_x_append_buf(&x, c->server.etf, (int)c->server.etf_len) == 0)
        hello_fail_term(n, x.buff, (size_t)x.index);
    else
        hello_fail(n, "bad_hello", "out of memory");
    ei_x_free(&x);
}

/*
 * Starts hello's servers under a native supervisor, in order, running
 * each init on this thread, before the node answers ready.  Returns 0,
 * or -1 once hello has been answered with an error: a server that fails
 * to start is {error, {shutdown, {failed_to_start_child, Id, Reason}}},
 * after the supervisor has stopped those it started (S2).
 */
static int servers_start(node_t *n, const moat__hello_t *h) {
    moat_sup_opts_t o = {0};
    moat_child_spec_t *specs;
    servers_t *sv;
    moat_term_t *reason = NULL;
    char msg[160];
    int rc;

    for (size_t i = 0; i < h->nservers; i++)
        if (find_server(n, &h->servers[i]) == NULL) {
            unknown_server(n, &h->servers[i]);
            return -1;
        }
    sv = calloc(1, sizeof *sv);
    specs = calloc(h->nservers, sizeof *specs);
    if (sv == NULL || specs == NULL ||
        (sv->ids = calloc(h->nservers, sizeof *sv->ids)) == NULL ||
        uv_mutex_init(&sv->lock) != 0) {
        if (sv != NULL)
            free(sv->ids);
        free(sv);
        free(specs);
        hello_fail(n, "bad_hello", "out of memory");
        return -1;
    }
    sv->node = n;
    rc = uv_async_init(&n->loop, &sv->report, on_report);
    if (rc != 0) {
        n->servers = sv; /* freed by stop() */
        free(specs);
        hello_fail(n, "bad_hello", "cannot start the servers' reports");
        return -1;
    }
    sv->report.data = sv;
    sv->report_open = 1;
    n->servers = sv;
    for (size_t i = 0; i < h->nservers; i++) {
        const moat__child_t *c = &h->servers[i];
        child_arg_t *a = calloc(1, sizeof *a);
        if (a == NULL)
            break;
        a->c.def = find_server(n, c);
        a->c.lib = n->libs[c->lib];
        a->c.args = moat_term_ref(c->args);
        a->sv = sv;
        sv->ids[i] = moat_term_ref(c->id);
        sv->n++;
        specs[i] = (moat_child_spec_t){c->id,        child_start,
                                       a,            child_arg_free,
                                       c->restart,   c->shutdown_ms,
                                       MOAT_WORKER};
    }
    if (sv->n < h->nservers) {
        for (size_t i = 0; i < sv->n; i++)
            child_arg_free(specs[i].arg);
        free(specs);
        hello_fail(n, "bad_hello", "out of memory");
        return -1;
    }
    o.strategy = (moat_strategy_t)h->strategy;
    o.intensity = h->max_restarts > INT_MAX ? INT_MAX : (int)h->max_restarts;
    o.period = (int)h->max_seconds;
    o.escalate = on_gave_up;
    o.child_crashed = on_child_crashed;
    o.data = sv;
    rc = moat_sup_start(n->pool, 0, &o, specs, sv->n, &sv->sup, &reason);
    if (rc == MOAT_EINVAL || rc == MOAT_EEXISTS) /* the args are still ours */
        for (size_t i = 0; i < sv->n; i++)
            child_arg_free(specs[i].arg);
    free(specs);
    if (rc == 0)
        return 0;
    if (rc == MOAT_ESTART && reason != NULL) {
        size_t len;
        const char *d = moat_term_data(reason, &len);
        sup_wait(n->pool, sv->sup, 0);
        hello_fail_term(n, d + 1, len - 1);
    } else {
        snprintf(msg, sizeof msg, "cannot start the servers: %s",
                 rc == MOAT_EEXISTS ? "two servers have one id"
                                    : moat_strerror(rc));
        hello_fail(n, "bad_hello", msg);
    }
    moat_term_unref(reason);
    sv->sup = 0;
    return -1;
}

/* The running server at index `child`, or 0. */
static moat_pid_t server_pid(node_t *n, uint32_t child) {
    servers_t *sv = n->servers;
    moat_pid_t pid;

    if (sv == NULL || sv->sup == 0 || child >= sv->n ||
        moat_sup_child_pid(n->pool, sv->sup, sv->ids[child], &pid) != 0)
        return 0;
    return pid;
}

static void on_call(node_t *n, moat__frame_t *f) {
    moat_pid_t pid = server_pid(n, f->child);

    if (pid == 0)
        reply_atom(n, f->tag, MOAT_A_NOPROC);
    else
        moat__jobs_call(&n->jobs, f->tag, pid, f->msg);
}

static void on_cast(node_t *n, moat__frame_t *f) {
    moat_pid_t pid = server_pid(n, f->child);

    if (pid != 0)
        moat_server_cast(n->pool, pid, f->msg);
}

static const char *state_name(moat_child_state_t s) {
    return s == MOAT_CHILD_RUNNING      ? "running"
           : s == MOAT_CHILD_RESTARTING ? "restarting"
                                        : "undefined";
}

/* Answers {which_children, Tag} with [{Id, State, worker | supervisor}],
 * every server `restarting` once the supervisor has given up. */
static void on_which_children(node_t *n, uint64_t tag) {
    servers_t *sv = n->servers;
    moat_child_info_t *ci = NULL;
    int k = sv != NULL && sv->sup != 0
                ? moat_sup_which_children(n->pool, sv->sup, &ci)
                : 0;
    ei_x_buff x;
    size_t count;
    int ok;

    if (k < 0 && k != MOAT_ENOPROC) {
        reply_atom(n, tag, MOAT_A_ENOMEM);
        return;
    }
    if (ei_x_new(&x) < 0) {
        moat_sup_children_free(ci, k > 0 ? k : 0);
        reply_atom(n, tag, MOAT_A_ENOMEM);
        return;
    }
    count = k == MOAT_ENOPROC ? sv->n : (size_t)k;
    ok = count == 0 || ei_x_encode_list_header(&x, (long)count) == 0;
    if (k == MOAT_ENOPROC) {
        for (size_t i = 0; ok && i < sv->n; i++)
            ok = ei_x_encode_tuple_header(&x, 3) == 0 &&
                 x_term(&x, sv->ids[i]) == 0 &&
                 ei_x_encode_atom(&x, "restarting") == 0 &&
                 ei_x_encode_atom(&x, "worker") == 0;
    } else {
        for (int i = 0; ok && i < k; i++)
            ok = ei_x_encode_tuple_header(&x, 3) == 0 &&
                 x_term(&x, ci[i].id) == 0 &&
                 ei_x_encode_atom(&x, state_name(ci[i].state)) == 0 &&
                 ei_x_encode_atom(&x, ci[i].type == MOAT_WORKER
                                          ? "worker"
                                          : "supervisor") == 0;
        moat_sup_children_free(ci, k);
    }
    if (ok && ei_x_encode_empty_list(&x) == 0)
        moat__outbox_done(&n->ob, tag, MOAT_OK, x.buff, (size_t)x.index);
    else
        reply_atom(n, tag, MOAT_A_ENOMEM);
    ei_x_free(&x);
}

/* Answers {count_children, Tag} with #{specs, active, supervisors,
 * workers}; once the supervisor has given up, the specs and none
 * active. */
static void on_count_children(node_t *n, uint64_t tag) {
    servers_t *sv = n->servers;
    moat_child_counts_t c = {0, 0, 0, 0};
    ei_x_buff x;

    if (sv != NULL && sv->sup != 0 &&
        moat_sup_count_children(n->pool, sv->sup, &c) != 0) {
        c = (moat_child_counts_t){0, 0, 0, 0};
        c.specs = c.workers = (int)sv->n;
    }
    if (ei_x_new(&x) == 0 && ei_x_encode_map_header(&x, 4) == 0 &&
        ei_x_encode_atom(&x, "specs") == 0 &&
        ei_x_encode_long(&x, c.specs) == 0 &&
        ei_x_encode_atom(&x, "active") == 0 &&
        ei_x_encode_long(&x, c.active) == 0 &&
        ei_x_encode_atom(&x, "supervisors") == 0 &&
        ei_x_encode_long(&x, c.supervisors) == 0 &&
        ei_x_encode_atom(&x, "workers") == 0 &&
        ei_x_encode_long(&x, c.workers) == 0)
        moat__outbox_done(&n->ob, tag, MOAT_OK, x.buff, (size_t)x.index);
    else
        reply_atom(n, tag, MOAT_A_ENOMEM);
    ei_x_free(&x);
}

static void send_servers_stopped(node_t *n) {
    ei_x_buff x;

    if (ei_x_new_with_version(&x) == 0 &&
        ei_x_encode_tuple_header(&x, 1) == 0 &&
        ei_x_encode_atom(&x, "servers_stopped") == 0)
        send_x(n, &x);
    ei_x_free(&x);
}

/* {stop_servers}, off the loop: the tasks end (`shutdown`), freeing the
 * threads the servers need to run their terminate, then the supervisor
 * stops them in reverse order, each within its shutdown. */
static void stop_servers_work(uv_work_t *req) {
    servers_t *sv = req->data;
    node_t *n = sv->node;

    moat_pool_drain(n->pool, MOAT_A_SHUTDOWN);
    sup_wait(n->pool, sv->sup, 1);
}

static void stop_servers_done(uv_work_t *req, int status) {
    servers_t *sv = req->data;

    (void)status;
    sv->stopping = 0;
    sv->stopped = 1;
    send_servers_stopped(sv->node);
}

/* Answers {stop_servers} with {servers_stopped} once they are. */
static void on_stop_servers(node_t *n) {
    servers_t *sv = n->servers;

    if (sv == NULL || sv->sup == 0 || sv->stopped) {
        send_servers_stopped(n);
        return;
    }
    if (sv->stopping)
        return; /* answered when the first is done */
    sv->stop_req.data = sv;
    if (uv_queue_work(&n->loop, &sv->stop_req, stop_servers_work,
                      stop_servers_done) != 0) {
        send_servers_stopped(n); /* the pool's close stops them */
        return;
    }
    sv->stopping = 1;
}

/* --------------------------------------------------------------- hello */

static int send_ready(node_t *n) {
    ei_x_buff x;
    int ntasks = 0, rc = UV_ENOMEM;

    for (size_t l = 0; l < n->nlibs; l++)
        for (const moat_task_def_t *d = moat_lib_def(n->libs[l])->tasks;
             d->name != NULL; d++)
            ntasks++;
    if (ei_x_new_with_version(&x) < 0)
        return UV_ENOMEM;
    if (ei_x_encode_tuple_header(&x, 3) < 0 ||
        ei_x_encode_atom(&x, "ready") < 0 ||
        ei_x_encode_long(&x, (long)getpid()) < 0 ||
        (ntasks > 0 && ei_x_encode_list_header(&x, ntasks) < 0))
        goto done;
    for (size_t l = 0; l < n->nlibs; l++)
        for (const moat_task_def_t *d = moat_lib_def(n->libs[l])->tasks;
             d->name != NULL; d++)
            if (ei_x_encode_atom_len_as(&x, d->name, (int)strlen(d->name),
                                        ERLANG_UTF8, ERLANG_UTF8) < 0)
                goto done;
    if (ei_x_encode_empty_list(&x) < 0)
        goto done;
    rc = moat__outbox_frame(&n->ob, x.buff, (size_t)x.index);
done:
    ei_x_free(&x);
    return rc;
}

static void on_fatal(void *data, int status) { finish(data, status); }

/* Answers hello with ready; from now on the node serves. */
static void answer_ready(node_t *n) {
    if (send_ready(n) != 0) {
        /* The VM would wait for ready for ever: end with a status it
         * reads as a crash. */
        finish(n, MOAT_CNODE_EXIT_NOMEM);
        return;
    }
    n->hello_done = 1;
}

/* Process isolation: the servers' worker answered its hello, or ended
 * first; so is the VM's answered. */
static void on_srvw_ready(void *data, const char *reason, size_t len,
                          const char *why) {
    node_t *n = data;

    if (n->stop)
        return;
    if (reason != NULL)
        hello_fail_term(n, reason, len);
    else if (why != NULL)
        hello_fail(n, "bad_hello", why);
    else
        answer_ready(n);
}

static void on_hello(node_t *n, moat__hello_t *h) {
    moat_pool_opts_t o = {0};
    moat_pool_stats_t st;
    char msg[256];
    int rc;

    n->hello_seen = 1;

    if (h->isolation == MOAT__ISOLATION_PROCESS && exe_path[0] == '\0') {
        hello_fail(n, "bad_hello",
                   "isolation process: /proc/self/exe cannot be read");
        return;
    }
    /* A worker forked by the fork server (forker.c) has them all open. */
    if (n->libs == NULL)
        n->libs = calloc(h->nlibraries > 0 ? h->nlibraries : 1,
                         sizeof *n->libs);
    if (n->libs == NULL) {
        hello_fail(n, "bad_hello", "out of memory");
        return;
    }
    for (size_t i = n->nlibs; i < h->nlibraries; i++) {
        char *err = NULL;
        rc = moat_lib_open(h->libraries[i], &n->libs[n->nlibs], &err);
        if (rc != 0) {
            if (err == NULL)
                snprintf(msg, sizeof msg, "%s: %s", h->libraries[i],
                         moat_strerror(rc));
            hello_fail(n, "bad_library", err != NULL ? err : msg);
            free(err);
            return;
        }
        n->nlibs++;
    }
    if (h->isolation == MOAT__ISOLATION_PROCESS) {
        /* The libraries stay open here too: ready lists their tasks, and
         * a run of a task they lack is answered without a worker. */
        rc = moat__procs_start(&n->loop, &n->ob, exe_path, h, on_fatal, n,
                               &n->procs);
        if (rc != 0) {
            snprintf(msg, sizeof msg, "cannot start the workers: %s",
                     moat_strerror(rc));
            hello_fail(n, "bad_hello", msg);
            return;
        }
        if (h->nservers == 0) {
            answer_ready(n);
            return;
        }
        /* Answered once the servers' own worker has started them. */
        rc = moat__srvw_start(&n->loop, &n->ob, exe_path, h, on_srvw_ready,
                              on_fatal, n, &n->srvw);
        if (rc != 0) {
            snprintf(msg, sizeof msg, "cannot start the servers' worker: %s",
                     moat_strerror(rc));
            hello_fail(n, "bad_hello", msg);
        }
        return;
    }
    o.nthreads = h->size;       /* 0: the online CPUs */
    o.max_queue = h->max_queue; /* 0: the core's default */
    o.name = h->name[0] != '\0' ? h->name : "cnode";
    o.complete = moat__jobs_complete;
    o.data = &n->jobs;
    /* A forked worker runs its tasks on this thread (jobs.c, Run here):
     * the pool's thread starts only if a task spawns a process. */
    o.lazy_threads = n->forked;
    rc = moat_pool_new(&o, &n->pool);
    if (rc != 0) {
        snprintf(msg, sizeof msg, "cannot start the pool: %s",
                 moat_strerror(rc));
        hello_fail(n, "bad_hello", msg);
        return;
    }
    n->jobs.pool = n->pool;
    moat_pool_stats(n->pool, &st);
    n->jobs.ordered = st.threads == 1; /* before the first submission */
    if (n->forked && (rc = moat__jobs_run_here(&n->jobs, &n->loop,
                                               moat__forker_notice_fd())) !=
                         0) {
        snprintf(msg, sizeof msg, "cannot run tasks on the loop: %s",
                 moat_strerror(rc));
        hello_fail(n, "bad_hello", msg);
        return;
    }
    /* Over the port, a node of several threads polls for the outcomes
     * of its runs (jobs.c, Watching).  Over distribution the pool thread
     * sends each outcome itself (see dist.c): polling made it slower. */
    if (!n->forked && !n->distributed && !n->jobs.ordered &&
        (rc = moat__jobs_watch(&n->jobs, &n->loop)) != 0) {
        snprintf(msg, sizeof msg, "cannot start the loop's poll: %s",
                 moat_strerror(rc));
        hello_fail(n, "bad_hello", msg);
        return;
    }
    /* A worker of process isolation (or a node told so) limits itself
     * once its libraries and threads are in place. */
    if (h->max_memory > 0 && (rc = moat__limit_memory(h->max_memory)) != 0) {
        snprintf(msg, sizeof msg, "cannot limit memory: %s",
                 moat_strerror(rc));
        hello_fail(n, "bad_hello", msg);
        return;
    }
    if (h->nservers > 0 && servers_start(n, h) != 0)
        return;
    answer_ready(n);
}

/* ---------------------------------------------------------------- runs */

static const moat_task_def_t *find_task(node_t *n, const moat__atom_t *a,
                                        const moat_lib_t **lib) {
    char utf8[2 * 255 + 1]; /* a Latin-1 atom doubles at most */
    const char *name = a->name;
    size_t len = a->len;

    if (a->latin1)
        for (size_t i = 0; i < a->len; i++)
            if ((unsigned char)a->name[i] >= 0x80) {
                len = moat__atom_utf8(a, utf8, sizeof utf8);
                name = utf8;
                break;
            }
    for (size_t l = 0; l < n->nlibs; l++) {
        /* earlier libraries win a name two of them export */
        const moat_task_def_t *d = moat_lib_task(n->libs[l], name, len);
        if (d != NULL) {
            *lib = n->libs[l];
            return d;
        }
    }
    return NULL;
}

static void on_run(node_t *n, moat__run_t *e) {
    const moat_task_def_t *def = NULL;
    const moat_lib_t *lib = NULL;

    if (e->status == 0 && (def = find_task(n, &e->task, &lib)) != NULL) {
        if (n->procs != NULL) {
            moat__procs_run(n->procs, e->tag, &e->task, e->args);
        } else {
            moat__jobs_add(&n->jobs, e->tag, def, lib, e->args);
            e->args = NULL; /* the job's now */
        }
    } else if (!moat__jobs_answering(&n->jobs)) {
        return; /* a forked worker's parent knows it never begins */
    } else if (e->status == UV_ENOMEM) {
        reply_atom(n, e->tag, MOAT_A_ENOMEM);
    } else if (e->status != 0) {
        reply_atom(n, e->tag, MOAT_A_BADARG);
    } else {
        reply_unknown(n, e->tag, &e->task);
    }
}

/* -------------------------------------------------------------- frames */

static const char *kind_name(moat__frame_kind_t k) {
    switch (k) {
    case MOAT__FRAME_HELLO:
        return "hello";
    case MOAT__FRAME_RUN:
        return "run";
    case MOAT__FRAME_RUNS:
        return "runs";
    case MOAT__FRAME_CANCEL:
        return "cancel";
    case MOAT__FRAME_CALL:
        return "call";
    case MOAT__FRAME_CAST:
        return "cast";
    case MOAT__FRAME_WHICH_CHILDREN:
        return "which_children";
    case MOAT__FRAME_COUNT_CHILDREN:
        return "count_children";
    case MOAT__FRAME_STOP_SERVERS:
        return "stop_servers";
    default:
        return "unknown";
    }
}

static void handle_frame(node_t *n, const char *buf, size_t len) {
    moat__frame_t f;
    int rc = moat__frame_decode(buf, len, &f);

    if (rc == UV_ENOMEM) {
        /* Tags it held may be lost: the VM must see the node end. */
        moat__frame_free(&f);
        finish(n, MOAT_CNODE_EXIT_NOMEM);
        return;
    }
    if (!n->hello_seen) {
        if (f.kind != MOAT__FRAME_HELLO)
            hello_fail(n, "bad_hello", "the first frame is not {hello, Opts}");
        else if (rc != 0)
            hello_fail(n, "bad_hello", f.why);
        else
            on_hello(n, &f.hello);
        moat__frame_free(&f);
        return;
    }
    if (rc != 0) {
        if (f.untagged > 0)
            moat__outbox_logf(&n->ob, "error",
                              "moat_cnode: malformed %s frame (%zu bytes): "
                              "%s; %zu task(s) without a readable tag "
                              "dropped",
                              kind_name(f.kind), len, f.why, f.untagged);
        else
            moat__outbox_logf(&n->ob, "error",
                              "moat_cnode: malformed %s frame (%zu bytes): "
                              "%s",
                              kind_name(f.kind), len, f.why);
    }
    if (rc == 0 && n->srvw != NULL && moat__srvw_frame(n->srvw, &f, buf, len)) {
        moat__frame_free(&f);
        return;
    }
    switch (f.kind) {
    case MOAT__FRAME_RUN:
    case MOAT__FRAME_RUNS:
        for (size_t i = 0; i < f.nruns; i++)
            on_run(n, &f.runs[i]);
        break;
    case MOAT__FRAME_CANCEL:
        if (rc == 0 && n->procs != NULL)
            moat__procs_cancel(n->procs, f.tag, f.reason);
        else if (rc == 0)
            moat__jobs_cancel(&n->jobs, f.tag, f.reason);
        break;
    case MOAT__FRAME_HELLO:
        if (rc == 0)
            moat__outbox_logf(&n->ob, "error",
                              "moat_cnode: a second hello frame was ignored");
        break;
    case MOAT__FRAME_CALL:
        if (rc == 0)
            on_call(n, &f);
        else if (f.tagged)
            reply_atom(n, f.tag, MOAT_A_BADARG);
        break;
    case MOAT__FRAME_CAST:
        if (rc == 0)
            on_cast(n, &f);
        break;
    case MOAT__FRAME_WHICH_CHILDREN:
    case MOAT__FRAME_COUNT_CHILDREN:
        if (rc != 0 && f.tagged)
            reply_atom(n, f.tag, MOAT_A_BADARG);
        else if (rc == 0 && f.kind == MOAT__FRAME_WHICH_CHILDREN)
            on_which_children(n, f.tag);
        else if (rc == 0)
            on_count_children(n, f.tag);
        break;
    case MOAT__FRAME_STOP_SERVERS:
        if (rc == 0)
            on_stop_servers(n);
        break;
    default:
        break;
    }
    moat__frame_free(&f);
}

/* --------------------------------------------------------------- stdin */

/* Makes rbuf hold at least `cap` bytes.  Returns 0 or UV_ENOMEM. */
static int reserve(node_t *n, size_t cap) {
    char *b;

    if (cap <= n->rcap)
        return 0;
    if (cap < 2 * n->rcap)
        cap = 2 * n->rcap;
    b = realloc(n->rbuf, cap);
    if (b == NULL)
        return UV_ENOMEM;
    n->rbuf = b;
    n->rcap = cap;
    return 0;
}

/* Handles every whole frame in rbuf and keeps the rest. */
static void parse(node_t *n) {
    size_t off = 0, want = 0; /* want: what an incomplete frame needs */

    while (!n->stop) {
        size_t avail = n->rlen - off;
        uint32_t len;

        if (n->skip > 0) {
            size_t k = avail < n->skip ? avail : (size_t)n->skip;
            off += k;
            n->skip -= k;
            if (n->skip > 0)
                break;
            continue;
        }
        if (avail < LEN_BYTES)
            break;
        len = moat__be32(n->rbuf + off);
        if (len > MAX_FRAME) {
            if (!n->hello_seen) {
                hello_fail(n, "bad_hello", "the first frame is too large");
                break;
            }
            moat__outbox_logf(&n->ob, "error",
                              "moat_cnode: a frame of %u bytes is over the "
                              "limit of %u bytes; dropped",
                              len, MAX_FRAME);
            off += LEN_BYTES;
            n->skip = len;
            continue;
        }
        if (avail - LEN_BYTES < len) {
            /* Room for the whole frame once it is moved to the front. */
            want = LEN_BYTES + (size_t)len;
            if (reserve(n, want) != 0)
                finish(n, MOAT_CNODE_EXIT_NOMEM);
            break;
        }
        handle_frame(n, n->rbuf + off + LEN_BYTES, len);
        off += LEN_BYTES + (size_t)len;
    }
    memmove(n->rbuf, n->rbuf + off, n->rlen - off);
    n->rlen -= off;
    if (n->rcap > SHRINK_ABOVE && n->rlen < READ_MIN && want <= READ_MIN) {
        char *b = realloc(n->rbuf, READ_MIN);
        if (b != NULL) {
            n->rbuf = b;
            n->rcap = READ_MIN;
        }
    }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    node_t *n = h->data;

    (void)hint;
    if (n->rcap - n->rlen < READ_MIN && reserve(n, n->rlen + READ_MIN) != 0) {
        *buf = uv_buf_init(NULL, 0); /* on_read gets UV_ENOBUFS */
        return;
    }
    *buf = uv_buf_init(n->rbuf + n->rlen, (unsigned)(n->rcap - n->rlen));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    node_t *n = s->data;

    (void)buf;
    if (nread == UV_EOF) {
        finish(n, MOAT_CNODE_EXIT_EOF);
        return;
    }
    if (nread < 0) {
        finish(n, nread == UV_ENOBUFS ? MOAT_CNODE_EXIT_NOMEM
                                      : MOAT_CNODE_EXIT_FAILURE);
        return;
    }
    if (n->distributed)
        return; /* stdin is only a lifeline */
    n->rlen += (size_t)nread;
    parse(n);
    if (!n->stop && n->hello_done)
        moat__jobs_flush(&n->jobs);
}

/* ------------------------------------------------------------ lifecycle */

/* Gives fds 0..2 something to point at, so that no pipe this process
 * opens later is mistaken for one of them. */
static int standard_fds(void) {
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) >= 0)
            continue;
        int nul = open("/dev/null", O_RDWR);
        if (nul < 0)
            return -errno;
        if (nul != fd) {
            dup2(nul, fd);
            close(nul);
        }
    }
    return 0;
}

/* The distribution transport's callbacks. */
static void on_dist_frame(void *data, const char *buf, size_t len) {
    node_t *n = data;
    if (!n->stop)
        handle_frame(n, buf, len);
}

static void on_dist_batch(void *data) {
    node_t *n = data;
    if (!n->stop && n->hello_done)
        moat__jobs_flush(&n->jobs);
}

static void on_dist_end(void *data, const char *why) {
    node_t *n = data;
    if (n->session)
        fprintf(stderr, "moat_cnode: session over: %s\n", why);
    finish(n, MOAT_CNODE_EXIT_EOF);
}

static int start_dist(node_t *n, const char *node, const char *cookie) {
    static const char line[] = "moat_cnode listening\n";
    const char *why = "";
    int rc;

    n->dist.on_frame = on_dist_frame;
    n->dist.on_batch = on_dist_batch;
    n->dist.on_end = on_dist_end;
    n->dist.data = n;
    n->dist_ready = 1;
    rc = moat__dist_start(&n->dist, &n->loop, &n->ob, node, cookie, &why);
    if (rc != 0) {
        fprintf(stderr, "moat_cnode: %s: %s\n", node, why);
        return rc;
    }
    if (n->session)
        fprintf(stderr, "moat_cnode: serving as %s\n", node);
    else if (write(1, line, sizeof line - 1) != (ssize_t)sizeof line - 1)
        return -errno;
    return 0;
}

static int start(node_t *n, const char *node, const char *cookie) {
    uv_handle_type t;
    int rc, out = -1;

    rc = uv_loop_init(&n->loop);
    if (rc != 0)
        return rc;
    n->loop_ready = 1;
    /* Port frames go to a copy of stdout: fd 1 itself becomes the errlog
     * pipe, so that a library's prints cannot corrupt the frames.  Over
     * distribution stdout and stderr stay as they are.  A forked worker's
     * stderr is already its parent's errlog pipe (forker.c): its stdout
     * joins it, and it needs no errlog of its own. */
    if (!n->distributed && (out = fcntl(1, F_DUPFD_CLOEXEC, 3)) < 0)
        return -errno;
    if (n->forked && dup2(2, 1) < 0) {
        rc = -errno;
        close(out);
        return rc;
    }
    rc = moat__outbox_init(&n->ob, out);
    if (rc != 0) {
        if (out >= 0)
            close(out);
        return rc;
    }
    n->ob_ready = 1;
    if (!n->distributed && !n->forked) {
        rc = moat__errlog_start(&n->errlog, &n->loop, &n->ob);
        if (rc != 0)
            return rc;
        n->errlog_ready = 1;
    }
    rc = moat__jobs_init(&n->jobs, &n->loop, &n->ob);
    if (rc != 0)
        return rc;
    n->jobs_ready = 1;
    if (n->distributed && (rc = start_dist(n, node, cookie)) != 0)
        return rc;
    if (n->session)
        return 0; /* no lifeline */
    /* epoll cannot watch a regular file (libuv aborts on it) */
    t = uv_guess_handle(0);
    if (t == UV_FILE || t == UV_UNKNOWN_HANDLE)
        return UV_EINVAL;
    rc = uv_pipe_init(&n->loop, &n->in, 0);
    if (rc != 0)
        return rc;
    n->in_open = 1;
    n->in.data = n;
    rc = uv_pipe_open(&n->in, 0);
    if (rc != 0)
        return rc;
    return uv_read_start((uv_stream_t *)&n->in, on_alloc, on_read);
}

/* Whether a body is still on a thread, or a thread is stuck writing. */
static int busy(node_t *n) {
    moat_pool_stats_t st;

    if (moat__outbox_discard(&n->ob))
        return 1;
    if (n->pool == NULL)
        return 0;
    moat_pool_stats(n->pool, &st);
    return st.running > 0 || st.abandoned > 0;
}

/* Ends the node: see the DESIGN paragraph.  Returns the exit status. */
static int stop(node_t *n) {
    moat__jobs_unwatch(&n->jobs); /* the outbox must have no writer */
    if (n->ob_ready)
        moat__outbox_discard(&n->ob);
    if (n->pool != NULL) {
        moat_pool_close(n->pool);
        /* A {stop_servers} still stopping them ends with the close. */
        while (n->servers != NULL && n->servers->stopping)
            uv_run(&n->loop, UV_RUN_ONCE);
        for (int i = 0; busy(n); i++) {
            if (i == EXIT_GRACE_MS)
                _exit(n->status); /* see DESIGN: no waiting for bodies */
            uv_sleep(1);
        }
        /* No body is left, so this is quick; afterwards no callback can
         * still be running (a finished task is no longer counted as
         * running while its callback runs). */
        moat_pool_stop(n->pool);
    }
    if (n->procs != NULL) /* every worker killed and reaped */
        moat__procs_stop(n->procs);
    moat__srvw_stop(n->srvw);
    if (n->jobs_ready) /* releases task handles: before the pool goes */
        moat__jobs_close(&n->jobs);
    if (n->pool != NULL) {
        moat_pool_free(n->pool);
        n->pool = NULL;
    }
    /* No thread can report any more: the pool's are joined. */
    if (n->servers != NULL && n->servers->report_open)
        uv_close((uv_handle_t *)&n->servers->report, NULL);
    if (n->in_open)
        uv_close((uv_handle_t *)&n->in, NULL);
    if (n->dist_ready) /* no thread can queue a frame any more */
        moat__dist_stop(&n->dist);
    if (n->errlog_ready)
        moat__errlog_stop(&n->errlog);
    if (n->loop_ready) {
        uv_run(&n->loop, UV_RUN_DEFAULT); /* the close callbacks */
        uv_loop_close(&n->loop);
    }
    moat__procs_free(n->procs);
    n->procs = NULL;
    moat__srvw_free(n->srvw);
    n->srvw = NULL;
    servers_free(n->servers);
    n->servers = NULL;
    for (size_t i = 0; i < n->nlibs; i++)
        moat_lib_close(n->libs[i]);
    free(n->libs);
    if (n->ob_ready)
        moat__outbox_close(&n->ob);
    if (n->dist_ready)
        moat__dist_free(&n->dist);
    free(n->rbuf);
    return n->status;
}

/* MOAT_NODE and MOAT_COOKIE, taken out of the environment.  Returns 0,
 * or -1 when only one of them is there. */
static int take_env(char **node, char **cookie) {
    const char *v = getenv("MOAT_NODE"), *c = getenv("MOAT_COOKIE");

    *node = v != NULL ? strdup(v) : NULL;
    *cookie = c != NULL ? strdup(c) : NULL;
    unsetenv("MOAT_NODE");
    unsetenv("MOAT_COOKIE");
    if ((*node == NULL) != (*cookie == NULL) ||
        (v != NULL && *node == NULL) || (c != NULL && *cookie == NULL)) {
        free(*node);
        free(*cookie);
        *node = *cookie = NULL;
        return -1;
    }
    return 0;
}

/* Some time for the name a dead session held to leave epmd. */
#define SERVE_BACKOFF_MS 100
#define SERVE_BACKOFF_MAX_MS 5000

/* --serve: one session at a time, each in a child, for ever (see
 * DESIGN).  A child that fails at once (its name still taken in epmd, say)
 * is retried after a pause that doubles up to 5 s. */
static int serve(const char *node, const char *cookie) {
    char *argv[] = {exe_path, "--session", NULL};
    unsigned pause = SERVE_BACKOFF_MS;

    for (;;) {
        uint64_t started = uv_hrtime();
        pid_t pid;
        int st, rc;

        if (setenv("MOAT_NODE", node, 1) != 0 ||
            setenv("MOAT_COOKIE", cookie, 1) != 0)
            return MOAT_CNODE_EXIT_FAILURE;
        rc = posix_spawn(&pid, exe_path, NULL, NULL, argv, environ);
        unsetenv("MOAT_NODE");
        unsetenv("MOAT_COOKIE");
        if (rc != 0) {
            fprintf(stderr, "moat_cnode: cannot start a session: %s\n",
                    strerror(rc));
            return MOAT_CNODE_EXIT_FAILURE;
        }
        while (waitpid(pid, &st, 0) < 0)
            if (errno != EINTR)
                return MOAT_CNODE_EXIT_FAILURE;
        if (WIFSIGNALED(st))
            fprintf(stderr, "moat_cnode: a session died of signal %d\n",
                    WTERMSIG(st));
        if (WIFEXITED(st) && WEXITSTATUS(st) == MOAT_CNODE_EXIT_FAILURE &&
            uv_hrtime() - started < (uint64_t)1000000000) {
            uv_sleep(pause);
            pause = pause * 2 < SERVE_BACKOFF_MAX_MS ? pause * 2
                                                     : SERVE_BACKOFF_MAX_MS;
        } else {
            pause = SERVE_BACKOFF_MS;
        }
    }
}

int main(int argc, char **argv) {
    node_t *n = &node;
    pid_t parent = getppid();
    char *dnode, *dcookie;
    moat__frame_t forked; /* --forker: the hello of a forked worker */
    ssize_t len;
    int rc, serving, forker;

    len = readlink("/proc/self/exe", exe_path, sizeof exe_path - 1);
    exe_path[len > 0 ? len : 0] = '\0';
    if (take_env(&dnode, &dcookie) != 0) {
        fprintf(stderr, "moat_cnode: MOAT_NODE and MOAT_COOKIE go together\n");
        return MOAT_CNODE_EXIT_FAILURE;
    }
    n->distributed = dnode != NULL;
    serving = argc == 2 && strcmp(argv[1], "--serve") == 0;
    n->session = argc == 2 && strcmp(argv[1], "--session") == 0;
    forker = argc == 2 && strcmp(argv[1], "--forker") == 0;
    if (argc > 1 && !forker && (!(serving || n->session) || !n->distributed)) {
        fprintf(stderr, "usage: MOAT_NODE=alive@host MOAT_COOKIE=cookie "
                        "moat_cnode --serve\n");
        return MOAT_CNODE_EXIT_FAILURE;
    }
    if (serving) {
        /* A server started by hand has no VM to die with. */
        rc = serve(dnode, dcookie);
        free(dnode);
        free(dcookie);
        return rc;
    }
    ei_init();
    /* ei does not write with MSG_NOSIGNAL, and a VM that is gone must be
     * a write error here, not a signal. */
    signal(SIGPIPE, SIG_IGN);
    /* Die with the VM (or the server) even when it is killed outright,
     * then check that it did not die before the signal was armed.  A
     * parent that died before `parent` was read leaves stdin at EOF: the
     * loop sees it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
        return MOAT_CNODE_EXIT_FAILURE;
    if (standard_fds() != 0)
        return MOAT_CNODE_EXIT_FAILURE;
    /* The fork server of process isolation only forks; each worker it
     * forks goes on from here as a node that was sent hello. */
    if (forker &&
        (rc = moat__forker_main(&forked, &n->libs, &n->nlibs)) != MOAT__FORKED)
        return rc;
    n->forked = forker;
    rc = start(n, dnode, dcookie);
    if (rc != 0) {
        /* errlog may already hold fd 2: say it through the outbox */
        if (n->errlog_ready)
            moat__outbox_logf(&n->ob, "error", "moat_cnode: cannot start: %s",
                              moat_strerror(rc));
        else
            fprintf(stderr, "moat_cnode: cannot start: %s\n",
                    moat_strerror(rc));
        n->status = MOAT_CNODE_EXIT_FAILURE;
    } else {
        n->status = MOAT_CNODE_EXIT_FAILURE; /* unless finish says otherwise */
        if (forker)
            on_hello(n, &forked.hello);
        uv_run(&n->loop, UV_RUN_DEFAULT);
    }
    rc = stop(n);
    if (forker)
        moat__frame_free(&forked);
    free(dnode);
    free(dcookie);
    return rc;
}
