/*
 * proc.c: native processes and their signals (REFERENCE.md §1).
 *
 * DESIGN
 *
 * One lock per pool, sig_lock, guards the process table and every
 * process's links, monitors, trap flag and mailbox.  Signal operations are
 * short and rare next to task submission (plain tasks never touch this
 * file), and one lock makes the BEAM's atomicity rules easy to keep exact:
 * spawn_link links before the child can run, a link to a process that is
 * exiting gives noproc, and an exit cascades along links to a fixed point
 * inside one critical section.
 *
 * Ids are slot index (low 32 bits, plus one so 0 is never an id) and slot
 * generation (high 32 bits); a slot's generation moves on when its process
 * is freed, so a stale id finds nothing.  A process is freed as soon as it
 * dies; threads keep ids, never pointers, across unlocks.
 *
 * Delivery never allocates: each link end and each monitor carries the
 * message it will deliver, allocated when the link or monitor is made, so
 * an exit cascade cannot fail half-way for want of memory.
 *
 * A dying task process cannot be stopped on its thread: its task is ended
 * with the reason (outcome first, body abandoned) after sig_lock is
 * released, because ending calls back into the transport.
 *
 * A server is scheduled (put on the pool's sysq) when a message reaches
 * its empty, idle mailbox.  A signal that would kill it becomes a stop
 * request in its mailbox instead (server.c runs terminate, then exits it),
 * except `kill`; when it dies, its mailbox is handed to server.c, which
 * ends the calls left in it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { KIND_EXTERNAL = 1, KIND_TASK = 2, KIND_SERVER = 3 };

typedef struct link_s {
    moat_pid_t other;
    moat_msg_t *msg; /* the EXIT this end receives if `other` dies */
} link_t;

typedef struct mon_s {
    uint64_t ref;
    moat_pid_t other;
    moat_msg_t *msg; /* watcher side: the DOWN it will receive */
} mon_t;

struct moat__proc_s {
    moat_pid_t pid;
    int kind;
    int alive;
    int trap;
    moat_task_t *task;    /* KIND_TASK */
    moat__server_t *srv; /* KIND_SERVER */
    link_t *links;
    unsigned nlinks, caplinks;
    mon_t *mons; /* monitors this process holds */
    unsigned nmons, capmons;
    mon_t *watchers; /* monitors held on this process */
    unsigned nwatchers, capwatchers;
    moat_msg_t *head;
    moat_msg_t **tail;
    uv_cond_t *waiter; /* a thread in moat_receive */
    moat__proc_t *next_dying;
    moat_term_t *reason; /* while dying */
};

/* What a critical section leaves to do after sig_lock is released. */
typedef struct after_s {
    moat__proc_t *dying; /* stack of processes to finish dying */
    moat_task_t *tasks;  /* tasks to end, chained through end_next */
} after_t;

/* ---------------------------------------------------------------- table */

static uint32_t slot_of(moat_pid_t pid) { return (uint32_t)pid - 1; }

/* The live process with this id, or NULL.  sig_lock held. */
static moat__proc_t *lookup(moat_pool_t *pool, moat_pid_t pid) {
    uint32_t i = slot_of(pid);
    moat__slot_t *s;
    if (pid == 0 || i >= pool->nslots)
        return NULL;
    s = &pool->slots[i];
    if (s->gen != (uint32_t)(pid >> 32) || s->proc == NULL || !s->proc->alive)
        return NULL;
    return s->proc;
}

/* Freed processes wait in pool->proc_cache (linked through next_dying,
 * at most PROC_CACHE_MAX) for reuse, with their link and monitor arrays
 * when those are small: a restart frees one process and makes one, and
 * each would otherwise cost two allocations and two frees.  Sanitizer
 * builds free them, so that ASan and TSan see each one's real lifetime. */
#define PROC_CACHE_MAX 64
#define PROC_CACHE_CAP 8 /* larger arrays are freed, not kept */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PROC_RECYCLE 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PROC_RECYCLE 0
#endif
#endif
#ifndef PROC_RECYCLE
#define PROC_RECYCLE 1
#endif

/* A cleared process, from the cache or malloc.  sig_lock held. */
static moat__proc_t *proc_alloc(moat_pool_t *pool, int kind) {
    moat__proc_t *p = pool->proc_cache;
    if (p != NULL) {
        moat__proc_t keep = *p;
        pool->proc_cache = p->next_dying;
        pool->nproc_cache--;
        *p = (moat__proc_t){.kind = kind,
                            .links = keep.links,
                            .caplinks = keep.caplinks,
                            .mons = keep.mons,
                            .capmons = keep.capmons,
                            .watchers = keep.watchers,
                            .capwatchers = keep.capwatchers};
        return p;
    }
    p = malloc(sizeof *p); /* not calloc: see moat__msg_new */
    if (p != NULL)
        *p = (moat__proc_t){.kind = kind};
    return p;
}

/* Frees an array of the process unless it is small enough to keep. */
static void *keep_small(void *v, unsigned *cap) {
    if (*cap <= PROC_CACHE_CAP)
        return v;
    free(v);
    *cap = 0;
    return NULL;
}

/* Gives back a process whose arrays hold no messages any more.  sig_lock
 * held. */
static void proc_release(moat_pool_t *pool, moat__proc_t *p) {
    if (PROC_RECYCLE && pool->nproc_cache < PROC_CACHE_MAX) {
        p->links = keep_small(p->links, &p->caplinks);
        p->mons = keep_small(p->mons, &p->capmons);
        p->watchers = keep_small(p->watchers, &p->capwatchers);
        p->next_dying = pool->proc_cache;
        pool->proc_cache = p;
        pool->nproc_cache++;
        return;
    }
    free(p->links);
    free(p->mons);
    free(p->watchers);
    free(p);
}

static moat__proc_t *proc_new(moat_pool_t *pool, int kind) {
    moat__proc_t *p = proc_alloc(pool, kind);
    uint32_t i;
    if (p == NULL)
        return NULL;
    if (pool->nfree > 0) {
        i = pool->free_slots[--pool->nfree];
    } else {
        if (pool->nslots == pool->capslots) {
            unsigned cap = pool->capslots ? pool->capslots * 2 : 64;
            moat__slot_t *s = realloc(pool->slots, cap * sizeof *s);
            uint32_t *f;
            if (s == NULL) {
                proc_release(pool, p);
                return NULL;
            }
            pool->slots = s;
            f = realloc(pool->free_slots, cap * sizeof *f);
            if (f == NULL) {
                proc_release(pool, p);
                return NULL;
            }
            pool->free_slots = f;
            pool->capslots = cap;
        }
        i = pool->nslots++;
        pool->slots[i].gen = 1;
    }
    pool->slots[i].proc = p;
    p->pid = ((uint64_t)pool->slots[i].gen << 32) | (uint64_t)(i + 1);
    p->kind = kind;
    p->alive = 1;
    p->tail = &p->head;
    return p;
}

static void proc_free(moat_pool_t *pool, moat__proc_t *p) {
    uint32_t i = slot_of(p->pid);
    moat_msg_t *m = p->head;
    while (m != NULL) {
        moat_msg_t *next = m->next;
        moat_msg_free(m);
        m = next;
    }
    pool->slots[i].proc = NULL;
    /* A generation that wrapped would make old ids valid again: retire
     * the slot instead (after 4 billion processes in it). */
    if (++pool->slots[i].gen != 0)
        pool->free_slots[pool->nfree++] = i;
    proc_release(pool, p);
}

/* ------------------------------------------------------------- messages */

moat_msg_t *moat__msg_new(moat_msg_kind_t kind) {
    /* malloc and a compound literal, not calloc (nor memset, which GCC
     * turns into calloc): glibc's calloc skips the per-thread cache that
     * serves malloc, and a restart makes four messages, one process and
     * one server. */
    moat_msg_t *m = malloc(sizeof *m);
    if (m != NULL)
        *m = (moat_msg_t){.kind = kind};
    return m;
}

void moat_msg_free(moat_msg_t *msg) {
    if (msg == NULL)
        return;
    moat_term_unref(msg->term);
    free(msg);
}

/* Schedules an idle server.  sig_lock held. */
static void wake_server(moat_pool_t *pool, moat__server_t *srv) {
    if (!srv->scheduled) {
        srv->scheduled = 1;
        moat__pool_ready_sys(pool, &srv->item, 0);
    }
}

static void enqueue(moat_pool_t *pool, moat__proc_t *p, moat_msg_t *m) {
    m->next = NULL;
    *p->tail = m;
    p->tail = &m->next;
    if (p->waiter != NULL)
        uv_cond_signal(p->waiter);
    if (p->srv != NULL)
        wake_server(pool, p->srv);
}

/* Removes the first DOWN with this ref from the mailbox.  Returns 1 if
 * one was there. */
static int flush_down(moat__proc_t *p, uint64_t ref) {
    for (moat_msg_t **mp = &p->head; *mp != NULL; mp = &(*mp)->next) {
        moat_msg_t *m = *mp;
        if (m->kind == MOAT_MSG_DOWN && m->ref == ref) {
            *mp = m->next;
            if (p->tail == &m->next)
                p->tail = mp;
            moat_msg_free(m);
            return 1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- arrays */

static int grow(void **v, unsigned *cap, unsigned n, size_t size) {
    unsigned c;
    void *nv;
    if (n < *cap)
        return 0;
    c = *cap ? *cap * 2 : 4;
    nv = realloc(*v, c * size);
    if (nv == NULL)
        return -ENOMEM;
    *v = nv;
    *cap = c;
    return 0;
}

static int link_index(moat__proc_t *p, moat_pid_t other) {
    for (unsigned i = 0; i < p->nlinks; i++)
        if (p->links[i].other == other)
            return (int)i;
    return -1;
}

/* Removes and returns the link end toward `other`; msg NULL if none. */
static link_t link_take(moat__proc_t *p, moat_pid_t other) {
    link_t l = {0, NULL};
    int i = link_index(p, other);
    if (i >= 0) {
        l = p->links[i];
        p->links[i] = p->links[--p->nlinks];
    }
    return l;
}

static mon_t mon_take(mon_t *v, unsigned *n, uint64_t ref) {
    mon_t m = {0, 0, NULL};
    for (unsigned i = 0; i < *n; i++) {
        if (v[i].ref == ref) {
            m = v[i];
            v[i] = v[--*n];
            break;
        }
    }
    return m;
}

/* ------------------------------------------------------------ exiting */

/* Marks p as dying with `reason`; the work happens in finish_dying. */
static void start_dying(after_t *a, moat__proc_t *p, moat_term_t *reason) {
    p->alive = 0;
    p->reason = moat_term_ref(reason);
    p->next_dying = a->dying;
    a->dying = p;
}

/* A signal ends q with `reason`: a process dies now, a native server gets
 * its stop request (once). */
static void end_with(moat_pool_t *pool, after_t *a, moat__proc_t *q,
                     moat_pid_t from, moat_term_t *reason) {
    moat_msg_t *m;
    if (q->srv == NULL || q->srv->def == NULL) {
        start_dying(a, q, reason);
    } else if ((m = q->srv->stop_msg) != NULL) {
        q->srv->stop_msg = NULL;
        m->kind = MOAT_MSG_EXIT;
        m->from = from;
        m->term = moat_term_ref(reason);
        enqueue(pool, q, m);
    }
}

/* A link signal from `from` (dying with `reason`) reaches q (E3, E4). */
static void link_signal(moat_pool_t *pool, after_t *a, moat__proc_t *q,
                        moat_pid_t from, moat_term_t *reason, moat_msg_t *m) {
    if (q->trap) {
        m->from = from;
        m->term = moat_term_ref(reason);
        enqueue(pool, q, m);
        return;
    }
    moat_msg_free(m);
    if (!moat_term_is(reason, MOAT_A_NORMAL))
        end_with(pool, a, q, from, reason);
}

/* Queues a claimed task for moat__task_settle after the unlock. */
static void settle_later(after_t *a, moat_task_t *t, moat_term_t *reason) {
    atomic_fetch_add(&t->refs, 1);
    t->end_reason = moat_term_ref(reason);
    t->end_next = a->tasks;
    a->tasks = t;
}

/* Delivers every exit of the dying stack, to a fixed point. */
static void finish_dying(moat_pool_t *pool, after_t *a) {
    while (a->dying != NULL) {
        moat__proc_t *d = a->dying;
        moat_term_t *reason = d->reason;
        a->dying = d->next_dying;
        for (unsigned i = 0; i < d->nlinks; i++) {
            moat__proc_t *q = lookup(pool, d->links[i].other);
            moat_msg_free(d->links[i].msg);
            if (q != NULL) {
                link_t l = link_take(q, d->pid);
                if (l.msg != NULL)
                    link_signal(pool, a, q, d->pid, reason, l.msg);
            }
        }
        d->nlinks = 0;
        for (unsigned i = 0; i < d->nwatchers; i++) {
            moat__proc_t *q = lookup(pool, d->watchers[i].other);
            if (q != NULL) {
                mon_t m = mon_take(q->mons, &q->nmons, d->watchers[i].ref);
                if (m.msg != NULL) {
                    m.msg->from = d->pid;
                    m.msg->term = moat_term_ref(reason);
                    enqueue(pool, q, m.msg);
                }
            }
        }
        for (unsigned i = 0; i < d->nmons; i++) {
            moat__proc_t *q = lookup(pool, d->mons[i].other);
            moat_msg_free(d->mons[i].msg);
            if (q != NULL)
                mon_take(q->watchers, &q->nwatchers, d->mons[i].ref);
        }
        d->nmons = 0;
        if (d->waiter != NULL)
            uv_cond_signal(d->waiter);
        if (d->srv != NULL) {
            moat__server_t *srv = d->srv;
            moat_task_t *c = srv->current;
            int open = MOAT__OPEN;
            /* The call in progress: its caller sees the reason, as a
             * monitor would, and the reply that follows loses. */
            if (c != NULL && atomic_compare_exchange_strong(
                                 &c->claim, &open, MOAT__CLAIMED))
                settle_later(a, c, reason);
            srv->dead = 1;
            atomic_store(&srv->stopping, 1); /* moat_should_stop */
            srv->reason = moat_term_ref(reason);
            srv->leftover = d->head;
            d->head = NULL;
            d->tail = &d->head;
            wake_server(pool, srv);
        }
        if (d->kind == KIND_TASK && !d->task->proc_done) {
            /* Killed by a signal: its task's outcome is this reason, if
             * nobody had decided it (who would have ended us too). */
            moat_task_t *t = d->task;
            int open = MOAT__OPEN;
            t->proc_done = 1;
            if (atomic_compare_exchange_strong(&t->claim, &open,
                                               MOAT__CLAIMED))
                settle_later(a, t, reason);
        }
        moat_term_unref(reason);
        proc_free(pool, d);
    }
}

/* Unlocks sig_lock after finishing every exit, then settles the tasks
 * whose processes died (outside the lock: that calls the transport). */
static void unlock_after(moat_pool_t *pool, after_t *a) {
    moat_task_t *t;
    finish_dying(pool, a);
    t = a->tasks;
    a->tasks = NULL;
    uv_mutex_unlock(&pool->sig_lock);
    while (t != NULL) {
        moat_task_t *next = t->end_next;
        moat_term_t *reason = t->end_reason;
        t->end_reason = NULL;
        moat__task_settle(t, reason, 0);
        moat_term_unref(reason);
        moat__task_unref(t);
        t = next;
    }
}

/* ------------------------------------------------------------ public API */

int moat__proc_table_init(moat_pool_t *pool) {
    return uv_mutex_init(&pool->sig_lock);
}

void moat__proc_shutdown_all(moat_pool_t *pool) {
    after_t a = {NULL, NULL};
    uv_mutex_lock(&pool->sig_lock);
    for (unsigned i = 0; i < pool->nslots; i++) {
        moat__proc_t *p = pool->slots[i].proc;
        if (p != NULL && p->alive)
            start_dying(&a, p, moat_atom(MOAT_A_SHUTDOWN));
    }
    unlock_after(pool, &a);
}

void moat__proc_table_free(moat_pool_t *pool) {
    moat__proc_shutdown_all(pool);
    while (pool->proc_cache != NULL) {
        moat__proc_t *p = pool->proc_cache;
        pool->proc_cache = p->next_dying;
        free(p->links);
        free(p->mons);
        free(p->watchers);
        free(p);
    }
    free(pool->slots);
    free(pool->free_slots);
    uv_mutex_destroy(&pool->sig_lock);
}

int moat_proc_open(moat_pool_t *pool, moat_pid_t *pid) {
    moat__proc_t *p;
    uv_mutex_lock(&pool->sig_lock);
    /* Checked under the lock that stop's shutdown_all takes after setting
     * `stopping`: no process outlives the stop. */
    if (atomic_load(&pool->stopping)) {
        uv_mutex_unlock(&pool->sig_lock);
        return MOAT_ECLOSED;
    }
    p = proc_new(pool, KIND_EXTERNAL);
    if (p != NULL)
        *pid = p->pid;
    uv_mutex_unlock(&pool->sig_lock);
    return p != NULL ? 0 : -ENOMEM;
}

int moat_proc_close(moat_pool_t *pool, moat_pid_t self, moat_term_t *reason) {
    after_t a = {NULL, NULL};
    moat__proc_t *p;
    uv_mutex_lock(&pool->sig_lock);
    p = lookup(pool, self);
    if (p != NULL)
        start_dying(&a, p, reason);
    unlock_after(pool, &a);
    return p != NULL ? 0 : MOAT_EDEAD;
}

int moat_proc_alive(moat_pool_t *pool, moat_pid_t pid) {
    int alive;
    uv_mutex_lock(&pool->sig_lock);
    alive = lookup(pool, pid) != NULL;
    uv_mutex_unlock(&pool->sig_lock);
    return alive;
}

int moat_proc_receive(moat_pool_t *pool, moat_pid_t self, int timeout_ms,
                 moat_msg_t **msg) {
    uint64_t deadline = 0;
    moat__proc_t *p;
    uv_cond_t cond;
    int rc = 0, cond_ready = 0;
    if (timeout_ms > 0)
        deadline = uv_hrtime() + (uint64_t)timeout_ms * 1000000u;
    uv_mutex_lock(&pool->sig_lock);
    for (;;) {
        p = lookup(pool, self);
        if (p == NULL) {
            rc = MOAT_EDEAD;
            break;
        }
        if (p->kind == KIND_SERVER ||
            (p->waiter != NULL && (!cond_ready || p->waiter != &cond))) {
            /* A server's messages go to its callbacks; and a process has
             * one receiver at a time, as on the BEAM. */
            rc = MOAT_EINVAL;
            break;
        }
        p->waiter = NULL;
        if (p->head != NULL) {
            *msg = p->head;
            p->head = p->head->next;
            if (p->head == NULL)
                p->tail = &p->head;
            (*msg)->next = NULL;
            break;
        }
        if (timeout_ms == 0) {
            rc = MOAT_ETIMEDOUT;
            break;
        }
        if (!cond_ready) {
            if ((rc = uv_cond_init(&cond)) != 0)
                break;
            cond_ready = 1;
        }
        p->waiter = &cond;
        if (timeout_ms < 0) {
            uv_cond_wait(&cond, &pool->sig_lock);
        } else {
            uint64_t now = uv_hrtime();
            if (now >= deadline ||
                uv_cond_timedwait(&cond, &pool->sig_lock, deadline - now) ==
                    UV_ETIMEDOUT) {
                /* One last look, so a message that raced the timeout is
                 * not left for a later receive to find late. */
                timeout_ms = 0;
            }
        }
    }
    uv_mutex_unlock(&pool->sig_lock);
    if (cond_ready)
        uv_cond_destroy(&cond);
    return rc;
}

int moat_proc_link(moat_pool_t *pool, moat_pid_t self, moat_pid_t other) {
    moat__proc_t *s, *o;
    moat_msg_t *ms = NULL, *mo = NULL;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    s = lookup(pool, self);
    if (s == NULL) {
        rc = MOAT_EDEAD;
        goto out;
    }
    if (other == self || link_index(s, other) >= 0)
        goto out;
    o = lookup(pool, other);
    if (o == NULL) {
        /* E1: noproc raised, or an EXIT for a trapping caller. */
        if (!s->trap) {
            rc = MOAT_ENOPROC;
        } else if ((ms = moat__msg_new(MOAT_MSG_EXIT)) == NULL) {
            rc = -ENOMEM;
        } else {
            ms->from = other;
            ms->term = moat_atom(MOAT_A_NOPROC);
            enqueue(pool, s, ms);
        }
        goto out;
    }
    ms = moat__msg_new(MOAT_MSG_EXIT);
    mo = moat__msg_new(MOAT_MSG_EXIT);
    if (ms == NULL || mo == NULL ||
        grow((void **)&s->links, &s->caplinks, s->nlinks, sizeof(link_t)) ||
        grow((void **)&o->links, &o->caplinks, o->nlinks, sizeof(link_t))) {
        moat_msg_free(ms);
        moat_msg_free(mo);
        rc = -ENOMEM;
        goto out;
    }
    s->links[s->nlinks++] = (link_t){other, ms};
    o->links[o->nlinks++] = (link_t){self, mo};
out:
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

int moat_proc_unlink(moat_pool_t *pool, moat_pid_t self, moat_pid_t other) {
    moat__proc_t *s, *o;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    s = lookup(pool, self);
    if (s == NULL) {
        rc = MOAT_EDEAD;
    } else {
        moat_msg_free(link_take(s, other).msg);
        if ((o = lookup(pool, other)) != NULL)
            moat_msg_free(link_take(o, self).msg);
    }
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

int moat_proc_monitor(moat_pool_t *pool, moat_pid_t self, moat_pid_t target,
                 uint64_t *mref) {
    moat__proc_t *s, *t;
    moat_msg_t *m;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    s = lookup(pool, self);
    if (s == NULL) {
        rc = MOAT_EDEAD;
        goto out;
    }
    if ((m = moat__msg_new(MOAT_MSG_DOWN)) == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    m->ref = ++pool->next_ref;
    t = lookup(pool, target);
    if (t == NULL) {
        /* E2: a ref, and the DOWN at once. */
        m->from = target;
        m->term = moat_atom(MOAT_A_NOPROC);
        enqueue(pool, s, m);
    } else if (grow((void **)&s->mons, &s->capmons, s->nmons, sizeof(mon_t)) ||
               grow((void **)&t->watchers, &t->capwatchers, t->nwatchers,
                    sizeof(mon_t))) {
        moat_msg_free(m);
        rc = -ENOMEM;
        goto out;
    } else {
        s->mons[s->nmons++] = (mon_t){m->ref, target, m};
        t->watchers[t->nwatchers++] = (mon_t){m->ref, self, NULL};
    }
    *mref = m->ref;
out:
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

int moat_proc_demonitor(moat_pool_t *pool, moat_pid_t self, uint64_t mref,
                   unsigned flags) {
    moat__proc_t *s, *t;
    mon_t m;
    int rc;
    uv_mutex_lock(&pool->sig_lock);
    s = lookup(pool, self);
    if (s == NULL) {
        rc = MOAT_EDEAD;
    } else {
        m = mon_take(s->mons, &s->nmons, mref);
        rc = m.msg != NULL;
        if (rc) {
            moat_msg_free(m.msg);
            if ((t = lookup(pool, m.other)) != NULL)
                mon_take(t->watchers, &t->nwatchers, mref);
        }
        if (flags & MOAT_DEMONITOR_FLUSH)
            flush_down(s, mref);
    }
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

int moat_proc_trap_exit(moat_pool_t *pool, moat_pid_t self, int on) {
    moat__proc_t *s;
    int rc;
    uv_mutex_lock(&pool->sig_lock);
    s = lookup(pool, self);
    if (s == NULL) {
        rc = MOAT_EDEAD;
    } else if (s->srv != NULL) {
        rc = MOAT_EINVAL; /* servers' exit handling is fixed (server.c) */
    } else {
        rc = s->trap;
        s->trap = on != 0;
    }
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

int moat_proc_exit(moat_pool_t *pool, moat_pid_t self, moat_pid_t to,
              moat_term_t *reason) {
    after_t a = {NULL, NULL};
    moat__proc_t *t;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    t = lookup(pool, to);
    if (t == NULL) {
        /* exit/2 to a dead process does nothing, as on the BEAM. */
    } else if (moat_term_is(reason, MOAT_A_KILL)) {
        start_dying(&a, t, moat_atom(MOAT_A_KILLED)); /* E5 */
    } else if (t->trap) {
        moat_msg_t *m = moat__msg_new(MOAT_MSG_EXIT);
        if (m == NULL) {
            rc = -ENOMEM;
        } else {
            m->from = self;
            m->term = moat_term_ref(reason);
            enqueue(pool, t, m);
        }
    } else if (!moat_term_is(reason, MOAT_A_NORMAL) || to == self) {
        end_with(pool, &a, t, self, reason); /* E4; E6's exit(self(), normal) */
    }
    unlock_after(pool, &a);
    return rc;
}

int moat_proc_send(moat_pool_t *pool, moat_pid_t self, moat_pid_t to,
              moat_term_t *msg) {
    moat__proc_t *t;
    moat_msg_t *m;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    t = lookup(pool, to);
    if (t != NULL) {
        if ((m = moat__msg_new(MOAT_MSG_USER)) == NULL) {
            rc = -ENOMEM;
        } else {
            m->from = self;
            m->term = moat_term_ref(msg);
            enqueue(pool, t, m);
        }
    }
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

/* ------------------------------------------------------- task processes */

moat_pid_t moat__task_pid(moat_task_t *t) {
    moat_pool_t *pool = t->pool;
    moat_pid_t pid;
    uv_mutex_lock(&pool->sig_lock);
    if (t->pid == 0 && !t->proc_done) {
        moat__proc_t *p = proc_new(pool, KIND_TASK);
        if (p != NULL) {
            p->task = t;
            t->pid = p->pid;
        }
    }
    pid = t->proc_done && lookup(pool, t->pid) == NULL ? 0 : t->pid;
    uv_mutex_unlock(&pool->sig_lock);
    return pid;
}

int moat__proc_claim(moat_task_t *t, moat_term_t *reason) {
    moat_pool_t *pool = t->pool;
    after_t a = {NULL, NULL};
    int open = MOAT__OPEN, won;
    uv_mutex_lock(&pool->sig_lock);
    won = atomic_compare_exchange_strong(&t->claim, &open, MOAT__CLAIMED);
    if (won && !t->proc_done) {
        moat__proc_t *p = lookup(pool, t->pid);
        t->proc_done = 1;
        if (p != NULL)
            start_dying(&a, p, reason);
    }
    unlock_after(pool, &a);
    return won;
}

int moat_proc_spawn(moat_pool_t *pool, moat_pid_t parent, moat_task_fn fn,
               moat_term_t *args, unsigned flags, moat_pid_t *pid,
               uint64_t *mref) {
    return moat__spawn(pool, parent, fn, NULL, args, flags, pid, mref);
}

int moat__spawn(moat_pool_t *pool, moat_pid_t parent, moat_task_fn fn,
                const moat_lib_t *lib, moat_term_t *args, unsigned flags,
                moat_pid_t *pid, uint64_t *mref) {
    moat_job_t job = {fn, "spawned", lib, args, 0, -1, NULL};
    moat_task_t *t;
    moat__proc_t *pp = NULL, *c;
    moat_msg_t *m1 = NULL, *m2 = NULL, *md = NULL;
    int rc;
    if (fn == NULL || args == NULL || ((flags & ~3u) != 0) ||
        (flags != 0 && parent == 0))
        return MOAT_EINVAL;
    if ((rc = moat__task_prepare(pool, &job, &t)) != 0)
        return rc;
    if ((flags & MOAT_SPAWN_LINK) && ((m1 = moat__msg_new(MOAT_MSG_EXIT)) == NULL ||
                                      (m2 = moat__msg_new(MOAT_MSG_EXIT)) == NULL))
        rc = -ENOMEM;
    if ((flags & MOAT_SPAWN_MONITOR) && (md = moat__msg_new(MOAT_MSG_DOWN)) == NULL)
        rc = -ENOMEM;
    uv_mutex_lock(&pool->sig_lock);
    if (rc == 0 && parent != 0 && (pp = lookup(pool, parent)) == NULL)
        rc = MOAT_EDEAD;
    if (rc == 0 && pp != NULL &&
        (grow((void **)&pp->links, &pp->caplinks, pp->nlinks, sizeof(link_t)) ||
         grow((void **)&pp->mons, &pp->capmons, pp->nmons, sizeof(mon_t))))
        rc = -ENOMEM;
    c = rc == 0 ? proc_new(pool, KIND_TASK) : NULL;
    if (rc == 0 && c == NULL)
        rc = -ENOMEM;
    if (rc == 0 && ((flags & MOAT_SPAWN_LINK) &&
                    grow((void **)&c->links, &c->caplinks, 0, sizeof(link_t))))
        rc = -ENOMEM;
    if (rc == 0 && ((flags & MOAT_SPAWN_MONITOR) &&
                    grow((void **)&c->watchers, &c->capwatchers, 0,
                         sizeof(mon_t))))
        rc = -ENOMEM;
    if (rc != 0) {
        if (c != NULL)
            proc_free(pool, c);
        uv_mutex_unlock(&pool->sig_lock);
        moat_msg_free(m1);
        moat_msg_free(m2);
        moat_msg_free(md);
        t->args = NULL; /* the caller keeps them */
        moat__task_end(t, moat_atom(MOAT_A_SHUTDOWN), MOAT_CANCEL_SILENT);
        atomic_fetch_sub(&pool->admitted, 1);
        moat__task_unref(t); /* the run reference */
        moat__task_unref(t); /* ours */
        return rc;
    }
    c->task = t;
    t->pid = c->pid;
    if (flags & MOAT_SPAWN_LINK) {
        pp->links[pp->nlinks++] = (link_t){c->pid, m1};
        c->links[c->nlinks++] = (link_t){parent, m2};
    }
    if (flags & MOAT_SPAWN_MONITOR) {
        md->ref = ++pool->next_ref;
        pp->mons[pp->nmons++] = (mon_t){md->ref, c->pid, md};
        c->watchers[c->nwatchers++] = (mon_t){md->ref, parent, NULL};
        if (mref != NULL)
            *mref = md->ref;
    }
    if (pid != NULL)
        *pid = c->pid;
    uv_mutex_unlock(&pool->sig_lock);
    moat__task_queue(t);
    moat__task_unref(t);
    return 0;
}

/* ----------------------------------------------------------- ETF receive */

static int encode_msg(moat_msg_t *m, ei_x_buff *out) {
    size_t len;
    const char *d = moat_term_data(m->term, &len);
    int rc = 0;
    if (m->kind == MOAT_MSG_EXIT) {
        rc = ei_x_encode_tuple_header(out, 3) ||
             ei_x_encode_atom(out, "EXIT") ||
             ei_x_encode_ulonglong(out, m->from);
    } else if (m->kind == MOAT_MSG_DOWN) {
        rc = ei_x_encode_tuple_header(out, 5) ||
             ei_x_encode_atom(out, "DOWN") ||
             ei_x_encode_ulonglong(out, m->ref) ||
             ei_x_encode_atom(out, "process") ||
             ei_x_encode_ulonglong(out, m->from);
    }
    /* The term's bytes without its version byte. */
    if (rc == 0)
        rc = ei_x_append_buf(out, d + 1, (int)len - 1);
    return rc != 0 ? -ENOMEM : 0;
}

int moat__proc_receive_etf(moat_pool_t *pool, moat_pid_t self, int timeout_ms,
                           ei_x_buff *out) {
    moat_msg_t *m;
    int rc = moat_proc_receive(pool, self, timeout_ms, &m);
    if (rc != 0)
        return rc;
    rc = encode_msg(m, out);
    moat_msg_free(m);
    return rc;
}

/* --------------------------------------------------------------- servers */

int moat__proc_server_new(moat_pool_t *pool, moat__server_t *srv) {
    moat__proc_t *p;
    moat_msg_t *stop = NULL;
    if (srv->def != NULL && (stop = moat__msg_new(MOAT_MSG_EXIT)) == NULL)
        return -ENOMEM;
    uv_mutex_lock(&pool->sig_lock);
    if (atomic_load(&pool->stopping)) {
        uv_mutex_unlock(&pool->sig_lock);
        moat_msg_free(stop);
        return MOAT_ECLOSED;
    }
    p = proc_new(pool, KIND_SERVER);
    if (p != NULL) {
        p->srv = srv;
        p->trap = srv->info != NULL;
        srv->pid = p->pid;
        srv->stop_msg = stop;
        /* Not scheduled until published: messages wait for init. */
        srv->scheduled = 1;
    }
    uv_mutex_unlock(&pool->sig_lock);
    if (p == NULL) {
        moat_msg_free(stop);
        return -ENOMEM;
    }
    return 0;
}

int moat__proc_server_publish(moat_pool_t *pool, moat__server_t *srv,
                              moat_pid_t parent, unsigned flags) {
    moat__proc_t *p, *pp;
    moat_msg_t *m1 = NULL, *m2 = NULL;
    int rc = 0;
    if ((flags & MOAT_SPAWN_LINK) &&
        ((m1 = moat__msg_new(MOAT_MSG_EXIT)) == NULL ||
         (m2 = moat__msg_new(MOAT_MSG_EXIT)) == NULL)) {
        moat_msg_free(m1);
        return -ENOMEM;
    }
    uv_mutex_lock(&pool->sig_lock);
    p = lookup(pool, srv->pid);
    if (p == NULL) {
        rc = MOAT_EDEAD;
    } else if (flags & MOAT_SPAWN_LINK) {
        pp = lookup(pool, parent);
        if (pp == NULL) {
            rc = MOAT_EDEAD;
        } else if (grow((void **)&pp->links, &pp->caplinks, pp->nlinks,
                        sizeof(link_t)) ||
                   grow((void **)&p->links, &p->caplinks, p->nlinks,
                        sizeof(link_t))) {
            rc = -ENOMEM;
        } else {
            pp->links[pp->nlinks++] = (link_t){srv->pid, m1};
            p->links[p->nlinks++] = (link_t){parent, m2};
            m1 = m2 = NULL;
        }
    }
    if (rc == 0) {
        srv->scheduled = 0;
        if (p->head != NULL)
            wake_server(pool, srv);
    }
    uv_mutex_unlock(&pool->sig_lock);
    moat_msg_free(m1);
    moat_msg_free(m2);
    return rc;
}

int moat__proc_server_next(moat__server_t *srv, moat_msg_t **m) {
    moat_pool_t *pool = srv->pool;
    moat_task_t *prev;
    moat__proc_t *p;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    prev = srv->current;
    srv->current = NULL;
    if (srv->dead) {
        rc = -1;
    } else if ((p = lookup(pool, srv->pid)) != NULL && p->head != NULL) {
        *m = p->head;
        p->head = p->head->next;
        if (p->head == NULL)
            p->tail = &p->head;
        (*m)->next = NULL;
        srv->current = (*m)->call; /* the message's reference moves here */
        rc = 1;
    } else {
        srv->scheduled = 0;
    }
    uv_mutex_unlock(&pool->sig_lock);
    if (prev != NULL)
        moat__task_unref(prev);
    return rc;
}

void moat__proc_server_yield(moat__server_t *srv) {
    moat_pool_t *pool = srv->pool;
    moat_task_t *prev;
    moat__proc_t *p;
    uv_mutex_lock(&pool->sig_lock);
    prev = srv->current;
    srv->current = NULL;
    p = lookup(pool, srv->pid);
    if (srv->dead || (p != NULL && p->head != NULL))
        /* Still scheduled: behind the others, in the shared queue. */
        moat__pool_ready_sys(pool, &srv->item, 1);
    else
        srv->scheduled = 0;
    uv_mutex_unlock(&pool->sig_lock);
    if (prev != NULL)
        moat__task_unref(prev);
}

void moat__proc_server_exit(moat__server_t *srv, moat_term_t *reason) {
    moat_pool_t *pool = srv->pool;
    after_t a = {NULL, NULL};
    moat__proc_t *p;
    uv_mutex_lock(&pool->sig_lock);
    if ((p = lookup(pool, srv->pid)) != NULL)
        start_dying(&a, p, reason);
    unlock_after(pool, &a);
}

moat_msg_t *moat__proc_server_leftover(moat__server_t *srv) {
    moat_pool_t *pool = srv->pool;
    moat_msg_t *m;
    uv_mutex_lock(&pool->sig_lock);
    m = srv->leftover;
    srv->leftover = NULL;
    uv_mutex_unlock(&pool->sig_lock);
    return m;
}

int moat__proc_post(moat_pool_t *pool, moat_pid_t pid, moat_msg_t *m,
                    int user_servers) {
    moat__proc_t *p;
    int rc = 0;
    uv_mutex_lock(&pool->sig_lock);
    p = lookup(pool, pid);
    if (p == NULL ||
        (user_servers && (p->srv == NULL || p->srv->def == NULL)))
        rc = MOAT_ENOPROC;
    else
        enqueue(pool, p, m);
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}

int moat__proc_with_server(moat_pool_t *pool, moat_pid_t pid,
                           int (*fn)(moat__server_t *s, void *arg), void *arg) {
    moat__proc_t *p;
    int rc;
    uv_mutex_lock(&pool->sig_lock);
    p = lookup(pool, pid);
    rc = p != NULL && p->srv != NULL ? fn(p->srv, arg) : MOAT_ENOPROC;
    uv_mutex_unlock(&pool->sig_lock);
    return rc;
}
