/*
 * sup.c: the native supervisor (DESIGN.md §8, REFERENCE.md §3): OTP's
 * strategies, restart types, shutdown and intensity, for native servers
 * (and, in the C-node, worker processes).
 *
 * DESIGN
 *
 * A supervisor is a built-in server (server.c) that traps exits: its
 * children's ends reach it as EXIT messages, and it runs on a pool thread
 * only while it has messages.  Starting a child calls the child's start
 * callback inline, so a restart costs no thread hand-off; a child's exit
 * signal, sent from the child's worker, schedules the supervisor in that
 * worker's local slot (pool.c), so it usually runs next on the same
 * thread.
 *
 * Stopping a child cannot block the thread (with one thread the child
 * could never run its terminate), so the supervisor is a state machine:
 * an operation stops a list of children one at a time, in order (monitor,
 * unlink, exit `shutdown` or `kill`, a kill timer on the housekeeper for a
 * timeout, then wait for the DOWN), and then either starts the children
 * marked restarting, in start order, or exits.  Messages that arrive
 * during an operation wait in `deferred` and are handled, in order, after
 * it, as OTP's synchronous supervisor would find them in its mailbox.
 *
 * Intensity is OTP's algorithm exactly (keep restarts with T >= Now -
 * Period, add Now, give up when more than Intensity remain), kept as a
 * deque of (second, count) pairs: whole seconds make runs of equal
 * stamps, so the deque holds at most Period + 1 entries and each restart
 * costs O(1) amortized, however high the intensity.
 *
 * Threads: the children array is written only by the supervisor's own
 * thread (or the moat_sup_start caller before the supervisor can run),
 * under `lock`, which which_children/count_children take too (inside
 * sig_lock, never the other way round).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct child_s {
    moat_term_t *id;
    moat_child_start_cb start;
    void *arg;
    void (*arg_free)(void *arg);
    moat_restart_t restart;
    int shutdown_ms;
    moat_child_type_t type;
    uint64_t uid;    /* names it in retry notes, across compactions */
    moat_pid_t pid;  /* 0 when not running */
    int restarting;  /* a restart is pending */
    int removed;     /* a temporary child gone; compacted after the op */
} child_t;

/* Kills a child whose shutdown timeout passed.  Two references: the armed
 * timer's and the supervisor's. */
typedef struct killer_s {
    moat__timer_t timer;
    moat_pool_t *pool;
    moat_pid_t sup, victim;
    atomic_int refs;
} killer_t;

typedef struct stamp_s {
    int64_t sec;
    int64_t count;
} stamp_t;

enum { THEN_START = 1, THEN_EXIT };

typedef struct sup_s {
    moat__server_t *srv;
    moat_pool_t *pool;
    moat_sup_opts_t opts;
    moat_pid_t parent;
    uv_mutex_t lock; /* guards children, nchildren */
    child_t *children;
    size_t nchildren;

    /* Restarts within the period, oldest first (ring buffer). */
    stamp_t *win;
    size_t win_head, win_len, win_cap;
    int64_t win_total;

    /* The operation in progress. */
    int op_active;
    size_t *stops; /* child indices to stop, in order */
    size_t nstops, istop;
    uint64_t cur_ref;
    killer_t *killer;
    int then;
    moat_term_t *exit_reason;
    int escalate;

    moat_msg_t *deferred, **deferred_tail;
    moat_term_t *start_failure; /* set when the first start failed */
    int exited; /* it has ended: nothing more is dispatched */
} sup_t;

static int64_t now_sec(sup_t *sup) {
    if (sup->opts.now_sec != NULL)
        return sup->opts.now_sec(sup->opts.data);
    return (int64_t)(uv_hrtime() / 1000000000u);
}

/* ------------------------------------------------------------ intensity */

/* OTP's add_restart; returns 1 when the intensity is exceeded. */
static int add_restart(sup_t *sup) {
    int64_t now = now_sec(sup), threshold = now - sup->opts.period;
    stamp_t *back;
    while (sup->win_len > 0 && sup->win[sup->win_head].sec < threshold) {
        sup->win_total -= sup->win[sup->win_head].count;
        sup->win_head = (sup->win_head + 1) % sup->win_cap;
        sup->win_len--;
    }
    back = sup->win_len > 0
               ? &sup->win[(sup->win_head + sup->win_len - 1) % sup->win_cap]
               : NULL;
    if (back != NULL && back->sec == now) {
        back->count++;
    } else {
        if (sup->win_len == sup->win_cap) {
            size_t cap = sup->win_cap ? sup->win_cap * 2 : 8;
            stamp_t *w = malloc(cap * sizeof *w);
            if (w == NULL)
                return 1; /* cannot count: give up rather than loop */
            for (size_t i = 0; i < sup->win_len; i++)
                w[i] = sup->win[(sup->win_head + i) % sup->win_cap];
            free(sup->win);
            sup->win = w;
            sup->win_head = 0;
            sup->win_cap = cap;
        }
        sup->win[(sup->win_head + sup->win_len) % sup->win_cap] =
            (stamp_t){now, 1};
        sup->win_len++;
    }
    sup->win_total++;
    return sup->win_total > sup->opts.intensity;
}

/* ------------------------------------------------------------- children */

static void child_drop(child_t *c) {
    moat_term_unref(c->id);
    if (c->arg_free != NULL)
        c->arg_free(c->arg);
}

/* Removes children marked removed.  Not during an operation (indices).
 * Their arg_free runs after the unlock: it is the caller's code. */
static void compact(sup_t *sup) {
    for (;;) {
        child_t gone;
        size_t i;
        uv_mutex_lock(&sup->lock);
        for (i = 0; i < sup->nchildren && !sup->children[i].removed; i++)
            ;
        if (i == sup->nchildren) {
            uv_mutex_unlock(&sup->lock);
            return;
        }
        gone = sup->children[i];
        memmove(&sup->children[i], &sup->children[i + 1],
                (sup->nchildren - i - 1) * sizeof *sup->children);
        sup->nchildren--;
        uv_mutex_unlock(&sup->lock);
        child_drop(&gone);
    }
}

static long child_of(sup_t *sup, moat_pid_t pid) {
    if (pid == 0)
        return -1;
    for (size_t i = 0; i < sup->nchildren; i++)
        if (sup->children[i].pid == pid && !sup->children[i].removed)
            return (long)i;
    return -1;
}

static void set_child(sup_t *sup, size_t i, moat_pid_t pid, int restarting,
                      int removed) {
    uv_mutex_lock(&sup->lock);
    sup->children[i].pid = pid;
    sup->children[i].restarting = restarting;
    sup->children[i].removed |= removed;
    uv_mutex_unlock(&sup->lock);
}

/* Starts child i.  Returns 0, or an error with *reason set. */
static int start_child(sup_t *sup, size_t i, moat_term_t **reason) {
    child_t *c = &sup->children[i];
    moat_pid_t pid = 0;
    int rc;
    *reason = NULL;
    rc = c->start(sup->pool, sup->srv->pid, c->arg, &pid, reason);
    if (rc == 0 && pid != 0) {
        set_child(sup, i, pid, 0, 0);
        return 0;
    }
    if (*reason == NULL) {
        const char *m = moat_strerror(rc != 0 ? rc : MOAT_EINVAL);
        *reason = moat_term_tagged_binary("native_error", m, strlen(m));
        if (*reason == NULL)
            *reason = moat_atom(MOAT_A_ENOMEM);
    }
    return rc != 0 ? rc : MOAT_ESTART;
}

/* {shutdown, {failed_to_start_child, Id, Reason}} */
static moat_term_t *failed_to_start(moat_term_t *id, moat_term_t *reason) {
    ei_x_buff x;
    size_t ilen, rlen;
    const char *i = moat_term_data(id, &ilen), *r = moat_term_data(reason,
                                                                  &rlen);
    if (ei_x_new_with_version(&x) != 0)
        return moat_atom(MOAT_A_ENOMEM);
    if (ei_x_encode_tuple_header(&x, 2) || ei_x_encode_atom(&x, "shutdown") ||
        ei_x_encode_tuple_header(&x, 3) ||
        ei_x_encode_atom(&x, "failed_to_start_child") ||
        ei_x_append_buf(&x, i + 1, (int)ilen - 1) ||
        ei_x_append_buf(&x, r + 1, (int)rlen - 1)) {
        ei_x_free(&x);
        return moat_atom(MOAT_A_ENOMEM);
    }
    return moat_term_from_x(&x);
}

/* ------------------------------------------------------------ operations */

static void advance(sup_t *sup);

static void killer_unref(killer_t *k) {
    if (atomic_fetch_sub(&k->refs, 1) == 1)
        free(k);
}

static void killer_fired(moat__timer_t *t) {
    killer_t *k = MOAT__CONTAINER(t, killer_t, timer);
    moat_proc_exit(k->pool, k->sup, k->victim, moat_atom(MOAT_A_KILL));
    killer_unref(k);
}

static void killer_cancel(sup_t *sup) {
    if (sup->killer == NULL)
        return;
    if (moat__timer_stop(sup->pool, &sup->killer->timer))
        killer_unref(sup->killer);
    killer_unref(sup->killer);
    sup->killer = NULL;
}

/* Begins stopping child i (S6): monitor, unlink, signal, maybe a timer.
 * Returns 1 if a DOWN is now awaited, 0 if there was nothing to stop. */
static int begin_stop(sup_t *sup, size_t i) {
    child_t *c = &sup->children[i];
    moat_pid_t self = sup->srv->pid;
    if (c->pid == 0)
        return 0;
    if (moat_proc_monitor(sup->pool, self, c->pid, &sup->cur_ref) != 0)
        return 0;
    moat_proc_unlink(sup->pool, self, c->pid);
    if (c->shutdown_ms == MOAT_SHUTDOWN_BRUTAL) {
        moat_proc_exit(sup->pool, self, c->pid, moat_atom(MOAT_A_KILL));
        return 1;
    }
    moat_proc_exit(sup->pool, self, c->pid, moat_atom(MOAT_A_SHUTDOWN));
    if (c->shutdown_ms >= 0) {
        killer_t *k = malloc(sizeof *k);
        if (k == NULL) {
            /* No timer: kill now rather than risk waiting forever. */
            moat_proc_exit(sup->pool, self, c->pid, moat_atom(MOAT_A_KILL));
            return 1;
        }
        k->pool = sup->pool;
        k->sup = self;
        k->victim = c->pid;
        k->timer.idx = -1;
        k->timer.cb = killer_fired;
        atomic_init(&k->refs, 2);
        sup->killer = k;
        moat__timer_start(sup->pool, &k->timer, c->shutdown_ms);
    }
    return 1;
}

/* Starts an operation: stop these children in order, then `then`. */
static void begin_op(sup_t *sup, size_t *stops, size_t n, int then,
                     moat_term_t *reason, int escalate) {
    sup->op_active = 1;
    free(sup->stops);
    sup->stops = stops;
    sup->nstops = n;
    sup->istop = 0;
    sup->then = then;
    sup->exit_reason = reason != NULL ? moat_term_ref(reason) : NULL;
    sup->escalate = escalate;
    advance(sup);
}

/* Indices of running children in [from, to), last first, except skip. */
static size_t *running_reversed(sup_t *sup, size_t from, size_t to,
                                long skip, size_t *n) {
    size_t *v = malloc((to > from ? to - from : 1) * sizeof *v);
    *n = 0;
    if (v == NULL)
        return NULL;
    for (size_t i = to; i > from; i--)
        if ((long)(i - 1) != skip && sup->children[i - 1].pid != 0 &&
            !sup->children[i - 1].removed)
            v[(*n)++] = i - 1;
    return v;
}

/* Queues a note to retry the restart of the child `uid` (OTP's
 * try_again_restart): each retry counts as a restart. */
static void post_try_again(sup_t *sup, uint64_t uid) {
    moat_msg_t *m = moat__msg_new(MOAT_MSG_SYS);
    if (m != NULL) {
        m->ref = uid;
        if (moat__proc_post(sup->pool, sup->srv->pid, m, 0) == 0)
            return;
        moat_msg_free(m);
    }
    /* Without the note the child would never come back. */
    sup->exited = 1;
    moat__proc_server_exit(sup->srv, moat_atom(MOAT_A_ENOMEM));
}

/* Starts child i again.  On a failure it stays restarting and a retry
 * is queued; returns 0 then, 1 on success. */
static int start_one(sup_t *sup, size_t i) {
    moat_term_t *reason;
    if (start_child(sup, i, &reason) != 0) {
        moat_term_unref(reason);
        post_try_again(sup, sup->children[i].uid);
        return 0;
    }
    atomic_fetch_add(&sup->pool->n_restarts, 1);
    return 1;
}

/* Starts every restarting child in order; on a failure the rest stay
 * restarting and the failed one is retried. */
static void start_restarting(sup_t *sup) {
    for (size_t i = 0; i < sup->nchildren; i++)
        if (sup->children[i].restarting && !sup->children[i].removed &&
            !start_one(sup, i))
            return;
}

static void finish_op(sup_t *sup) {
    moat_term_t *reason = sup->exit_reason;
    sup->op_active = 0;
    sup->exit_reason = NULL;
    compact(sup);
    if (sup->then == THEN_EXIT) {
        sup->exited = 1;
        /* Escalate only for a supervisor still alive (not one killed
         * meanwhile): giving up is its own decision. */
        if (sup->escalate && sup->opts.escalate != NULL &&
            moat_proc_alive(sup->pool, sup->srv->pid))
            sup->opts.escalate(sup->srv->pid, reason, sup->opts.data);
        moat__proc_server_exit(sup->srv, reason);
    } else {
        start_restarting(sup);
    }
    moat_term_unref(reason);
}

/* Stops the next child of the operation, or finishes it. */
static void advance(sup_t *sup) {
    while (sup->istop < sup->nstops) {
        if (begin_stop(sup, sup->stops[sup->istop]))
            return; /* wait for its DOWN */
        sup->istop++;
    }
    finish_op(sup);
}

/* The DOWN of the child being stopped arrived. */
static void stop_done(sup_t *sup) {
    size_t i = sup->stops[sup->istop++];
    child_t *c = &sup->children[i];
    killer_cancel(sup);
    /* S5: temporary children stopped by their siblings' restart go. */
    set_child(sup, i, 0, c->restarting, c->restart == MOAT_TEMPORARY);
}

/* Stops every running child, last first, then exits with reason. */
static void shut_down(sup_t *sup, moat_term_t *reason, int escalate) {
    size_t n, *v = running_reversed(sup, 0, sup->nchildren, -1, &n);
    begin_op(sup, v, v != NULL ? n : 0, THEN_EXIT, reason, escalate);
}

/* Child i ended and children [from, to), i among them, are to restart:
 * marked in one lock section, so that which_children sees the whole
 * decision or none of it (OTP's supervisor answers it between messages
 * only). */
static void mark_restarting(sup_t *sup, size_t i, size_t from, size_t to) {
    uv_mutex_lock(&sup->lock);
    sup->children[i].pid = 0;
    for (size_t j = from; j < to; j++)
        sup->children[j].restarting = 1;
    uv_mutex_unlock(&sup->lock);
}

/* A restart of child i is due (S3 decided it). */
static void restart(sup_t *sup, size_t i) {
    size_t n, *v;
    if (add_restart(sup)) {
        /* Giving up: from now on every child shows `restarting` (the
         * restart that escalating asks of the tree above), also while
         * they are being stopped. */
        mark_restarting(sup, i, 0, sup->nchildren);
        shut_down(sup, moat_atom(MOAT_A_SHUTDOWN), 1);
        return;
    }
    switch (sup->opts.strategy) {
    case MOAT_ONE_FOR_ALL:
        mark_restarting(sup, i, 0, sup->nchildren);
        v = running_reversed(sup, 0, sup->nchildren, (long)i, &n);
        begin_op(sup, v, v != NULL ? n : 0, THEN_START, NULL, 0);
        break;
    case MOAT_REST_FOR_ONE:
        mark_restarting(sup, i, i, sup->nchildren);
        v = running_reversed(sup, i + 1, sup->nchildren, -1, &n);
        begin_op(sup, v, v != NULL ? n : 0, THEN_START, NULL, 0);
        break;
    default:
        mark_restarting(sup, i, i, i + 1);
        start_one(sup, i);
        break;
    }
}

/* Child i ended on its own with reason (S3). */
static void child_exited(sup_t *sup, size_t i, moat_term_t *reason) {
    child_t *c = &sup->children[i];
    if (sup->opts.child_crashed != NULL && moat_term_is_abnormal(reason))
        sup->opts.child_crashed(sup->srv->pid, c->id, reason, sup->opts.data);
    if (c->restart == MOAT_TEMPORARY) {
        set_child(sup, i, 0, 0, 1);
        compact(sup);
    } else if (c->restart == MOAT_TRANSIENT &&
               !moat_term_is_abnormal(reason)) {
        set_child(sup, i, 0, 0, 0);
    } else {
        restart(sup, i);
    }
}

static void dispatch(sup_t *sup, moat_msg_t *m) {
    long i;
    switch (m->kind) {
    case MOAT_MSG_EXIT:
        if ((i = child_of(sup, m->from)) >= 0)
            child_exited(sup, (size_t)i, m->term);
        else if (m->from == sup->parent || m->from == 0)
            shut_down(sup, m->term, 0);
        /* else: a stale EXIT of a child already replaced */
        break;
    case MOAT_MSG_SYS: /* a retry note (ref 0: the failed-start kick) */
        for (size_t j = 0; m->ref != 0 && j < sup->nchildren; j++) {
            if (sup->children[j].uid == m->ref) {
                if (sup->children[j].restarting && !sup->children[j].removed)
                    restart(sup, j);
                break;
            }
        }
        break;
    default:
        break; /* DOWNs of monitors already done with */
    }
    moat_msg_free(m);
}

static void sup_info(moat__server_t *s, moat_msg_t *m) {
    sup_t *sup = s->state;
    if (sup->exited) {
        moat_msg_free(m); /* its end is on its way */
        return;
    }
    if (sup->start_failure != NULL && !sup->op_active) {
        /* S2 comes first: before any EXIT of a child that died during
         * the failed start is taken for a crash to restart. */
        moat_term_t *r = sup->start_failure;
        sup->start_failure = NULL;
        shut_down(sup, r, 0);
        moat_term_unref(r);
    }
    if (sup->exited) {
        moat_msg_free(m);
        return;
    }
    if (!sup->op_active) {
        dispatch(sup, m);
    } else if (m->kind == MOAT_MSG_DOWN && m->ref == sup->cur_ref) {
        moat_msg_free(m);
        stop_done(sup);
        advance(sup);
    } else {
        m->next = NULL;
        *sup->deferred_tail = m;
        sup->deferred_tail = &m->next;
        return;
    }
    /* Replay what waited, in order, until another operation starts. */
    while (!sup->op_active && !sup->exited && sup->deferred != NULL) {
        moat_msg_t *d = sup->deferred;
        sup->deferred = d->next;
        if (sup->deferred == NULL)
            sup->deferred_tail = &sup->deferred;
        dispatch(sup, d);
    }
}

static void sup_free(sup_t *sup) {
    moat_msg_t *m = sup->deferred;
    killer_cancel(sup);
    for (size_t i = 0; i < sup->nchildren; i++)
        child_drop(&sup->children[i]);
    while (m != NULL) {
        moat_msg_t *next = m->next;
        moat_msg_free(m);
        m = next;
    }
    moat_term_unref(sup->exit_reason);
    moat_term_unref(sup->start_failure);
    free(sup->children);
    free(sup->stops);
    free(sup->win);
    uv_mutex_destroy(&sup->lock);
    free(sup);
}

/* The supervisor's end.  Its children are linked to it, so any still
 * running (after a `kill` of the supervisor) get its exit signal. */
static void sup_finish(moat__server_t *s, moat_term_t *reason) {
    (void)reason;
    sup_free(s->state);
}

/* Starts the children in order (S2), before the supervisor can run.  On
 * a failure it stops there: the supervisor's first message then stops
 * those started, in reverse order, and it exits; *arg gets the reason. */
static moat_term_t *sup_init(moat__server_t *s, void *arg) {
    sup_t *sup = s->state;
    moat_term_t **failure = arg;
    sup->srv = s;
    for (size_t i = 0; i < sup->nchildren; i++) {
        moat_term_t *reason;
        if (start_child(sup, i, &reason) != 0) {
            sup->start_failure =
                failed_to_start(sup->children[i].id, reason);
            *failure = moat_term_ref(sup->start_failure);
            moat_term_unref(reason);
            return NULL;
        }
    }
    /* Linked while still unpublished: a parent already dead arrives as
     * an EXIT (it traps), which stops it like the parent's exit would. */
    if (sup->parent != 0 &&
        moat_proc_link(sup->pool, s->pid, sup->parent) == -ENOMEM) {
        sup->start_failure = moat_atom(MOAT_A_ENOMEM);
        *failure = moat_atom(MOAT_A_ENOMEM);
    }
    return NULL;
}

static int check_specs(const moat_sup_opts_t *o, const moat_child_spec_t *sp,
                       size_t n) {
    if (o->intensity < 0 || o->period < 1 || o->strategy < MOAT_ONE_FOR_ONE ||
        o->strategy > MOAT_REST_FOR_ONE)
        return MOAT_EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (sp[i].id == NULL || sp[i].start == NULL ||
            sp[i].restart < MOAT_PERMANENT || sp[i].restart > MOAT_TEMPORARY ||
            sp[i].shutdown_ms < MOAT_SHUTDOWN_INFINITY ||
            (sp[i].type != MOAT_WORKER && sp[i].type != MOAT_SUPERVISOR))
            return MOAT_EINVAL;
        for (size_t j = 0; j < i; j++)
            if (moat_term_equal(sp[i].id, sp[j].id))
                return MOAT_EEXISTS;
    }
    return 0;
}

int moat_sup_start(moat_pool_t *pool, moat_pid_t parent,
                   const moat_sup_opts_t *opts, const moat_child_spec_t *specs,
                   size_t n, moat_pid_t *pid, moat_term_t **reason) {
    moat__server_t *s;
    sup_t *sup;
    moat_pid_t self;
    moat_term_t *failure = NULL;
    int rc;
    if (pool == NULL || opts == NULL || (n > 0 && specs == NULL) ||
        pid == NULL || reason == NULL)
        return MOAT_EINVAL;
    if ((rc = check_specs(opts, specs, n)) != 0)
        return rc;
    *reason = NULL;
    sup = calloc(1, sizeof *sup);
    if (sup != NULL &&
        (sup->children = calloc(n > 0 ? n : 1, sizeof *sup->children)) != NULL &&
        uv_mutex_init(&sup->lock) != 0) {
        free(sup->children);
        sup->children = NULL;
    }
    if (sup == NULL || sup->children == NULL) {
        /* The args are ours from here on, as on every later failure. */
        for (size_t i = 0; i < n; i++)
            if (specs[i].arg_free != NULL)
                specs[i].arg_free(specs[i].arg);
        free(sup);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        child_t *c = &sup->children[i];
        c->id = moat_term_ref(specs[i].id);
        c->start = specs[i].start;
        c->arg = specs[i].arg;
        c->arg_free = specs[i].arg_free;
        c->restart = specs[i].restart;
        c->shutdown_ms = specs[i].shutdown_ms;
        c->type = specs[i].type;
        c->uid = i + 1;
    }
    sup->nchildren = n;
    sup->pool = pool;
    sup->opts = *opts;
    sup->parent = parent;
    sup->deferred_tail = &sup->deferred;
    if ((s = moat__server_alloc(pool)) == NULL) {
        sup_free(sup);
        return -ENOMEM;
    }
    s->state = sup;
    s->info = sup_info;
    s->finish = sup_finish;
    /* The supervisor process is made before its children start (they
     * link to it); it cannot fail its own init. */
    rc = moat__server_launch(s, 0, 0, sup_init, &failure, &self, reason);
    if (rc != 0) {
        moat_term_unref(failure);
        return rc; /* launch freed s, and finish freed sup */
    }
    /* s (and sup) may be freed from here on: only the pid is used. */
    *pid = self;
    if (failure != NULL) {
        moat_msg_t *kick = moat__msg_new(MOAT_MSG_SYS);
        *reason = failure;
        /* Its first message makes it stop the started children in
         * reverse order and exit with the reason. */
        if (kick == NULL || moat__proc_post(pool, self, kick, 0) != 0) {
            moat_msg_free(kick);
            moat_proc_exit(pool, 0, self, moat_atom(MOAT_A_KILL));
        }
        return MOAT_ESTART;
    }
    return 0;
}

/* ---------------------------------------------------------- inspection */

typedef struct which_arg_s {
    int list;               /* make `out` */
    moat_child_info_t *out; /* NULL when out of memory */
    moat_child_counts_t *counts;
} which_arg_t;

static int which_locked(moat__server_t *s, void *arg) {
    which_arg_t *a = arg;
    sup_t *sup;
    int n = 0;
    if (s->info != sup_info)
        return MOAT_EINVAL;
    sup = s->state;
    uv_mutex_lock(&sup->lock);
    if (a->list &&
        (a->out = malloc((sup->nchildren > 0 ? sup->nchildren : 1) *
                         sizeof *a->out)) == NULL) {
        uv_mutex_unlock(&sup->lock);
        return -ENOMEM;
    }
    if (a->counts != NULL)
        memset(a->counts, 0, sizeof *a->counts);
    for (size_t i = 0; i < sup->nchildren; i++) {
        child_t *c = &sup->children[i];
        if (c->removed)
            continue;
        if (a->list) {
            moat_child_info_t *ci = &a->out[n];
            ci->id = moat_term_ref(c->id);
            ci->type = c->type;
            ci->state = c->restarting   ? MOAT_CHILD_RESTARTING
                        : c->pid != 0 ? MOAT_CHILD_RUNNING
                                      : MOAT_CHILD_UNDEFINED;
            ci->pid = ci->state == MOAT_CHILD_RUNNING ? c->pid : 0;
        }
        if (a->counts != NULL) {
            a->counts->specs++;
            a->counts->active += c->pid != 0 && !c->restarting;
            a->counts->supervisors += c->type == MOAT_SUPERVISOR;
            a->counts->workers += c->type == MOAT_WORKER;
        }
        n++;
    }
    uv_mutex_unlock(&sup->lock);
    return n;
}

int moat_sup_which_children(moat_pool_t *pool, moat_pid_t sup,
                            moat_child_info_t **out) {
    which_arg_t a = {1, NULL, NULL};
    int rc = moat__proc_with_server(pool, sup, which_locked, &a);
    if (rc < 0)
        return rc == MOAT_EINVAL ? MOAT_ENOPROC : rc;
    *out = a.out;
    return rc;
}

void moat_sup_children_free(moat_child_info_t *children, int n) {
    for (int i = 0; i < n; i++)
        moat_term_unref(children[i].id);
    free(children);
}

int moat_sup_count_children(moat_pool_t *pool, moat_pid_t sup,
                            moat_child_counts_t *counts) {
    which_arg_t a = {0, NULL, counts};
    int rc = moat__proc_with_server(pool, sup, which_locked, &a);
    if (rc < 0)
        return rc == MOAT_EINVAL ? MOAT_ENOPROC : rc;
    return 0;
}

typedef struct child_arg_s {
    const moat_term_t *id;
    moat_pid_t pid;
} child_arg_t;

static int child_locked(moat__server_t *s, void *arg) {
    child_arg_t *a = arg;
    sup_t *sup;
    if (s->info != sup_info)
        return MOAT_EINVAL;
    sup = s->state;
    uv_mutex_lock(&sup->lock);
    for (size_t i = 0; i < sup->nchildren; i++) {
        child_t *c = &sup->children[i];
        /* The id a caller kept from the spec is the same term: most
         * look-ups end at the pointer compare. */
        if (!c->removed && (c->id == a->id || moat_term_equal(c->id, a->id))) {
            a->pid = c->restarting ? 0 : c->pid;
            break;
        }
    }
    uv_mutex_unlock(&sup->lock);
    return 0;
}

int moat_sup_child_pid(moat_pool_t *pool, moat_pid_t sup,
                       const moat_term_t *id, moat_pid_t *pid) {
    child_arg_t a = {id, 0};
    int rc;
    if (id == NULL || pid == NULL)
        return MOAT_EINVAL;
    rc = moat__proc_with_server(pool, sup, child_locked, &a);
    if (rc < 0)
        return rc == MOAT_EINVAL ? MOAT_ENOPROC : rc;
    *pid = a.pid;
    return a.pid != 0 ? 0 : MOAT_ENOPROC;
}
