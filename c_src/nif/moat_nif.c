/*
 * moat_nif.c: the NIF transport (priv/moat_nif.so) over the core.
 *
 * DESIGN
 *
 * Objects.  A pool (`npool_t`, malloc'd and reference-counted) wraps one
 * core pool and the task table of its libraries.  Three resource types
 * stand for it in Erlang: a pool handle (held by the pool's owner process
 * and by the registry), a task (returned by async/5; its term is the
 * reference in the task's messages) and a stream (one async_stream).
 * Every task and stream holds a reference on its npool_t, so the core pool
 * outlives every handle into it.
 *
 * Finding pools.  A registry maps pool names (atoms) to pool handles under
 * a read-write lock; a submit takes the read lock for the look-up and the
 * submit, so a pool being closed either takes the task (and settles it) or
 * is already gone (noproc).  No Erlang process is on this path.
 *
 * Outcomes.  The core calls `complete` exactly once per accepted task, on
 * whichever thread decided it.  A task's outcome is sent to its owner with
 * enif_send from that thread, in a message env reused per pool thread:
 * {Ref, Result} or {'DOWN', Ref, process, Id, Reason}.  A stream's outcomes
 * go into the stream's buffer instead, with one {moat_stream, S} message
 * whenever the buffer goes from unannounced to announced (sent under the
 * stream's lock, so a consumer that sees the flag set knows the message is
 * in its mailbox); the consumer takes many outcomes per message.
 *
 * Giving up.  The owner's give-up paths (await timeout, shutdown, ignore,
 * a halted stream) race the sender: cancelling uses the core's claim
 * (MOAT_CANCEL_SILENT: the winner is known, the loser's callback has
 * returned before cancel does), and ignore uses the task's own state word
 * (OPEN -> SENDING -> SENT, or OPEN -> IGNORED).  Either way, once the
 * give-up call returns, no message about the task is still to come.
 *
 * Owners.  A pool monitors (enif_monitor_process) every process that
 * submitted to it, once, and its own owner process.  The `down` callback
 * and the destructors only queue work: a janitor thread cancels a dead
 * submitter's tasks and closes a pool whose owner died; a reaper thread
 * stops and frees pools nobody references (joining their threads, which
 * may wait for an abandoned task body).  Both threads start once, on first
 * load, and live as long as the VM.
 *
 * Unloading.  The library pins itself with dlopen(RTLD_NODELETE) and the
 * core pins task libraries the same way, so a module purge never unmaps
 * code that a pool thread, the janitor or the reaper may still run; purge
 * and reload therefore leave running pools working.
 */
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>

#include <erl_nif.h>
#include <uv.h>

#include "moat_core.h"

/* ------------------------------------------------------------- atoms */

#define ATOMS(X)                                                            \
    X(ok) X(error) X(true) X(false) X(undefined) X(infinity) X(normal)      \
    X(shutdown) X(killed) X(timeout) X(noproc) X(overloaded)                \
    X(unknown_task) X(native_error) X(process) X(moat_stream)              \
    X(moat_task_done) X(exit) X(cancelled) X(delivered) X(ignored)         \
    X(already_started) X(bad_library) X(not_found) X(queued) X(running)    \
    X(completed) X(failed) X(timeouts) X(rejected) X(abandoned)            \
    X(threads) X(restarts) X(size) X(enomem) X(bad_option) X(wait)        \
    X(restarting) X(worker) X(supervisor) X(specs) X(active)               \
    X(supervisors) X(workers) X(moat_gave_up) X(permanent) X(transient)    \
    X(temporary) X(brutal_kill) X(one_for_one) X(one_for_all)              \
    X(rest_for_one) X(unknown_server) X(failed_to_start_child)            \
    X(other) X(native_crash) X(cnode_down) X(moat_cnode_out) X(bad_frame) \
    X(distribution) X(moat_cnode_send) X(latency_ns) X(failed_by) X(count)   \
    X(p50) X(p90) X(p99) X(p999) X(max) X(badarg) X(noconnection)       \
    X(moat_child_crashed) X(remote)

#define DECLARE_ATOM(name) static ERL_NIF_TERM atom_##name;
ATOMS(DECLARE_ATOM)
static ERL_NIF_TERM atom_DOWN;

static void make_atoms(ErlNifEnv *env) {
#define MAKE_ATOM(name) atom_##name = enif_make_atom(env, #name);
    ATOMS(MAKE_ATOM)
    atom_DOWN = enif_make_atom(env, "DOWN");
}

/* ------------------------------------------------------------- threads */

/* The env a pool thread builds messages in, reused (cleared) after each
 * send; NULL on threads moat did not start (schedulers). */
static _Thread_local ErlNifEnv *tl_msg_env;
/* The caller env enif_send must be given on a scheduler thread; NULL on
 * moat's own threads.  Set around core calls that may run callbacks. */
static _Thread_local ErlNifEnv *tl_caller_env;

/* Set around core calls made in a process-bound NIF call of a C-node
 * pool's caller: a cancel decided there goes to the port at once, after
 * the caller's own run frame (see on_remote_cancel). */
static _Thread_local ErlNifEnv *tl_port_env;

static void thread_start(void *data) {
    (void)data;
    tl_msg_env = enif_alloc_env();
}

static void thread_stop(void *data) {
    (void)data;
    if (tl_msg_env != NULL)
        enif_free_env(tl_msg_env);
    tl_msg_env = NULL;
}

static ErlNifEnv *msg_env_get(void) {
    return tl_msg_env != NULL ? tl_msg_env : enif_alloc_env();
}

/* After a send (or instead of one): the env is cleared for reuse. */
static void msg_env_put(ErlNifEnv *env) {
    if (env == tl_msg_env)
        enif_clear_env(env);
    else
        enif_free_env(env);
}

static void send_msg(const ErlNifPid *to, ErlNifEnv *env, ERL_NIF_TERM msg) {
    enif_send(tl_caller_env, to, env, msg);
}

/* ------------------------------------------------------------- pools */

/* A task name of one of the pool's libraries, keyed by its atom (0:
 * an empty slot).  A C-node pool's entries have no def or lib here, only
 * the name the C-node listed. */
typedef struct {
    ERL_NIF_TERM name;
    const moat_task_def_t *def;
    const moat_lib_t *lib;
    char *cname; /* C-node pools: the name, as sent in run frames */
} task_entry_t;

/* A cancel a C-node pool's owner is to send: task `id`, decided here
 * with `reason`. */
typedef struct {
    uint64_t id;
    moat_atom_t reason;
} cancel_t;

typedef struct npool_s {
    atomic_int refs;
    moat_pool_t *pool;
    ERL_NIF_TERM name; /* an atom: valid in every env */
    ErlNifPid owner;   /* the moat_pool process */
    unsigned size;
    moat_lib_t **libs;
    size_t nlibs;
    task_entry_t *tasks; /* open addressing, capacity ntask_cap (2^k) */
    size_t ntask_cap;
    /* Submitters this pool monitors: their pid terms, open addressing,
     * 0 empty, 1 deleted (no pid term is 0 or 1). */
    uv_mutex_t mon_lock; /* guards mons, nmons, mon_cap, mon_used */
    uint64_t *mons;
    size_t nmons, mon_used, mon_cap;
    /* The native supervisor and its servers, once sup_start made them;
     * never changed after that, so readers need no lock. */
    _Atomic(struct servers_s *) servers;
    atomic_int sup_claimed; /* a sup_start runs or succeeded: one at a time,
                               and none after a success */
    /* C-node pools: the core pool runs no bodies; tasks go to this port
     * (the C-node's, connected to the owner) and cancels wait in the
     * outbox until the owner sends them (cnode_flush). */
    int remote;
    int dist;       /* over distribution: frames go to the owner to relay */
    ErlNifPort port;
    uv_mutex_t out_lock; /* guards out, nout, capout, out_told */
    cancel_t *out;
    size_t nout, capout;
    int out_told; /* the owner has been sent moat_cnode_out */
    /* What stats/1 adds to the core's counters: see "Statistics". */
    struct lat_shard_s *lat;
    atomic_uint_fast64_t n_class[5]; /* C_NATIVE_ERROR ... C_EXIT */
    /* Native servers that crashed since the owner last read them
     * (pool_crashes), the last one's id and reason, and whether the owner
     * has been told; mon_lock guards them too. */
    uint64_t ncrashed;
    moat_term_t *crash_id, *crash_reason;
    int crash_told;
    /* C-node pools: the restarts of the C-node's native supervisor, as
     * its last {restarts, Total} frame said. */
    atomic_uint_fast64_t remote_restarts;
} npool_t;

/* A pool's native servers: the supervisor's pid and each child's id, as
 * an Erlang term (in `env`) for look-ups and as ETF, the very term the
 * supervisor's spec holds, so that finding a child is a pointer compare.
 * A C-node pool's supervisor runs in the C-node: `sup` is 0, `etf` NULL,
 * and a child is named in frames by its index here, the same as in the
 * C-node's hello. */
typedef struct servers_s {
    moat_pid_t sup;
    ErlNifEnv *env;
    size_t n;
    struct {
        ERL_NIF_TERM id;
        moat_term_t *etf;
    } ids[];
} servers_t;

typedef struct {
    npool_t *np;
} pool_res_t;

static ErlNifResourceType *pool_rt, *task_rt, *stream_rt;

static void np_ref(npool_t *np) { atomic_fetch_add(&np->refs, 1); }
static void reaper_push(npool_t *np);
static void sup_stop(ErlNifEnv *env, npool_t *np);
static void sup_wait(ErlNifEnv *env, moat_pool_t *pool, moat_pid_t sup,
                     int stop);

static void np_unref(npool_t *np) {
    if (np != NULL && atomic_fetch_sub(&np->refs, 1) == 1)
        reaper_push(np);
}

static void servers_free(servers_t *sv) {
    if (sv == NULL)
        return;
    for (size_t i = 0; i < sv->n; i++)
        moat_term_unref(sv->ids[i].etf);
    enif_free_env(sv->env);
    free(sv);
}

/* Frees what pool_new or cnode_pool_new set up, but the core pool. */
static void np_discard(npool_t *np) {
    servers_free(atomic_exchange(&np->servers, NULL));
    for (size_t i = 0; i < np->nlibs; i++)
        moat_lib_close(np->libs[i]);
    free(np->libs);
    for (size_t i = 0; np->remote && i < np->ntask_cap; i++)
        free(np->tasks[i].cname);
    free(np->tasks);
    free(np->mons);
    free(np->out);
    free(np->lat);
    if (np->remote)
        uv_mutex_destroy(&np->out_lock);
    uv_mutex_destroy(&np->mon_lock);
    free(np);
}

static void np_free(npool_t *np) {
    moat_pool_free(np->pool);
    moat_term_unref(np->crash_id);
    moat_term_unref(np->crash_reason);
    np_discard(np);
}

static size_t hash_term(ERL_NIF_TERM t) {
    uint64_t x = (uint64_t)t;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

static const task_entry_t *task_find(const npool_t *np, ERL_NIF_TERM name) {
    size_t mask = np->ntask_cap - 1;
    for (size_t i = hash_term(name) & mask;; i = (i + 1) & mask) {
        if (np->tasks[i].name == 0)
            return NULL;
        if (np->tasks[i].name == name)
            return &np->tasks[i];
    }
}

/* The slot for `name` in a table being filled: its own if the name is
 * there already (an earlier library won it), else the empty one where it
 * goes. */
static task_entry_t *task_slot(npool_t *np, ERL_NIF_TERM name) {
    size_t mask = np->ntask_cap - 1, i;
    for (i = hash_term(name) & mask;
         np->tasks[i].name != 0 && np->tasks[i].name != name;
         i = (i + 1) & mask)
        ;
    return &np->tasks[i];
}

/* Adds a submitter; returns 1 when it was new (monitor it). */
static int mon_add(npool_t *np, uint64_t key) {
    size_t mask, i, tomb = SIZE_MAX;
    int added = 0;
    uv_mutex_lock(&np->mon_lock);
    if ((np->mon_used + 1) * 2 > np->mon_cap) {
        /* At half full (deleted slots included), rehash into a table a
         * quarter full. */
        size_t cap = 16;
        uint64_t *m;
        while (cap < (np->nmons + 1) * 4)
            cap *= 2;
        if ((m = calloc(cap, sizeof *m)) == NULL) {
            uv_mutex_unlock(&np->mon_lock);
            return 0; /* unmonitored: its death will not cancel its tasks */
        }
        for (size_t j = 0; j < np->mon_cap; j++) {
            uint64_t k = np->mons[j];
            if (k > 1) {
                size_t h = hash_term(k) & (cap - 1);
                while (m[h] != 0)
                    h = (h + 1) & (cap - 1);
                m[h] = k;
            }
        }
        free(np->mons);
        np->mons = m;
        np->mon_cap = cap;
        np->mon_used = np->nmons;
    }
    mask = np->mon_cap - 1;
    for (i = hash_term(key) & mask;; i = (i + 1) & mask) {
        if (np->mons[i] == key)
            break;
        if (np->mons[i] == 1 && tomb == SIZE_MAX)
            tomb = i;
        if (np->mons[i] == 0) {
            if (tomb != SIZE_MAX)
                i = tomb;
            else
                np->mon_used++;
            np->mons[i] = key;
            np->nmons++;
            added = 1;
            break;
        }
    }
    uv_mutex_unlock(&np->mon_lock);
    return added;
}

static void mon_remove(npool_t *np, uint64_t key) {
    uv_mutex_lock(&np->mon_lock);
    if (np->mon_cap > 0) {
        size_t mask = np->mon_cap - 1;
        for (size_t i = hash_term(key) & mask; np->mons[i] != 0;
             i = (i + 1) & mask) {
            if (np->mons[i] == key) {
                np->mons[i] = 1;
                np->nmons--;
                break;
            }
        }
    }
    uv_mutex_unlock(&np->mon_lock);
}

static uint64_t pid_key(const ErlNifPid *pid) {
    return (uint64_t)enif_make_pid(NULL, pid);
}

/* Makes sure the pool monitors the calling process, so that its death
 * cancels its tasks.  `res` is the pool's handle. */
static void watch_caller(ErlNifEnv *env, pool_res_t *res, const ErlNifPid *self) {
    if (mon_add(res->np, pid_key(self)) &&
        enif_monitor_process(env, res, self, NULL) != 0)
        mon_remove(res->np, pid_key(self)); /* cannot happen: self lives */
}

/* ----------------------------------------------------------- registry */

typedef struct {
    ERL_NIF_TERM name;
    pool_res_t *res; /* holds a resource reference */
} reg_entry_t;

static uv_rwlock_t reg_lock; /* guards reg, nreg, capreg */
static reg_entry_t *reg;
static size_t nreg, capreg;

/* Read-locked look-up; returns NULL (and unlocks) when absent.  On
 * success the caller unlocks with reg_done. */
static pool_res_t *reg_find(ERL_NIF_TERM name) {
    uv_rwlock_rdlock(&reg_lock);
    for (size_t i = 0; i < nreg; i++)
        if (reg[i].name == name)
            return reg[i].res;
    uv_rwlock_rdunlock(&reg_lock);
    return NULL;
}

static void reg_done(void) { uv_rwlock_rdunlock(&reg_lock); }

/* Removes the entry of this pool, if it is still registered; returns the
 * handle whose reference the caller must release, or NULL. */
static pool_res_t *reg_remove(npool_t *np) {
    pool_res_t *res = NULL;
    uv_rwlock_wrlock(&reg_lock);
    for (size_t i = 0; i < nreg; i++) {
        if (reg[i].res->np == np) {
            res = reg[i].res;
            reg[i] = reg[--nreg];
            break;
        }
    }
    uv_rwlock_wrunlock(&reg_lock);
    return res;
}

/* ------------------------------------------------- janitor and reaper */

typedef enum { JOB_CANCEL_OWNER, JOB_CLOSE, JOB_FREE, JOB_KILL_TASK } job_kind_t;

typedef struct job_s {
    struct job_s *next;
    job_kind_t kind;
    npool_t *np; /* holds a reference, except for JOB_FREE */
    uint64_t key;
    void *task;  /* JOB_KILL_TASK: a task resource, kept */
} job_t;

typedef struct {
    uv_mutex_t lock; /* guards head, tail */
    uv_cond_t cond;
    job_t *head, *tail;
    uv_thread_t tid;
} jobq_t;

static jobq_t janitor, reaper;

static void kill_task(void *task);

static void jobq_push(jobq_t *q, job_kind_t kind, npool_t *np, uint64_t key,
                      void *task) {
    job_t *j = malloc(sizeof *j);
    if (j == NULL) {
        /* Out of memory: do the job here, on a scheduler if called from a
         * `down` callback, whose env is then tl_caller_env. */
        if (kind == JOB_KILL_TASK) {
            kill_task(task);
            return;
        }
        /* Out of memory: do it here.  Freeing would join threads, so a
         * pool that cannot be queued for freeing is left allocated. */
        if (kind == JOB_CANCEL_OWNER)
            moat_pool_cancel_owner(np->pool, key, MOAT_A_SHUTDOWN, 0);
        else if (kind == JOB_CLOSE)
            moat_pool_close(np->pool);
        if (kind != JOB_FREE)
            np_unref(np);
        return;
    }
    j->next = NULL;
    j->kind = kind;
    j->np = np;
    j->key = key;
    j->task = task;
    uv_mutex_lock(&q->lock);
    if (q->tail != NULL)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
    uv_cond_signal(&q->cond);
    uv_mutex_unlock(&q->lock);
}

static void reaper_push(npool_t *np) {
    jobq_push(&reaper, JOB_FREE, np, 0, NULL);
}

static void jobq_main(void *arg) {
    jobq_t *q = arg;
    thread_start(NULL);
    for (;;) {
        job_t *j;
        uv_mutex_lock(&q->lock);
        while (q->head == NULL)
            uv_cond_wait(&q->cond, &q->lock);
        j = q->head;
        q->head = j->next;
        if (q->head == NULL)
            q->tail = NULL;
        uv_mutex_unlock(&q->lock);
        switch (j->kind) {
        case JOB_CANCEL_OWNER:
            moat_pool_cancel_owner(j->np->pool, j->key, MOAT_A_SHUTDOWN, 0);
            np_unref(j->np);
            break;
        case JOB_CLOSE:
            moat_pool_close(j->np->pool);
            np_unref(j->np);
            break;
        case JOB_FREE:
            np_free(j->np);
            break;
        case JOB_KILL_TASK:
            kill_task(j->task);
            break;
        }
        free(j);
    }
}

static int jobq_start(jobq_t *q, const char *name) {
    sigset_t all, old;
    int rc;
    if ((rc = uv_mutex_init(&q->lock)) != 0)
        return rc;
    if ((rc = uv_cond_init(&q->cond)) != 0)
        return rc;
    /* Block every signal in moat's threads: the VM handles them. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = uv_thread_create(&q->tid, jobq_main, q);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0)
        pthread_setname_np(q->tid, name);
    return rc;
}

/* ------------------------------------------------------------- tasks */

enum { K_TASK = 1, K_STREAM };

/* A C-node task's run frame and a cancel decided away from its caller
 * race: the cancel must not reach the C-node first (it would ignore it
 * and run the body for nothing).  UNSENT -> SENT when the caller has sent
 * the run frame; UNSENT -> CANCELLED when a cancel came first: the caller
 * then sends it, after the run frame. */
enum { WIRE_UNSENT = 0, WIRE_SENT, WIRE_CANCELLED };

typedef struct {
    atomic_int state;
    moat_atom_t reason; /* WIRE_CANCELLED: written before the state */
} wire_t;
/* A task's state word.  OPEN: its outcome is to be sent.  SPIN: run/4's
 * caller is spinning for it: the callback leaves the outcome in `held`
 * and sets HELD instead of sending, unless the caller stopped spinning
 * first (SPIN -> OPEN). */
enum { T_OPEN, T_SENDING, T_SENT, T_IGNORED, T_CANCELLED, T_SPIN, T_HELD };

typedef struct {
    int kind; /* K_TASK */
    wire_t wire; /* C-node pools */
    atomic_int state;
    npool_t *np; /* NULL for a task refused before it had a pool */
    moat_task_t *t;
    ERL_NIF_TERM pool_name;
    ErlNifPid owner;
    ErlNifPid proxy; /* undefined unless linked */
    moat_term_t *held; /* T_HELD: the outcome, for the spinning caller */
    int held_kind;
} ntask_t;

static void task_dtor(ErlNifEnv *env, void *obj) {
    ntask_t *nt = obj;
    (void)env;
    if (nt->t != NULL)
        moat_task_release(nt->t);
    if (nt->held != NULL)
        moat_term_unref(nt->held);
    np_unref(nt->np);
}

/* The process standing for a linked task died (killed by someone, or its
 * owner gone): the task dies with it, as a BEAM task would.  After the
 * task's own outcome this finds the claim taken and does nothing.  On the
 * janitor; `task` holds a reference for the job. */
static void kill_task(void *task) {
    ntask_t *nt = task;
    if (nt->t != NULL)
        moat_task_cancel(nt->t, MOAT_A_KILLED, 0);
    enif_release_resource(nt);
}

static void task_down(ErlNifEnv *env, void *obj, ErlNifPid *pid,
                      ErlNifMonitor *mon) {
    (void)env;
    (void)pid;
    (void)mon;
    enif_keep_resource(obj);
    tl_caller_env = env; /* for jobq_push's inline fallback */
    jobq_push(&janitor, JOB_KILL_TASK, NULL, 0, obj);
    tl_caller_env = NULL;
}

/* The Id of the task's DOWN: its proxy, or {Pool, N} with N the core's id
 * (0 for a refused task).  N is passed in rather than read from nt: the
 * thread completing a task may do so before async/5 has stored it. */
static ERL_NIF_TERM task_id_term(ErlNifEnv *env, const ntask_t *nt,
                                 uint64_t id) {
    if (!enif_is_pid_undefined(&nt->proxy))
        return enif_make_pid(env, &nt->proxy);
    return enif_make_tuple2(env, nt->pool_name, enif_make_uint64(env, id));
}

/* Tells a linked task's proxy process how the task ended, so that it exits
 * with that reason (normal on success). */
static void proxy_notify(const ntask_t *nt, int kind, const moat_term_t *term,
                         ERL_NIF_TERM fallback) {
    ErlNifEnv *env;
    ERL_NIF_TERM reason = atom_normal;
    if (enif_is_pid_undefined(&nt->proxy))
        return;
    env = msg_env_get();
    if (kind != MOAT_OK) {
        size_t len;
        const char *d = moat_term_data(term, &len);
        if (term == NULL ||
            enif_binary_to_term(env, (const unsigned char *)d, len, &reason,
                                0) == 0)
            reason = enif_make_copy(env, fallback);
    }
    send_msg(&nt->proxy, env,
             enif_make_tuple2(env, atom_moat_task_done, reason));
    msg_env_put(env);
}

static ERL_NIF_TERM bad_result(ErlNifEnv *env) {
    static const char m[] = "result could not be decoded";
    ERL_NIF_TERM bin;
    unsigned char *p = enif_make_new_binary(env, sizeof m - 1, &bin);
    memcpy(p, m, sizeof m - 1);
    return enif_make_tuple2(env, atom_native_error, bin);
}

static void task_complete(ntask_t *nt, const moat_outcome_t *o, uint64_t id) {
    int open = T_OPEN, spin = T_SPIN;
    if (atomic_load(&nt->state) == T_SPIN) {
        nt->held = moat_term_ref(o->term);
        nt->held_kind = o->kind;
        if (atomic_compare_exchange_strong(&nt->state, &spin, T_HELD)) {
            enif_release_resource(nt);
            return;
        }
        moat_term_unref(nt->held); /* the caller stopped spinning */
        nt->held = NULL;
    }
    if (atomic_compare_exchange_strong(&nt->state, &open, T_SENDING)) {
        ErlNifEnv *env = msg_env_get();
        ERL_NIF_TERM ref = enif_make_resource(env, nt), term, msg;
        size_t len;
        const char *d = moat_term_data(o->term, &len);
        int kind = o->kind;
        if (enif_binary_to_term(env, (const unsigned char *)d, len, &term,
                                0) == 0) {
            kind = MOAT_EXIT;
            term = bad_result(env);
        }
        if (kind == MOAT_OK)
            msg = enif_make_tuple2(env, ref, term);
        else
            msg = enif_make_tuple5(env, atom_DOWN, ref, atom_process,
                                   task_id_term(env, nt, id), term);
        send_msg(&nt->owner, env, msg);
        msg_env_put(env);
        atomic_store(&nt->state, T_SENT);
        proxy_notify(nt, o->kind, o->term, atom_normal);
    } else if (open == T_IGNORED) {
        /* The owner unlinked from the proxy; let it go now. */
        proxy_notify(nt, o->kind, o->term, atom_normal);
    }
    /* The reference the pool held for this callback. */
    enif_release_resource(nt);
}

/* ------------------------------------------------------------ streams */

typedef struct nstream_s nstream_t;

typedef struct {
    int kind; /* K_STREAM */
    wire_t wire; /* C-node pools; reset for each task in the slot */
    nstream_t *s;
    uint64_t index;
    moat_task_t *t;
} sslot_t;

enum { E_OK, E_EXIT, E_DEADLINE };

typedef struct {
    uint32_t slot;
    uint32_t kind;
    uint64_t index;
    moat_term_t *term;
} entry_t;

struct nstream_s {
    npool_t *np;
    const task_entry_t *task; /* NULL: unknown task */
    ERL_NIF_TERM task_name;
    ErlNifPid owner;
    int64_t timeout_ms;
    sslot_t *slots;
    uint32_t nslots;
    uint32_t *free_slots; /* owner only */
    uint32_t nfree;
    int closed;           /* owner only */
    int lock_ok;
    uv_mutex_t lock;      /* guards buf, nbuf, pending, notified */
    entry_t *buf;         /* nslots entries */
    entry_t *spare;       /* owner only: the other buffer, nslots entries */
    size_t nbuf;
    size_t pending;       /* submitted, outcome not yet in buf */
    size_t batch;         /* announce once this many are in buf */
    int notified;
    int waiting;          /* the consumer found buf empty and blocks */
};


static void entry_free(entry_t *e) {
    if (e->term != NULL)
        moat_term_unref(e->term);
}

static void stream_complete(sslot_t *sl, const moat_outcome_t *o) {
    nstream_t *s = sl->s;
    entry_t e = {0};
    e.slot = (uint32_t)(sl - s->slots);
    e.index = sl->index;
    /* The deadline's outcome is the core's own `timeout` atom, never a
     * term a task built: that is how a deadline is told from a task that
     * chose the reason `timeout`. */
    if (o->kind == MOAT_OK)
        e.kind = E_OK;
    else if (o->term == moat_atom(MOAT_A_TIMEOUT))
        e.kind = E_DEADLINE;
    else
        e.kind = E_EXIT;
    e.term = moat_term_ref(o->term);
    uv_mutex_lock(&s->lock);
    /* Room is certain: the buffer holds nslots entries and a slot has at
     * most one outcome until stream_take frees it. */
    s->buf[s->nbuf++] = e;
    s->pending--;
    /* Announce a batch, not each outcome, while the consumer is busy: it
     * then takes many per wake-up while the rest keep the threads busy.
     * A consumer that found nothing and blocks hears of the first
     * outcome at once. */
    if (!s->notified &&
        (s->waiting || s->nbuf >= s->batch || s->pending == 0)) {
        ErlNifEnv *env = msg_env_get();
        s->notified = 1;
        send_msg(&s->owner, env,
                 enif_make_tuple2(env, atom_moat_stream,
                                  enif_make_resource(env, s)));
        msg_env_put(env);
    }
    uv_mutex_unlock(&s->lock);
    enif_release_resource(s);
}

static void stream_dtor(ErlNifEnv *env, void *obj) {
    nstream_t *s = obj;
    (void)env;
    /* No task holds the stream any more (each holds a reference), so only
     * what was never taken is left. */
    for (size_t i = 0; i < s->nbuf; i++)
        entry_free(&s->buf[i]);
    for (uint32_t i = 0; i < s->nslots; i++)
        if (s->slots[i].t != NULL)
            moat_task_release(s->slots[i].t);
    free(s->buf);
    free(s->spare);
    free(s->slots);
    free(s->free_slots);
    if (s->lock_ok)
        uv_mutex_destroy(&s->lock);
    np_unref(s->np);
}

/* --------------------------------------------------------- statistics */

/* Each outcome's latency, from its submit to its outcome, goes into a
 * log-linear histogram: 8 buckets of 128 ns below 1 us, then 8 per power
 * of two (a bucket is at most 12.5% as wide as its values) up to 2^42 ns
 * (73 min), the
 * last bucket holding anything longer.  Pool threads record into one of
 * LAT_SHARDS copies, picked once per thread, so that they do not fight
 * over the same counters; stats/1 adds them up. */
#define LAT_SHARDS 8
#define LAT_LINEAR 8
#define LAT_MIN_EXP 10 /* 1024 ns: where the octaves start */
#define LAT_MAX_EXP 41
#define LAT_BUCKETS (LAT_LINEAR + (LAT_MAX_EXP - LAT_MIN_EXP + 1) * 8)

typedef struct lat_shard_s {
    _Alignas(64) atomic_uint_fast64_t b[LAT_BUCKETS];
} lat_shard_t;

static atomic_uint next_shard;
static _Thread_local unsigned tl_shard = UINT_MAX;

static unsigned lat_bucket(uint64_t ns) {
    unsigned e;
    if (ns < (1u << LAT_MIN_EXP))
        return (unsigned)(ns >> 7);
    e = 63u - (unsigned)__builtin_clzll(ns);
    if (e > LAT_MAX_EXP)
        return LAT_BUCKETS - 1;
    return LAT_LINEAR + (e - LAT_MIN_EXP) * 8 + (unsigned)((ns >> (e - 3)) & 7);
}

/* The middle of bucket i, in ns. */
static uint64_t lat_mid(unsigned i) {
    unsigned e, m;
    if (i < LAT_LINEAR)
        return (uint64_t)i * 128 + 64;
    e = LAT_MIN_EXP + (i - LAT_LINEAR) / 8;
    m = (i - LAT_LINEAR) % 8;
    return ((uint64_t)(8 + m) << (e - 3)) + (1ull << (e - 4));
}

static void lat_record(npool_t *np, moat_task_t *t) {
    uint64_t now = uv_hrtime(), then = moat_task_submitted(t);
    if (np->lat == NULL)
        return;
    if (tl_shard == UINT_MAX)
        tl_shard = atomic_fetch_add(&next_shard, 1) % LAT_SHARDS;
    atomic_fetch_add_explicit(
        &np->lat[tl_shard].b[lat_bucket(now > then ? now - then : 0)], 1,
        memory_order_relaxed);
}

/* Failure classes of stats/1's failed_by: the reasons of outcomes that
 * are the task's own (a deadline, shutdown and kill are counted apart,
 * as timeouts and cancelled). */
enum { C_NATIVE_ERROR, C_NATIVE_CRASH, C_BADARG, C_NOCONNECTION, C_EXIT,
       C__COUNT };

/* Whether ETF term `d` (no version byte) is the atom `name`. */
static int etf_atom_is(const unsigned char *d, size_t len, const char *name) {
    size_t n = strlen(name), alen, head;
    if (len < 2)
        return 0;
    if (d[0] == ERL_SMALL_ATOM_UTF8_EXT || d[0] == ERL_SMALL_ATOM_EXT) {
        alen = d[1];
        head = 2;
    } else if ((d[0] == ERL_ATOM_UTF8_EXT || d[0] == ERL_ATOM_EXT) && len >= 3) {
        alen = (size_t)d[1] << 8 | d[2];
        head = 3;
    } else {
        return 0;
    }
    return alen == n && len >= head + n && memcmp(d + head, name, n) == 0;
}

static int failure_class(const moat_term_t *term) {
    size_t len;
    const unsigned char *d = (const unsigned char *)moat_term_data(term, &len);
    if (len < 2)
        return C_EXIT;
    d++; /* the version byte */
    len--;
    if (etf_atom_is(d, len, "badarg"))
        return C_BADARG;
    if (etf_atom_is(d, len, "noconnection"))
        return C_NOCONNECTION;
    if (len > 2 && d[0] == ERL_SMALL_TUPLE_EXT && d[1] == 2) {
        if (etf_atom_is(d + 2, len - 2, "native_error"))
            return C_NATIVE_ERROR;
        if (etf_atom_is(d + 2, len - 2, "native_crash"))
            return C_NATIVE_CRASH;
    }
    return C_EXIT;
}

static void count_outcome(npool_t *np, moat_task_t *t,
                          const moat_outcome_t *o) {
    lat_record(np, t);
    if (o->kind == MOAT_EXIT && !moat_term_is(o->term, MOAT_A_TIMEOUT) &&
        !moat_term_is(o->term, MOAT_A_SHUTDOWN) &&
        !moat_term_is(o->term, MOAT_A_KILLED))
        atomic_fetch_add_explicit(&np->n_class[failure_class(o->term)], 1,
                                  memory_order_relaxed);
}

/* #{count, p50, p90, p99, p999, max} in nanoseconds, each the middle of
 * its bucket (to within 6.25%); 0 for each when nothing ended yet. */
static ERL_NIF_TERM latency_map(ErlNifEnv *env, npool_t *np) {
    static const double qs[] = {0.50, 0.90, 0.99, 0.999};
    ERL_NIF_TERM keys[5] = {atom_p50, atom_p90, atom_p99, atom_p999,
                            atom_max};
    ERL_NIF_TERM map = enif_make_new_map(env);
    uint64_t b[LAT_BUCKETS] = {0}, total = 0, cum = 0, v[5] = {0};
    unsigned q = 0, last = 0;
    for (unsigned s = 0; np->lat != NULL && s < LAT_SHARDS; s++)
        for (unsigned i = 0; i < LAT_BUCKETS; i++)
            b[i] += atomic_load_explicit(&np->lat[s].b[i],
                                         memory_order_relaxed);
    for (unsigned i = 0; i < LAT_BUCKETS; i++)
        if (b[i] > 0) {
            total += b[i];
            last = i;
        }
    for (unsigned i = 0; total > 0 && i < LAT_BUCKETS && q < 4; i++) {
        cum += b[i];
        while (q < 4 && (double)cum >= qs[q] * (double)total)
            v[q++] = lat_mid(i);
    }
    if (total > 0)
        v[4] = lat_mid(last);
    enif_make_map_put(env, map, atom_count, enif_make_uint64(env, total),
                      &map);
    for (int k = 0; k < 5; k++)
        enif_make_map_put(env, map, keys[k], enif_make_uint64(env, v[k]),
                          &map);
    return map;
}

static ERL_NIF_TERM failed_by_map(ErlNifEnv *env, npool_t *np) {
    ERL_NIF_TERM keys[C__COUNT] = {atom_native_error, atom_native_crash,
                                   atom_badarg, atom_noconnection, atom_exit};
    ERL_NIF_TERM map = enif_make_new_map(env);
    for (int k = 0; k < C__COUNT; k++)
        enif_make_map_put(
            env, map, keys[k],
            enif_make_uint64(env, atomic_load_explicit(
                                      &np->n_class[k], memory_order_relaxed)),
            &map);
    return map;
}

/* ------------------------------------------------------ core callback */

static void on_complete(moat_task_t *t, const moat_outcome_t *o, void *data) {
    int *kind = moat_task_data(t);
    count_outcome(data, t, o);
    if (*kind == K_TASK)
        task_complete((ntask_t *)kind, o, moat_task_id(t));
    else
        stream_complete((sslot_t *)kind, o);
}

/* ------------------------------------------------------ C-node pools */

/* Encodes {run, Tag, Task, Args} (n == 1) or {runs, [{Tag, Task, Args}]}
 * into buf, or with buf NULL just counts its bytes.  args[i] is each
 * task's argument list (version byte first). */
static int run_frame(char *buf, const char *task, size_t n,
                     moat_task_t *const *ts, moat_term_t *const *args) {
    int i = 0;
    ei_encode_version(buf, &i);
    if (n == 1) {
        ei_encode_tuple_header(buf, &i, 4);
        ei_encode_atom(buf, &i, "run");
    } else {
        ei_encode_tuple_header(buf, &i, 2);
        ei_encode_atom(buf, &i, "runs");
        ei_encode_list_header(buf, &i, (int)n);
    }
    for (size_t k = 0; k < n; k++) {
        size_t len;
        const char *d = moat_term_data(args[k], &len);
        if (n > 1)
            ei_encode_tuple_header(buf, &i, 3);
        ei_encode_ulonglong(buf, &i, moat_task_id(ts[k]));
        ei_encode_atom(buf, &i, task);
        if (buf != NULL)
            memcpy(buf + i, d + 1, len - 1);
        i += (int)(len - 1);
    }
    if (n > 1)
        ei_encode_empty_list(buf, &i);
    return i;
}

static void cancel_send(ErlNifEnv *env, npool_t *np, const cancel_t *c);

static wire_t *wire_of(moat_task_t *t) {
    int *kind = moat_task_data(t);
    return *kind == K_TASK ? &((ntask_t *)(void *)kind)->wire
                           : &((sslot_t *)(void *)kind)->wire;
}

/* The task's run frame is out: from now on a cancel may go to the port
 * from anywhere.  One that came first is sent now, after it. */
static void wire_sent(ErlNifEnv *env, npool_t *np, moat_task_t *t) {
    wire_t *w = wire_of(t);
    int unsent = WIRE_UNSENT;
    if (!atomic_compare_exchange_strong(&w->state, &unsent, WIRE_SENT)) {
        cancel_t c = {moat_task_id(t), w->reason};
        cancel_send(env, np, &c);
    }
}

/* Sends one ETF frame to the pool's C-node from a process-bound env.  A
 * port that is gone is not an error here: its owner sees it end and
 * every task the C-node held gets cnode_down.  Over distribution a NIF
 * cannot reach a remote node: the owner relays the frame, as
 * {moat_cnode_send, Frame}.  It is one process, so the frames of each
 * sender keep their order (a cancel still follows its run frame). */
static void port_send(ErlNifEnv *env, npool_t *np, ErlNifBinary *bin) {
    if (np->dist)
        enif_send(env, &np->owner, NULL,
                  enif_make_tuple2(env, atom_moat_cnode_send,
                                   enif_make_binary(env, bin)));
    else
        enif_port_command(env, &np->port, NULL, enif_make_binary(env, bin));
}

/* Sends the run frame of tasks just accepted.  On out of memory the
 * tasks end here with enomem instead. */
static void remote_send(ErlNifEnv *env, npool_t *np, const char *task,
                        size_t n, moat_task_t *const *ts,
                        moat_term_t *const *args) {
    ErlNifBinary bin;
    if (n == 0)
        return;
    if (!enif_alloc_binary((size_t)run_frame(NULL, task, n, ts, args), &bin)) {
        for (size_t k = 0; k < n; k++)
            moat_pool_remote_done(np->pool, moat_task_id(ts[k]), MOAT_EXIT,
                                  moat_atom(MOAT_A_ENOMEM));
        return;
    }
    run_frame((char *)bin.data, task, n, ts, args);
    port_send(env, np, &bin);
    for (size_t k = 0; k < n; k++)
        wire_sent(env, np, ts[k]);
}

/* {cancel, Tag, Reason} */
static void cancel_send(ErlNifEnv *env, npool_t *np, const cancel_t *c) {
    static const char *names[MOAT_A__COUNT] = {
        [MOAT_A_SHUTDOWN] = "shutdown", [MOAT_A_KILLED] = "killed",
        [MOAT_A_TIMEOUT] = "timeout"};
    ErlNifBinary bin;
    int i = 0;
    char buf[64];
    ei_encode_version(buf, &i);
    ei_encode_tuple_header(buf, &i, 3);
    ei_encode_atom(buf, &i, "cancel");
    ei_encode_ulonglong(buf, &i, c->id);
    ei_encode_atom(buf, &i, names[c->reason]);
    if (!enif_alloc_binary((size_t)i, &bin))
        return; /* the body runs on; its late report is dropped */
    memcpy(bin.data, buf, (size_t)i);
    port_send(env, np, &bin);
}

/* The core's remote_cancel: a C-node task's outcome was decided here.
 * From a process-bound NIF call the cancel goes to the port at once, so
 * it follows that process's run frame; from any other thread (deadline,
 * janitor) it is left to the caller if its run frame is not out yet
 * (wire_t), else it waits in the outbox, and the owner, told once, sends
 * it. */
static void on_remote_cancel(moat_task_t *t, moat_term_t *reason, void *data) {
    npool_t *np = data;
    cancel_t c = {moat_task_id(t), MOAT_A_SHUTDOWN};
    wire_t *w;
    int tell = 0, unsent = WIRE_UNSENT;
    if (moat_term_is(reason, MOAT_A_TIMEOUT))
        c.reason = MOAT_A_TIMEOUT;
    else if (moat_term_is(reason, MOAT_A_KILLED))
        c.reason = MOAT_A_KILLED;
    if (tl_port_env != NULL) {
        cancel_send(tl_port_env, np, &c);
        return;
    }
    w = wire_of(t);
    w->reason = c.reason;
    if (atomic_compare_exchange_strong(&w->state, &unsent, WIRE_CANCELLED))
        return; /* the caller sends it after the run frame */
    uv_mutex_lock(&np->out_lock);
    if (np->nout == np->capout) {
        size_t cap = np->capout ? np->capout * 2 : 16;
        cancel_t *o = realloc(np->out, cap * sizeof *o);
        if (o != NULL) {
            np->out = o;
            np->capout = cap;
        }
    }
    if (np->nout < np->capout)
        np->out[np->nout++] = c;
    if (!np->out_told) {
        np->out_told = 1;
        tell = 1;
    }
    uv_mutex_unlock(&np->out_lock);
    if (tell) {
        ErlNifEnv *env = msg_env_get();
        send_msg(&np->owner, env,
                 enif_make_tuple2(env, atom_moat_cnode_out, np->name));
        msg_env_put(env);
    }
}

/* ------------------------------------------------------------ helpers */

static ERL_NIF_TERM error_tuple(ErlNifEnv *env, ERL_NIF_TERM reason) {
    return enif_make_tuple2(env, atom_error, reason);
}

/* Timeout in ms: a non-negative integer or `infinity` (-1). */
static int get_timeout(ErlNifEnv *env, ERL_NIF_TERM t, int64_t *ms) {
    ErlNifSInt64 v;
    if (enif_is_identical(t, atom_infinity)) {
        *ms = -1;
        return 1;
    }
    if (!enif_get_int64(env, t, &v) || v < 0)
        return 0;
    *ms = v;
    return 1;
}

/* Encodes a term as ETF into a core term.  NULL on out of memory. */
static moat_term_t *encode(ErlNifEnv *env, ERL_NIF_TERM t) {
    ErlNifBinary bin;
    moat_term_t *term;
    if (!enif_term_to_binary(env, t, &bin))
        return NULL;
    term = moat_term_new((const char *)bin.data, bin.size, NULL);
    enif_release_binary(&bin);
    return term;
}

/* ----------------------------------------------------------- NIFs: pool */

/* Wraps a started npool_t in a handle and registers it under its name,
 * unless a live pool has the name.  Returns {ok, Handle} or
 * {error, Reason}; on an error the pool is closed (or freed). */
static ERL_NIF_TERM pool_publish(ErlNifEnv *env, npool_t *np) {
    pool_res_t *res;
    ERL_NIF_TERM ret;
    res = enif_alloc_resource(pool_rt, sizeof *res);
    if (res == NULL) {
        moat_pool_free(np->pool); /* no task yet: joins at once */
        np_discard(np);
        return error_tuple(env, atom_enomem);
    }
    res->np = np; /* the handle now owns the npool_t's first reference */
    ret = enif_make_resource(env, res);

    /* Register, unless a live pool has the name.  One whose owner is dead
     * but whose `down` has not run yet gives way. */
    uv_rwlock_wrlock(&reg_lock);
    for (size_t i = 0; i < nreg; i++) {
        if (reg[i].name != np->name)
            continue;
        if (enif_is_process_alive(env, &reg[i].res->np->owner)) {
            ERL_NIF_TERM pid = enif_make_pid(env, &reg[i].res->np->owner);
            uv_rwlock_wrunlock(&reg_lock);
            moat_pool_close(np->pool);
            enif_release_resource(res);
            return error_tuple(env,
                               enif_make_tuple2(env, atom_already_started, pid));
        }
        /* Close it here: its `down` may never run once the registry lets
         * go of its handle. */
        np_ref(reg[i].res->np);
        tl_caller_env = env; /* for jobq_push's inline fallback */
        jobq_push(&janitor, JOB_CLOSE, reg[i].res->np, 0, NULL);
        tl_caller_env = NULL;
        enif_release_resource(reg[i].res);
        reg[i] = reg[--nreg];
        break;
    }
    if (nreg == capreg) {
        size_t cap = capreg ? capreg * 2 : 8;
        reg_entry_t *r = realloc(reg, cap * sizeof *r);
        if (r == NULL) {
            uv_rwlock_wrunlock(&reg_lock);
            moat_pool_close(np->pool);
            enif_release_resource(res);
            return error_tuple(env, atom_enomem);
        }
        reg = r;
        capreg = cap;
    }
    reg[nreg].name = np->name;
    reg[nreg].res = res; /* keeps the creation reference */
    nreg++;
    uv_rwlock_wrunlock(&reg_lock);
    enif_monitor_process(env, res, &np->owner, NULL);
    return enif_make_tuple2(env, atom_ok, ret);
}

/* Starts the core pool of a filled npool_t (np->size threads, or for a
 * C-node pool none, with np->size still sizing admission) and publishes
 * it; on failure everything is freed.  Returns as pool_publish. */
static ERL_NIF_TERM pool_start(ErlNifEnv *env, npool_t *np, const char *name,
                               unsigned max_queue) {
    moat_pool_opts_t opts;
    int rc;
    memset(&opts, 0, sizeof opts);
    opts.nthreads = np->size;
    opts.max_queue = max_queue;
    opts.name = name;
    opts.complete = on_complete;
    opts.data = np;
    opts.thread_start = thread_start;
    opts.thread_stop = thread_stop;
    opts.remote = np->remote;
    opts.remote_cancel = np->remote ? on_remote_cancel : NULL;
    /* Latencies are statistics: a pool without them still works. */
    np->lat = aligned_alloc(64, LAT_SHARDS * sizeof *np->lat);
    if (np->lat != NULL)
        memset(np->lat, 0, LAT_SHARDS * sizeof *np->lat);
    if ((rc = moat_pool_new(&opts, &np->pool)) != 0) {
        ERL_NIF_TERM ret = error_tuple(env, enif_make_atom(env, moat_err_name(rc)));
        np_discard(np);
        return ret;
    }
    return pool_publish(env, np);
}

/* pool_new(Name :: atom(), Size :: pos_integer(), MaxQueue :: pos_integer(),
 *          Libs :: [iodata()]) ->
 *     {ok, Handle} | {error, {already_started, pid()}}
 *   | {error, {bad_library, binary()}} | {error, atom()}
 * Called by the pool's owner process, which the pool then monitors.
 * Dirty (it opens libraries and starts threads). */
static ERL_NIF_TERM nif_pool_new(ErlNifEnv *env, int argc,
                                 const ERL_NIF_TERM argv[]) {
    unsigned size, max_queue, nlibs;
    ERL_NIF_TERM list = argv[3], head, ret;
    char name[256];
    npool_t *np;
    size_t ntasks = 0;
    int rc;
    (void)argc;
    if (!enif_get_atom(env, argv[0], name, sizeof name, ERL_NIF_LATIN1) ||
        !enif_get_uint(env, argv[1], &size) || size == 0 ||
        !enif_get_uint(env, argv[2], &max_queue) || max_queue == 0 ||
        !enif_get_list_length(env, list, &nlibs))
        return enif_make_badarg(env);
    np = calloc(1, sizeof *np);
    if (np == NULL || uv_mutex_init(&np->mon_lock) != 0) {
        free(np);
        return error_tuple(env, atom_enomem);
    }
    atomic_init(&np->refs, 1);
    np->name = argv[0];
    np->size = size;
    enif_self(env, &np->owner);
    np->libs = calloc(nlibs ? nlibs : 1, sizeof *np->libs);
    if (np->libs == NULL) {
        ret = error_tuple(env, atom_enomem);
        goto fail;
    }
    while (enif_get_list_cell(env, list, &head, &list)) {
        ErlNifBinary path;
        char *cpath, *msg = NULL;
        if (!enif_inspect_iolist_as_binary(env, head, &path)) {
            ret = enif_make_badarg(env);
            goto fail;
        }
        cpath = malloc(path.size + 1);
        if (cpath == NULL) {
            ret = error_tuple(env, atom_enomem);
            goto fail;
        }
        memcpy(cpath, path.data, path.size);
        cpath[path.size] = 0;
        rc = moat_lib_open(cpath, &np->libs[np->nlibs], &msg);
        free(cpath);
        if (rc != 0) {
            const char *m = msg != NULL ? msg : moat_strerror(rc);
            ERL_NIF_TERM bin;
            memcpy(enif_make_new_binary(env, strlen(m), &bin), m, strlen(m));
            free(msg);
            ret = error_tuple(env, enif_make_tuple2(env, atom_bad_library, bin));
            goto fail;
        }
        for (const moat_task_def_t *d = moat_lib_def(np->libs[np->nlibs])->tasks;
             d->name != NULL; d++)
            ntasks++;
        np->nlibs++;
    }
    np->ntask_cap = 8;
    while (np->ntask_cap < ntasks * 2)
        np->ntask_cap *= 2;
    np->tasks = calloc(np->ntask_cap, sizeof *np->tasks);
    if (np->tasks == NULL) {
        ret = error_tuple(env, atom_enomem);
        goto fail;
    }
    /* Earlier libraries win a name two of them export. */
    for (size_t l = 0; l < np->nlibs; l++) {
        for (const moat_task_def_t *d = moat_lib_def(np->libs[l])->tasks;
             d->name != NULL; d++) {
            ERL_NIF_TERM a = enif_make_atom(env, d->name);
            task_entry_t *e = task_slot(np, a);
            if (e->name == 0) {
                e->name = a;
                e->def = d;
                e->lib = np->libs[l];
            }
        }
    }
    return pool_start(env, np, name, max_queue);
fail:
    np_discard(np);
    return ret;
}

/* pool_close(Handle) -> ok
 * Unregisters the pool, gives every pending task its `shutdown` outcome,
 * stops the native supervisor (its servers in reverse order, each within
 * its shutdown time, on the threads the tasks freed), then closes the
 * pool; threads are joined later, by the reaper.
 * Dirty: settling a full queue sends one message per task. */
static ERL_NIF_TERM nif_pool_close(ErlNifEnv *env, int argc,
                                   const ERL_NIF_TERM argv[]) {
    pool_res_t *res, *reg_res;
    (void)argc;
    if (!enif_get_resource(env, argv[0], pool_rt, (void **)&res))
        return enif_make_badarg(env);
    /* No new work from here on; then the tasks end, freeing the threads
     * the servers need to stop in order, each running terminate. */
    reg_res = reg_remove(res->np);
    tl_caller_env = env;
    moat_pool_drain(res->np->pool, MOAT_A_SHUTDOWN);
    sup_stop(env, res->np);
    moat_pool_close(res->np->pool);
    tl_caller_env = NULL;
    if (reg_res != NULL)
        enif_release_resource(reg_res);
    return atom_ok;
}

#define STAT(field) \
    enif_make_map_put(env, map, atom_##field, enif_make_uint64(env, st.field), &map)

/* pool_stats(Name :: atom()) -> map() | {error, not_found} */
static ERL_NIF_TERM nif_pool_stats(ErlNifEnv *env, int argc,
                                   const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    moat_pool_stats_t st;
    ERL_NIF_TERM map = enif_make_new_map(env), lat, failed_by;
    unsigned size;
    int res_remote;
    uint64_t remote_restarts;
    (void)argc;
    if (!enif_is_atom(env, argv[0]))
        return enif_make_badarg(env);
    if ((res = reg_find(argv[0])) == NULL)
        return error_tuple(env, atom_not_found);
    moat_pool_stats(res->np->pool, &st);
    size = res->np->size;
    if (res->np->remote && st.running > size) {
        /* The C-node runs `size` at a time; the rest wait there. */
        st.queued = st.running - size;
        st.running = size;
    }
    lat = latency_map(env, res->np);
    failed_by = failed_by_map(env, res->np);
    res_remote = res->np->remote;
    remote_restarts = atomic_load(&res->np->remote_restarts);
    reg_done();
    STAT(queued);
    STAT(running);
    STAT(completed);
    STAT(failed);
    STAT(cancelled);
    STAT(timeouts);
    STAT(rejected);
    STAT(abandoned);
    STAT(threads);
    if (res_remote)
        st.restarts += remote_restarts;
    STAT(restarts);
    enif_make_map_put(env, map, atom_size, enif_make_uint(env, size), &map);
    enif_make_map_put(env, map, atom_latency_ns, lat, &map);
    enif_make_map_put(env, map, atom_failed_by, failed_by, &map);
    return map;
}

/* pool_owner(Name :: atom()) -> pid() | undefined */
static ERL_NIF_TERM nif_pool_owner(ErlNifEnv *env, int argc,
                                   const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    ERL_NIF_TERM pid;
    (void)argc;
    if (!enif_is_atom(env, argv[0]))
        return enif_make_badarg(env);
    if ((res = reg_find(argv[0])) == NULL)
        return atom_undefined;
    pid = enif_make_pid(env, &res->np->owner);
    reg_done();
    return pid;
}

/* cnode_pool_new(Name :: atom(), Size :: pos_integer(),
 *                MaxQueue :: pos_integer(), Port :: port() | distribution,
 *                Tasks :: [atom()], ServerIds :: [term()]) ->
 *     {ok, Handle} | {error, {already_started, pid()}} | {error, atom()}
 * A pool whose bodies run in the C-node behind Port, which listed Tasks,
 * and whose native servers, if any, run there too, ServerIds in the order
 * of hello's `servers' (frames name a server by its index).
 * The calling process is its owner: Port must be connected to it, since
 * outcomes come back as its port data (cnode_deliver).  With
 * `distribution' the owner relays the frames ({moat_cnode_send, Frame})
 * and hands over those that come back.  Dirty (it starts the pool's
 * housekeeping thread). */
static ERL_NIF_TERM nif_cnode_pool_new(ErlNifEnv *env, int argc,
                                       const ERL_NIF_TERM argv[]) {
    unsigned size, max_queue, ntasks, nids = 0;
    ERL_NIF_TERM list = argv[4], head, ret;
    servers_t *sv = NULL;
    char name[256];
    npool_t *np;
    size_t cap;
    (void)argc;
    if (!enif_get_atom(env, argv[0], name, sizeof name, ERL_NIF_LATIN1) ||
        !enif_get_uint(env, argv[1], &size) || size == 0 ||
        !enif_get_uint(env, argv[2], &max_queue) || max_queue == 0 ||
        (!enif_is_port(env, argv[3]) &&
         !enif_is_identical(argv[3], atom_distribution)) ||
        !enif_get_list_length(env, list, &ntasks) ||
        !enif_get_list_length(env, argv[5], &nids))
        return enif_make_badarg(env);
    if (nids > 0) {
        ERL_NIF_TERM ids = argv[5];
        sv = calloc(1, sizeof *sv + nids * sizeof sv->ids[0]);
        if (sv == NULL || (sv->env = enif_alloc_env()) == NULL) {
            free(sv);
            return error_tuple(env, atom_enomem);
        }
        while (enif_get_list_cell(env, ids, &head, &ids))
            sv->ids[sv->n++].id = enif_make_copy(sv->env, head);
    }
    np = calloc(1, sizeof *np);
    if (np == NULL || uv_mutex_init(&np->mon_lock) != 0) {
        free(np);
        servers_free(sv);
        return error_tuple(env, atom_enomem);
    }
    if (uv_mutex_init(&np->out_lock) != 0) {
        uv_mutex_destroy(&np->mon_lock);
        free(np);
        servers_free(sv);
        return error_tuple(env, atom_enomem);
    }
    np->remote = 1;
    atomic_init(&np->refs, 1);
    np->name = argv[0];
    np->size = size;
    enif_self(env, &np->owner);
    np->dist = enif_is_identical(argv[3], atom_distribution);
    if (!np->dist && !enif_get_local_port(env, argv[3], &np->port)) {
        ret = enif_make_badarg(env);
        goto fail;
    }
    cap = 8;
    while (cap < (size_t)ntasks * 2)
        cap *= 2;
    if ((np->tasks = calloc(cap, sizeof *np->tasks)) == NULL) {
        ret = error_tuple(env, atom_enomem);
        goto fail;
    }
    np->ntask_cap = cap; /* np_discard walks it from here on */
    while (enif_get_list_cell(env, list, &head, &list)) {
        char tname[256];
        task_entry_t *e;
        if (!enif_get_atom(env, head, tname, sizeof tname, ERL_NIF_LATIN1)) {
            ret = enif_make_badarg(env);
            goto fail;
        }
        e = task_slot(np, head);
        if (e->name != 0)
            continue; /* an earlier library's */
        if ((e->cname = strdup(tname)) == NULL) {
            ret = error_tuple(env, atom_enomem);
            goto fail;
        }
        e->name = head;
    }
    atomic_store(&np->servers, sv); /* np_free frees it from here on */
    return pool_start(env, np, name, max_queue);
fail:
    np_discard(np);
    servers_free(sv);
    return ret;
}

static npool_t *cnode_pool(ErlNifEnv *env, ERL_NIF_TERM t) {
    pool_res_t *res;
    if (!enif_get_resource(env, t, pool_rt, (void **)&res) || !res->np->remote)
        return NULL;
    return res->np;
}

/* One entry of a done frame, {Tag, ok | exit, Term}: settles the task.
 * Returns 0, or -1 on a malformed entry. */
static int deliver_done(npool_t *np, const char *buf, int *i) {
    EI_ULONGLONG tag;
    char kind[8];
    int arity, start;
    moat_term_t *term;
    if (ei_decode_tuple_header(buf, i, &arity) != 0 || arity != 3 ||
        ei_decode_ulonglong(buf, i, &tag) != 0 ||
        ei_decode_atom_as(buf, i, kind, sizeof kind, ERLANG_UTF8, NULL,
                          NULL) != 0 ||
        (strcmp(kind, "ok") != 0 && strcmp(kind, "exit") != 0))
        return -1;
    start = *i;
    if (ei_skip_term(buf, i) != 0)
        return -1;
    if ((term = moat_term_bare(buf + start, (size_t)(*i - start))) == NULL) {
        moat_pool_remote_done(np->pool, tag, MOAT_EXIT,
                              moat_atom(MOAT_A_ENOMEM));
        return 0;
    }
    moat_pool_remote_done(np->pool, tag, kind[0] == 'o' ? MOAT_OK : MOAT_EXIT,
                          term);
    moat_term_unref(term);
    return 0;
}

/* The list of a done or stopped frame.  Returns 0 or -1 (malformed; the
 * entries before the fault have been handled). */
static int deliver_list(npool_t *np, const char *buf, int *i, int done) {
    int type, n;
    if (ei_get_type(buf, i, &type, &n) != 0)
        return -1;
    if (type == ERL_NIL_EXT)
        return 0;
    if (type == ERL_STRING_EXT && !done) {
        /* Tags all below 256, encoded by ei as a string of bytes. */
        const unsigned char *p = (const unsigned char *)buf + *i + 3;
        for (int k = 0; k < n; k++)
            moat_pool_remote_done(np->pool, p[k], 0, NULL);
        return ei_skip_term(buf, i);
    }
    if (type != ERL_LIST_EXT || ei_decode_list_header(buf, i, &n) != 0)
        return -1;
    for (int k = 0; k < n; k++) {
        EI_ULONGLONG tag;
        if (done) {
            if (deliver_done(np, buf, i) != 0)
                return -1;
        } else {
            if (ei_decode_ulonglong(buf, i, &tag) != 0)
                return -1;
            moat_pool_remote_done(np->pool, tag, 0, NULL);
        }
    }
    return 0;
}

/* cnode_deliver(Handle, Frame :: binary()) ->
 *     ok | {other, term()} | {error, bad_frame}
 * A packet of the pool's C-node, from its owner.  done and stopped frames
 * settle their tasks here, each outcome sent to its caller from the
 * owner's process; {restarts, Total} sets what stats/1 reports as the
 * native supervisor's restarts; any other well-formed frame comes back
 * decoded for the owner to handle.  Nothing in the frame is trusted: it
 * is checked whole before it is read. */
static ERL_NIF_TERM nif_cnode_deliver(ErlNifEnv *env, int argc,
                                      const ERL_NIF_TERM argv[]) {
    npool_t *np = cnode_pool(env, argv[0]);
    ErlNifBinary bin;
    const char *buf;
    char what[16] = "";
    int i = 0, version, arity = 0, rc;
    ErlNifBinaryToTerm safe;
    ERL_NIF_TERM t;
    (void)argc;
    if (np == NULL || !enif_inspect_binary(env, argv[1], &bin))
        return enif_make_badarg(env);
    buf = (const char *)bin.data;
    if (bin.size > INT32_MAX || moat_etf_check(buf, bin.size) != 0)
        return error_tuple(env, atom_bad_frame);
    if (ei_decode_version(buf, &i, &version) == 0 &&
        ei_decode_tuple_header(buf, &i, &arity) == 0 && arity == 2 &&
        ei_decode_atom_as(buf, &i, what, sizeof what, ERLANG_UTF8, NULL,
                          NULL) == 0 &&
        (strcmp(what, "done") == 0 || strcmp(what, "stopped") == 0)) {
        tl_caller_env = env;
        rc = deliver_list(np, buf, &i, what[0] == 'd');
        tl_caller_env = NULL;
        return rc == 0 ? atom_ok : error_tuple(env, atom_bad_frame);
    }
    if (arity == 2 && strcmp(what, "restarts") == 0) {
        EI_ULONGLONG n;
        if (ei_decode_ulonglong(buf, &i, &n) != 0)
            return error_tuple(env, atom_bad_frame);
        atomic_store(&np->remote_restarts, n);
        return atom_ok;
    }
    /* The other frames create no atoms, but gave_up, which ends the pool
     * and must not be lost for an atom the VM lacks: its reason may name
     * any signal, {native_crash, sigxcpu}, as task outcomes may. */
    safe = arity == 2 && strcmp(what, "gave_up") == 0 ? 0 : ERL_NIF_BIN2TERM_SAFE;
    if (enif_binary_to_term(env, bin.data, bin.size, &t, safe) == 0)
        return error_tuple(env, atom_bad_frame);
    return enif_make_tuple2(env, atom_other, t);
}

/* cnode_flush(Handle) -> ok
 * Sends the C-node the cancels decided away from its callers' processes
 * (deadlines, dead callers); the owner calls it on moat_cnode_out. */
static ERL_NIF_TERM nif_cnode_flush(ErlNifEnv *env, int argc,
                                    const ERL_NIF_TERM argv[]) {
    npool_t *np = cnode_pool(env, argv[0]);
    cancel_t *out;
    size_t n;
    (void)argc;
    if (np == NULL)
        return enif_make_badarg(env);
    uv_mutex_lock(&np->out_lock);
    out = np->out;
    n = np->nout;
    np->out = NULL;
    np->nout = np->capout = 0;
    np->out_told = 0;
    uv_mutex_unlock(&np->out_lock);
    for (size_t k = 0; k < n; k++)
        cancel_send(env, np, &out[k]);
    free(out);
    return atom_ok;
}

/* cnode_lost(Handle, Reason :: term()) -> ok
 * The pool's C-node is gone: the pool is unregistered (new tasks get
 * noproc) and every task it held ends with Reason ({native_crash,
 * cnode_down}, noconnection over distribution). */
static ERL_NIF_TERM nif_cnode_lost(ErlNifEnv *env, int argc,
                                   const ERL_NIF_TERM argv[]) {
    npool_t *np = cnode_pool(env, argv[0]);
    pool_res_t *reg_res;
    moat_term_t *down;
    if (np == NULL)
        return enif_make_badarg(env);
    reg_res = reg_remove(np);
    (void)argc;
    down = encode(env, argv[1]);
    tl_caller_env = env;
    moat_pool_remote_lost(np->pool, down != NULL ? down : moat_atom(MOAT_A_ENOMEM));
    tl_caller_env = NULL;
    moat_term_unref(down);
    if (reg_res != NULL)
        enif_release_resource(reg_res);
    return atom_ok;
}

static void pool_dtor(ErlNifEnv *env, void *obj) {
    (void)env;
    np_unref(((pool_res_t *)obj)->np);
}

static void pool_down(ErlNifEnv *env, void *obj, ErlNifPid *pid,
                      ErlNifMonitor *mon) {
    pool_res_t *res = obj;
    npool_t *np = res->np;
    (void)env;
    (void)mon;
    if (enif_compare_pids(pid, &np->owner) == 0) {
        /* The owner died without closing the pool: close it now, off
         * the scheduler. */
        pool_res_t *reg_res = reg_remove(np);
        np_ref(np);
        tl_caller_env = env; /* for jobq_push's inline fallback */
        jobq_push(&janitor, JOB_CLOSE, np, 0, NULL);
        tl_caller_env = NULL;
        if (reg_res != NULL)
            enif_release_resource(reg_res);
        return;
    }
    mon_remove(np, pid_key(pid));
    np_ref(np);
    tl_caller_env = env; /* for jobq_push's inline fallback */
    jobq_push(&janitor, JOB_CANCEL_OWNER, np, pid_key(pid), NULL);
    tl_caller_env = NULL;
}

/* ---------------------------------------------------------- NIFs: tasks */

/* Gives a task that will never reach the pool its DOWN at once (and its
 * proxy the reason), from the caller's own process. */
static void refuse(ErlNifEnv *env, ntask_t *nt, ERL_NIF_TERM reason) {
    ErlNifEnv *menv = enif_alloc_env();
    ERL_NIF_TERM msg;
    msg = enif_make_tuple5(menv, atom_DOWN, enif_make_resource(menv, nt),
                           atom_process, task_id_term(menv, nt, 0),
                           enif_make_copy(menv, reason));
    enif_send(env, &nt->owner, menv, msg);
    if (!enif_is_pid_undefined(&nt->proxy)) {
        enif_clear_env(menv);
        enif_send(env, &nt->proxy, menv,
                  enif_make_tuple2(menv, atom_moat_task_done,
                                   enif_make_copy(menv, reason)));
    }
    enif_free_env(menv);
}

/* A new task of pool `pool_name`, owned by the caller, in `state`; *ref is
 * its term, which holds the only reference.  NULL on out of memory. */
static ntask_t *ntask_new(ErlNifEnv *env, ERL_NIF_TERM pool_name,
                          const ErlNifPid *proxy, int state,
                          ERL_NIF_TERM *ref) {
    ntask_t *nt = enif_alloc_resource(task_rt, sizeof *nt);
    if (nt == NULL)
        return NULL;
    memset(nt, 0, sizeof *nt);
    nt->kind = K_TASK;
    atomic_init(&nt->state, state);
    nt->pool_name = pool_name;
    enif_self(env, &nt->owner);
    if (proxy != NULL)
        nt->proxy = *proxy;
    else
        enif_set_pid_undefined(&nt->proxy);
    *ref = enif_make_resource(env, nt);
    enif_release_resource(nt); /* the term holds it now */
    return nt;
}

/* Makes a task and submits it: argv is Pool, Task, Args, Timeout.  The
 * task starts in `state`.  Returns its term (a reference) and sets *ntp;
 * *refusal is the reason the task never reached a pool (then nothing was
 * sent yet), or 0.  Returns 0 after raising an exception. */
static ERL_NIF_TERM task_start(ErlNifEnv *env, const ERL_NIF_TERM argv[],
                               const ErlNifPid *proxy, int state,
                               ntask_t **ntp, ERL_NIF_TERM *refusal) {
    ntask_t *nt;
    pool_res_t *res;
    const task_entry_t *te;
    moat_job_t job;
    int64_t timeout_ms;
    unsigned nargs;
    ERL_NIF_TERM ref;
    int rc;
    *refusal = 0;
    if (!enif_is_atom(env, argv[0]) || !enif_is_atom(env, argv[1]) ||
        !enif_get_list_length(env, argv[2], &nargs) ||
        !get_timeout(env, argv[3], &timeout_ms))
        return enif_make_badarg(env);
    if ((nt = ntask_new(env, argv[0], proxy, state, &ref)) == NULL)
        return enif_raise_exception(env, atom_enomem);
    *ntp = nt;
    /* Encoded before the registry's lock is taken: a large argument list
     * must not hold up a pool being closed. */
    if ((job.args = encode(env, argv[2])) == NULL)
        return enif_raise_exception(env, atom_enomem);

    if ((res = reg_find(argv[0])) == NULL) {
        *refusal = atom_noproc;
    } else if ((te = task_find(res->np, argv[1])) == NULL) {
        reg_done();
        *refusal = enif_make_tuple2(env, atom_unknown_task, argv[1]);
    } else {
        npool_t *np = res->np;
        job.fn = np->remote ? NULL : te->def->run;
        job.name = np->remote ? te->cname : te->def->name;
        job.lib = te->lib;
        job.owner = pid_key(&nt->owner);
        job.timeout_ms = timeout_ms;
        job.data = nt;
        watch_caller(env, res, &nt->owner);
        nt->np = np;
        np_ref(np);
        enif_keep_resource(nt); /* for the callback */
        if (np->remote) {
            rc = moat_pool_accept(np->pool, &job, 1, &nt->t);
            rc = rc == 1 ? 0 : rc;
        } else {
            rc = moat_pool_submit(np->pool, &job, &nt->t);
        }
        reg_done();
        if (rc != 0) {
            enif_release_resource(nt);
            *refusal = rc == MOAT_EOVERLOADED ? atom_overloaded : atom_noproc;
        } else if (np->remote) {
            /* The task holds the args: they are read once more here. */
            tl_caller_env = tl_port_env = env;
            remote_send(env, np, te->cname, 1, &nt->t, &job.args);
            tl_caller_env = tl_port_env = NULL;
            job.args = NULL;
        } else {
            job.args = NULL; /* the pool's now */
        }
    }
    if (job.args != NULL)
        moat_term_unref(job.args);
    if (*refusal != 0)
        atomic_store(&nt->state, T_SENT);
    return ref;
}

/* async(Pool :: atom(), Task :: atom(), Args :: list(),
 *       Timeout :: non_neg_integer() | infinity, Proxy :: pid() | undefined)
 *     -> {Ref, Id}
 * Ref is the task (a reference); exactly one message about it follows. */
static ERL_NIF_TERM nif_async(ErlNifEnv *env, int argc,
                              const ERL_NIF_TERM argv[]) {
    ErlNifPid proxy;
    ntask_t *nt = NULL;
    ERL_NIF_TERM ref, refusal;
    int linked = enif_get_local_pid(env, argv[4], &proxy);
    (void)argc;
    if (!linked && !enif_is_identical(argv[4], atom_undefined))
        return enif_make_badarg(env);
    ref = task_start(env, argv, linked ? &proxy : NULL, T_OPEN, &nt, &refusal);
    if (nt == NULL || enif_is_exception(env, ref))
        return ref;
    if (refusal != 0)
        refuse(env, nt, refusal);
    else if (linked && enif_monitor_process(env, nt, &proxy, NULL) > 0)
        task_down(env, nt, &proxy, NULL); /* the proxy is gone already */
    return enif_make_tuple2(env, ref,
                            task_id_term(env, nt, nt->t ? moat_task_id(nt->t) : 0));
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* How long run/4 waits on the scheduler for an outcome before it falls
 * back to a message: about ten pool round trips.  A scheduler woken by a
 * message costs several microseconds; a short task is back sooner. */
#define RUN_SPIN_NS 5000

/* An outcome as {ok, Value} | {exit, Reason}. */
static ERL_NIF_TERM outcome_term(ErlNifEnv *env, int kind,
                                 const moat_term_t *term) {
    size_t len;
    const char *d = moat_term_data(term, &len);
    ERL_NIF_TERM v;
    if (enif_binary_to_term(env, (const unsigned char *)d, len, &v, 0) == 0) {
        kind = MOAT_EXIT;
        v = bad_result(env);
    }
    return enif_make_tuple2(env, kind == MOAT_OK ? atom_ok : atom_exit, v);
}

/* The outcome of a task started in T_SPIN, if it comes within
 * RUN_SPIN_NS, else {wait, Ref}: it will come as a message.  A C-node's
 * outcome is not waited for: it reaches the NIF through a message to the
 * pool's owner, which a scheduler must run first (often this one), and a
 * round trip through a C-node takes longer than the spin anyway. */
static ERL_NIF_TERM spin_outcome(ErlNifEnv *env, ntask_t *nt,
                                 ERL_NIF_TERM ref) {
    ERL_NIF_TERM out;
    int spin = T_SPIN;
    if (nt->np == NULL || !nt->np->remote) {
        uint64_t end = uv_hrtime() + RUN_SPIN_NS;
        for (unsigned i = 1; atomic_load(&nt->state) == T_SPIN; i++) {
            cpu_relax();
            if ((i & 15) == 0 && uv_hrtime() >= end)
                break;
        }
    }
    if (atomic_compare_exchange_strong(&nt->state, &spin, T_OPEN))
        return enif_make_tuple2(env, atom_wait, ref);
    out = outcome_term(env, nt->held_kind, nt->held); /* T_HELD */
    atomic_store(&nt->state, T_SENT);
    return out;
}

/* run(Pool, Task, Args, Timeout) -> {ok, Value} | {exit, Reason} | {wait, Ref}
 * Starts the task and waits a few microseconds for its outcome on the
 * scheduler.  {wait, Ref}: the outcome will come as a message, as for
 * async/5. */
static ERL_NIF_TERM nif_run(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    ntask_t *nt = NULL;
    ERL_NIF_TERM ref, refusal;
    (void)argc;
    ref = task_start(env, argv, NULL, T_SPIN, &nt, &refusal);
    if (nt == NULL || enif_is_exception(env, ref))
        return ref;
    if (refusal != 0)
        return enif_make_tuple2(env, atom_exit, refusal);
    return spin_outcome(env, nt, ref);
}

/* The resource `t` of type `rt` if the caller is its owner (the pid at
 * owner_off in it), else NULL: give-ups and streams are the owner's. */
static void *owned(ErlNifEnv *env, ERL_NIF_TERM t, ErlNifResourceType *rt,
                   size_t owner_off) {
    void *obj;
    ErlNifPid self;
    if (!enif_get_resource(env, t, rt, &obj))
        return NULL;
    enif_self(env, &self);
    return enif_compare_pids(&self, (ErlNifPid *)((char *)obj + owner_off)) == 0
               ? obj
               : NULL;
}

static ntask_t *owned_task(ErlNifEnv *env, ERL_NIF_TERM t) {
    return owned(env, t, task_rt, offsetof(ntask_t, owner));
}

/* task_cancel(Ref, Reason :: shutdown | killed) -> cancelled | delivered
 * Owner only.  `cancelled`: this call ended the task and no message about
 * it will come.  `delivered`: its message was sent before this call
 * returned (or the task was refused, ignored or cancelled before). */
static ERL_NIF_TERM nif_task_cancel(ErlNifEnv *env, int argc,
                                    const ERL_NIF_TERM argv[]) {
    ntask_t *nt = owned_task(env, argv[0]);
    moat_atom_t reason;
    int rc;
    (void)argc;
    if (nt == NULL)
        return enif_make_badarg(env);
    if (enif_is_identical(argv[1], atom_shutdown))
        reason = MOAT_A_SHUTDOWN;
    else if (enif_is_identical(argv[1], atom_killed))
        reason = MOAT_A_KILLED;
    else
        return enif_make_badarg(env);
    if (nt->t == NULL)
        return atom_delivered;
    tl_caller_env = tl_port_env = env; /* for a C-node task's cancel */
    rc = moat_task_cancel(nt->t, reason, MOAT_CANCEL_SILENT);
    tl_caller_env = tl_port_env = NULL;
    if (rc == 1) {
        atomic_store(&nt->state, T_CANCELLED);
        enif_release_resource(nt); /* the callback's, which will not run */
        return atom_cancelled;
    }
    return atom_delivered;
}

/* task_spin(Ref) -> boolean()
 * Owner only.  Waits a few microseconds on the scheduler for the task's
 * message to be sent; true when it is in the caller's mailbox.  Spares
 * await/2 a scheduler wake-up when a short task is about to finish. */
static ERL_NIF_TERM nif_task_spin(ErlNifEnv *env, int argc,
                                  const ERL_NIF_TERM argv[]) {
    ntask_t *nt = owned_task(env, argv[0]);
    uint64_t end;
    int st;
    (void)argc;
    if (nt == NULL)
        return enif_make_badarg(env);
    end = uv_hrtime() + RUN_SPIN_NS;
    for (unsigned i = 1;; i++) {
        st = atomic_load(&nt->state);
        if (st != T_OPEN && st != T_SENDING)
            break;
        cpu_relax();
        if ((i & 15) == 0 && uv_hrtime() >= end)
            break;
    }
    return st == T_SENT ? atom_true : atom_false;
}

/* task_running(Ref) -> boolean()
 * Whether the task's body is still on a thread (after a cancel). */
static ERL_NIF_TERM nif_task_running(ErlNifEnv *env, int argc,
                                     const ERL_NIF_TERM argv[]) {
    ntask_t *nt = owned_task(env, argv[0]);
    (void)argc;
    if (nt == NULL)
        return enif_make_badarg(env);
    return nt->t != NULL && moat_task_running(nt->t) ? atom_true : atom_false;
}

/* task_kill(Ref) -> ok
 * Owner only.  For a shutdown whose body outlived its timeout: a C-node
 * task whose body still runs is told `killed` after the `shutdown` it had,
 * which in process isolation is a real SIGKILL of its worker (the VM
 * decided the outcome already).  Otherwise nothing. */
static ERL_NIF_TERM nif_task_kill(ErlNifEnv *env, int argc,
                                  const ERL_NIF_TERM argv[]) {
    ntask_t *nt = owned_task(env, argv[0]);
    (void)argc;
    if (nt == NULL)
        return enif_make_badarg(env);
    if (nt->t != NULL && nt->np != NULL && nt->np->remote &&
        moat_task_running(nt->t)) {
        cancel_t c = {moat_task_id(nt->t), MOAT_A_KILLED};
        cancel_send(env, nt->np, &c); /* after this process's shutdown */
    }
    return atom_ok;
}

/* task_ignore(Ref) -> ignored | delivered
 * Owner only.  `ignored`: the task runs on and no message about it will
 * come.  `delivered`: its message was sent before this call returned. */
static ERL_NIF_TERM nif_task_ignore(ErlNifEnv *env, int argc,
                                    const ERL_NIF_TERM argv[]) {
    ntask_t *nt = owned_task(env, argv[0]);
    int open = T_OPEN;
    (void)argc;
    if (nt == NULL)
        return enif_make_badarg(env);
    if (atomic_compare_exchange_strong(&nt->state, &open, T_IGNORED))
        return atom_ignored;
    while (atomic_load(&nt->state) == T_SENDING)
        sched_yield(); /* a send in progress: a few microseconds */
    return atomic_load(&nt->state) == T_SENT ? atom_delivered : atom_ignored;
}

/* -------------------------------------------------------- NIFs: servers */

/* The escalate callback of a pool's native supervisor: it gave up (its
 * intensity reached, its servers stopped).  Tells the pool's owner, which
 * then exits so that the OTP supervisor above decides.  On a pool thread. */
static void on_gave_up(moat_pid_t sup, moat_term_t *reason, void *data) {
    npool_t *np = data;
    ErlNifEnv *env = msg_env_get();
    ERL_NIF_TERM r;
    size_t len;
    const char *d = moat_term_data(reason, &len);
    (void)sup;
    if (enif_binary_to_term(env, (const unsigned char *)d, len, &r, 0) == 0)
        r = atom_shutdown;
    send_msg(&np->owner, env,
             enif_make_tuple3(env, atom_moat_gave_up, np->name, r));
    msg_env_put(env);
}

/* The child_crashed callback of a pool's native supervisor: counts the
 * crash and keeps the last one's id and reason for the owner, which logs
 * and reports them (telemetry).  The owner is told once until it reads
 * them (pool_crashes), so a crash loop costs it one message per read.  On
 * the supervisor's thread. */
static void on_child_crashed(moat_pid_t sup, moat_term_t *id,
                             moat_term_t *reason, void *data) {
    npool_t *np = data;
    int tell = 0;
    (void)sup;
    moat_term_ref(id);
    moat_term_ref(reason);
    uv_mutex_lock(&np->mon_lock);
    np->ncrashed++;
    moat_term_unref(np->crash_id);
    moat_term_unref(np->crash_reason);
    np->crash_id = id;
    np->crash_reason = reason;
    if (!np->crash_told)
        tell = np->crash_told = 1;
    uv_mutex_unlock(&np->mon_lock);
    if (tell) {
        ErlNifEnv *env = msg_env_get();
        send_msg(&np->owner, env,
                 enif_make_tuple2(env, atom_moat_child_crashed, np->name));
        msg_env_put(env);
    }
}

/* A core term as an Erlang term, or `undefined`. */
static ERL_NIF_TERM core_term(ErlNifEnv *env, const moat_term_t *t) {
    ERL_NIF_TERM r;
    size_t len;
    const char *d;
    if (t == NULL)
        return atom_undefined;
    d = moat_term_data(t, &len);
    if (enif_binary_to_term(env, (const unsigned char *)d, len, &r, 0) == 0)
        return atom_undefined;
    return r;
}

/* pool_crashes(Handle) -> {Count, LastId, LastReason}
 * The native servers' crashes since the last call (Count 0 and
 * `undefined' when none); the next crash tells the owner again. */
static ERL_NIF_TERM nif_pool_crashes(ErlNifEnv *env, int argc,
                                     const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    npool_t *np;
    moat_term_t *id, *reason;
    uint64_t n;
    ERL_NIF_TERM ret;
    (void)argc;
    if (!enif_get_resource(env, argv[0], pool_rt, (void **)&res))
        return enif_make_badarg(env);
    np = res->np;
    uv_mutex_lock(&np->mon_lock);
    n = np->ncrashed;
    id = np->crash_id;
    reason = np->crash_reason;
    np->ncrashed = 0;
    np->crash_id = np->crash_reason = NULL;
    np->crash_told = 0;
    uv_mutex_unlock(&np->mon_lock);
    ret = enif_make_tuple3(env, enif_make_uint64(env, n), core_term(env, id),
                           core_term(env, reason));
    moat_term_unref(id);
    moat_term_unref(reason);
    return ret;
}

static void server_child_free(void *arg) {
    moat_server_child_t *c = arg;
    moat_term_unref(c->args);
    free(c);
}

static int get_restart(ERL_NIF_TERM t, moat_restart_t *r) {
    if (enif_is_identical(t, atom_permanent))
        *r = MOAT_PERMANENT;
    else if (enif_is_identical(t, atom_transient))
        *r = MOAT_TRANSIENT;
    else if (enif_is_identical(t, atom_temporary))
        *r = MOAT_TEMPORARY;
    else
        return 0;
    return 1;
}

static int get_shutdown(ErlNifEnv *env, ERL_NIF_TERM t, int *ms) {
    if (enif_is_identical(t, atom_brutal_kill))
        *ms = MOAT_SHUTDOWN_BRUTAL;
    else if (enif_is_identical(t, atom_infinity))
        *ms = MOAT_SHUTDOWN_INFINITY;
    else if (!enif_get_int(env, t, ms) || *ms < 0)
        return 0;
    return 1;
}

static int get_strategy(ERL_NIF_TERM t, moat_strategy_t *st) {
    if (enif_is_identical(t, atom_one_for_one))
        *st = MOAT_ONE_FOR_ONE;
    else if (enif_is_identical(t, atom_one_for_all))
        *st = MOAT_ONE_FOR_ALL;
    else if (enif_is_identical(t, atom_rest_for_one))
        *st = MOAT_REST_FOR_ONE;
    else
        return 0;
    return 1;
}

/* Decodes one child spec {Id, LibIndex, Server, Args, Restart, Shutdown}
 * into *spec (its arg a new moat_server_child_t) and the id entry.
 * Returns 0, -1 for a bad spec (badarg), or -2 out of memory; *unknown is
 * set when the library has no such server. */
static int child_spec(ErlNifEnv *env, npool_t *np, servers_t *sv,
                      ERL_NIF_TERM t, moat_child_spec_t *spec, int *unknown) {
    const ERL_NIF_TERM *e;
    int arity;
    unsigned lib, nargs;
    char name[256];
    const moat_server_def_t *def;
    moat_server_child_t *c;
    if (!enif_get_tuple(env, t, &arity, &e) || arity != 6 ||
        !enif_get_uint(env, e[1], &lib) || lib >= np->nlibs ||
        !enif_get_atom(env, e[2], name, sizeof name, ERL_NIF_LATIN1) ||
        !enif_get_list_length(env, e[3], &nargs) ||
        !get_restart(e[4], &spec->restart) ||
        !get_shutdown(env, e[5], &spec->shutdown_ms))
        return -1;
    if ((def = moat_lib_server(np->libs[lib], name, strlen(name))) == NULL) {
        *unknown = 1;
        return 0;
    }
    if ((c = calloc(1, sizeof *c)) == NULL)
        return -2;
    c->def = def;
    c->lib = np->libs[lib];
    if ((c->args = encode(env, e[3])) == NULL ||
        (sv->ids[sv->n].etf = encode(env, e[0])) == NULL) {
        server_child_free(c);
        return -2;
    }
    sv->ids[sv->n].id = enif_make_copy(sv->env, e[0]);
    sv->n++;
    spec->id = sv->ids[sv->n - 1].etf;
    spec->start = moat_server_child_start;
    spec->arg = c;
    spec->arg_free = server_child_free;
    spec->type = MOAT_WORKER;
    return 0;
}

/* sup_start(Handle, {Strategy, Intensity, Period},
 *           [{Id, LibIndex, Server, Args, Restart, Shutdown}]) ->
 *     ok | {error, Reason}
 * Starts the pool's native supervisor and its servers in order, running
 * each init on this (dirty) thread.  A server that fails to start makes
 * it {error, {shutdown, {failed_to_start_child, Id, Reason}}}, as OTP's
 * supervisor says it; the servers started are then stopped.  Once per
 * pool; a supervisor with no children is started all the same, so that
 * which_children and count_children answer. */
static ERL_NIF_TERM nif_sup_start(ErlNifEnv *env, int argc,
                                  const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    npool_t *np;
    const ERL_NIF_TERM *flags;
    ERL_NIF_TERM list = argv[2], head, ret = atom_ok;
    moat_sup_opts_t opts;
    moat_child_spec_t *specs = NULL;
    moat_term_t *reason = NULL;
    servers_t *sv;
    unsigned n;
    int arity, rc, unknown = 0;
    size_t i;
    (void)argc;
    memset(&opts, 0, sizeof opts);
    if (!enif_get_resource(env, argv[0], pool_rt, (void **)&res) ||
        !enif_get_tuple(env, argv[1], &arity, &flags) || arity != 3 ||
        !get_strategy(flags[0], &opts.strategy) ||
        !enif_get_int(env, flags[1], &opts.intensity) || opts.intensity < 0 ||
        !enif_get_int(env, flags[2], &opts.period) || opts.period < 1 ||
        !enif_get_list_length(env, list, &n))
        return enif_make_badarg(env);
    np = res->np;
    if (atomic_exchange(&np->sup_claimed, 1) != 0)
        return enif_make_badarg(env);
    sv = calloc(1, sizeof *sv + (n ? n : 1) * sizeof sv->ids[0]);
    specs = calloc(n ? n : 1, sizeof *specs);
    if (sv == NULL || specs == NULL || (sv->env = enif_alloc_env()) == NULL) {
        free(sv);
        free(specs);
        atomic_store(&np->sup_claimed, 0);
        return error_tuple(env, atom_enomem);
    }
    for (i = 0; enif_get_list_cell(env, list, &head, &list); i++) {
        rc = child_spec(env, np, sv, head, &specs[i], &unknown);
        if (rc == -1 || rc == -2) {
            ret = rc == -1 ? enif_make_badarg(env) : error_tuple(env, atom_enomem);
            goto done;
        }
        if (unknown) {
            const ERL_NIF_TERM *e;
            enif_get_tuple(env, head, &arity, &e);
            ret = error_tuple(
                env, enif_make_tuple2(
                         env, atom_shutdown,
                         enif_make_tuple3(
                             env, atom_failed_to_start_child, e[0],
                             enif_make_tuple2(env, atom_unknown_server, e[2]))));
            goto done;
        }
    }
    for (size_t j = 0; j < sv->n; j++)
        for (size_t k = 0; k < j; k++)
            if (enif_is_identical(sv->ids[j].id, sv->ids[k].id)) {
                ret = enif_make_badarg(env); /* two children, one id */
                goto done;
            }
    opts.escalate = on_gave_up;
    opts.child_crashed = on_child_crashed;
    opts.data = np;
    tl_caller_env = env;
    rc = moat_sup_start(np->pool, 0, &opts, specs, sv->n, &sv->sup, &reason);
    tl_caller_env = NULL;
    /* The supervisor owns the args now, unless it refused the specs. */
    if (rc != MOAT_EINVAL && rc != MOAT_EEXISTS)
        for (size_t j = 0; j < sv->n; j++)
            specs[j].arg_free = NULL;
    if (rc == 0) {
        atomic_store(&np->servers, sv);
        sv = NULL;
    } else if (reason != NULL) {
        size_t len;
        const char *d = moat_term_data(reason, &len);
        ERL_NIF_TERM r;
        /* The supervisor stops the servers it started, in reverse order,
         * then ends: the start fails once it has, as OTP's does. */
        if (rc == MOAT_ESTART) {
            tl_caller_env = env;
            sup_wait(env, np->pool, sv->sup, 0);
            tl_caller_env = NULL;
        }
        if (enif_binary_to_term(env, (const unsigned char *)d, len, &r, 0) == 0)
            r = atom_enomem;
        ret = error_tuple(env, r);
        moat_term_unref(reason);
    } else {
        ret = error_tuple(env, enif_make_atom(env, moat_err_name(rc)));
    }
done:
    for (i = 0; i < n; i++)
        if (specs[i].arg_free != NULL)
            specs[i].arg_free(specs[i].arg);
    free(specs);
    if (sv != NULL) /* it failed, and no supervisor runs: may be retried */
        atomic_store(&np->sup_claimed, 0);
    servers_free(sv);
    return ret;
}

/* Stops the pool's native supervisor as its parent would (exit shutdown)
 * and waits for it to end: its servers stop in reverse order, each within
 * its shutdown time, running terminate.  Gives up waiting if the calling
 * process is killed meanwhile: closing the pool then ends the rest. */
static void sup_stop(ErlNifEnv *env, npool_t *np) {
    servers_t *sv = atomic_load(&np->servers);
    if (sv != NULL)
        sup_wait(env, np->pool, sv->sup, 1);
}

/* Waits for supervisor `sup` to end, after sending it exit(shutdown) from
 * outside if `stop`, giving up if the calling process is no longer alive. */
static void sup_wait(ErlNifEnv *env, moat_pool_t *pool, moat_pid_t sup,
                     int stop) {
    moat_pid_t w;
    moat_msg_t *m;
    uint64_t ref;
    if (moat_proc_open(pool, &w) != 0)
        return;
    if (moat_proc_monitor(pool, w, sup, &ref) == 0) {
        if (stop)
            moat_proc_exit(pool, 0, sup, moat_atom(MOAT_A_SHUTDOWN));
        for (;;) {
            int rc = moat_proc_receive(pool, w, 50, &m), down;
            if (rc == MOAT_ETIMEDOUT) {
                if (!enif_is_current_process_alive(env))
                    break;
                continue;
            }
            if (rc != 0)
                break;
            down = m->kind == MOAT_MSG_DOWN && m->ref == ref;
            moat_msg_free(m);
            if (down)
                break;
        }
    }
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* The running server with this id, or 0. */
static moat_pid_t server_pid(npool_t *np, ERL_NIF_TERM id) {
    servers_t *sv = atomic_load(&np->servers);
    moat_pid_t pid;
    if (sv == NULL)
        return 0;
    for (size_t i = 0; i < sv->n; i++)
        if (enif_is_identical(sv->ids[i].id, id))
            return moat_sup_child_pid(np->pool, sv->sup, sv->ids[i].etf,
                                      &pid) == 0
                       ? pid
                       : 0;
    return 0;
}

/* The index of server `id` of a pool, or -1. */
static long server_index(const servers_t *sv, ERL_NIF_TERM id) {
    for (size_t i = 0; sv != NULL && i < sv->n; i++)
        if (enif_is_identical(sv->ids[i].id, id))
            return (long)i;
    return -1;
}

/* A C-node pool's frame about its servers, into *bin: {call, Tag, Index,
 * Request}, {cast, Index, Request}, {which_children, Tag} or
 * {count_children, Tag} (`what`; index < 0: none; request NULL: none).
 * Returns 0 or -1 (no memory). */
static int server_frame(ErlNifBinary *bin, const char *what, uint64_t tag,
                        int tagged, long index, const moat_term_t *request) {
    size_t rlen = 0;
    const char *rd = request != NULL ? moat_term_data(request, &rlen) : NULL;
    int arity = 1 + (tagged != 0) + (index >= 0) + (request != NULL);
    char *buf = NULL;
    for (int pass = 0; pass < 2; pass++) {
        int i = 0;
        ei_encode_version(buf, &i);
        ei_encode_tuple_header(buf, &i, arity);
        ei_encode_atom(buf, &i, what);
        if (tagged)
            ei_encode_ulonglong(buf, &i, tag);
        if (index >= 0)
            ei_encode_ulong(buf, &i, (unsigned long)index);
        if (request != NULL) {
            if (buf != NULL)
                memcpy(buf + i, rd + 1, rlen - 1);
            i += (int)(rlen - 1);
        }
        if (pass == 0) {
            if (!enif_alloc_binary((size_t)i, bin))
                return -1;
            buf = (char *)bin->data;
        }
    }
    return 0;
}

/* A call to a C-node pool's server, or a query of its supervisor: a
 * remote task of the core pool (admission, the caller as owner, the
 * deadline, one claim), whose frame is `what` instead of a run.  The
 * registry's read lock is held on entry and released here.  Returns as
 * nif_call. */
static ERL_NIF_TERM remote_request(ErlNifEnv *env, pool_res_t *res,
                                   ntask_t *nt, ERL_NIF_TERM ref,
                                   const char *what, long index,
                                   const moat_term_t *request,
                                   int64_t timeout_ms) {
    npool_t *np = res->np;
    moat_job_t job = {NULL, what, NULL, NULL, pid_key(&nt->owner),
                      timeout_ms, nt};
    ErlNifBinary bin;
    int rc;
    watch_caller(env, res, &nt->owner);
    nt->np = np;
    np_ref(np);
    enif_keep_resource(nt); /* for the callback */
    rc = moat_pool_accept(np->pool, &job, 1, &nt->t);
    reg_done();
    if (rc != 1) {
        enif_release_resource(nt);
        atomic_store(&nt->state, T_SENT);
        return enif_make_tuple2(env, atom_exit, rc == MOAT_EOVERLOADED
                                                    ? atom_overloaded
                                                    : atom_noproc);
    }
    tl_caller_env = tl_port_env = env;
    if (server_frame(&bin, what, moat_task_id(nt->t), 1, index, request) != 0)
        moat_pool_remote_done(np->pool, moat_task_id(nt->t), MOAT_EXIT,
                              moat_atom(MOAT_A_ENOMEM));
    else
        port_send(env, np, &bin);
    wire_sent(env, np, nt->t);
    tl_caller_env = tl_port_env = NULL;
    return spin_outcome(env, nt, ref);
}

/* How long which_children and count_children wait for a C-node's
 * answer before they give the pool's own view (every server restarting):
 * a C-node that has not answered in this time is stuck or gone. */
#define QUERY_TIMEOUT_MS 5000

/* which_children or count_children of a C-node pool with servers:
 * {remote, Outcome, Fallback}, Outcome as nif_call's (the C-node's
 * answer), Fallback what to say when there is none.  Read lock held on
 * entry, released here. */
static ERL_NIF_TERM remote_query(ErlNifEnv *env, pool_res_t *res,
                                 const char *what, ERL_NIF_TERM fallback) {
    ntask_t *nt;
    ERL_NIF_TERM ref;
    if ((nt = ntask_new(env, res->np->name, NULL, T_SPIN, &ref)) == NULL) {
        reg_done();
        return enif_make_tuple3(env, atom_remote,
                                enif_make_tuple2(env, atom_exit, atom_enomem),
                                fallback);
    }
    return enif_make_tuple3(env, atom_remote,
                            remote_request(env, res, nt, ref, what, -1, NULL,
                                           QUERY_TIMEOUT_MS),
                            fallback);
}

/* call(Pool, Id, Request, Timeout) ->
 *     {ok, Reply} | {exit, Reason} | {wait, Ref}
 * A call to the pool's server Id.  {exit, noproc} when no such server is
 * running (no pool, no such id, restarting, ended).  Waits a few
 * microseconds for the reply on the scheduler, as run/4 does; {wait, Ref}:
 * the outcome comes as a message, {Ref, Reply} or {'DOWN', Ref, ...}.
 * Past Timeout the outcome is `timeout` and no reply follows. */
static ERL_NIF_TERM nif_call(ErlNifEnv *env, int argc,
                             const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    ntask_t *nt;
    moat_term_t *req;
    moat_pid_t pid;
    int64_t timeout_ms;
    ERL_NIF_TERM ref, ret;
    int rc;
    (void)argc;
    if (!enif_is_atom(env, argv[0]) || !get_timeout(env, argv[3], &timeout_ms))
        return enif_make_badarg(env);
    if ((nt = ntask_new(env, argv[0], NULL, T_SPIN, &ref)) == NULL ||
        (req = encode(env, argv[2])) == NULL)
        return enif_raise_exception(env, atom_enomem);
    if ((res = reg_find(argv[0])) == NULL) {
        moat_term_unref(req);
        return enif_make_tuple2(env, atom_exit, atom_noproc);
    }
    if (res->np->remote) {
        long index = server_index(atomic_load(&res->np->servers), argv[1]);
        if (index < 0) {
            reg_done();
            ret = enif_make_tuple2(env, atom_exit, atom_noproc);
        } else {
            ret = remote_request(env, res, nt, ref, "call", index, req,
                                 timeout_ms);
        }
        moat_term_unref(req);
        return ret;
    }
    if ((pid = server_pid(res->np, argv[1])) == 0) {
        reg_done();
        moat_term_unref(req);
        return enif_make_tuple2(env, atom_exit, atom_noproc);
    }
    watch_caller(env, res, &nt->owner);
    nt->np = res->np;
    np_ref(nt->np);
    enif_keep_resource(nt); /* for the callback */
    rc = moat_server_call(res->np->pool, pid, req, pid_key(&nt->owner),
                          timeout_ms, nt, &nt->t);
    reg_done();
    moat_term_unref(req);
    if (rc != 0) {
        enif_release_resource(nt);
        atomic_store(&nt->state, T_SENT);
        return enif_make_tuple2(env, atom_exit,
                                rc == -ENOMEM ? atom_enomem : atom_noproc);
    }
    return spin_outcome(env, nt, ref);
}

/* cast(Pool, Id, Request) -> ok
 * Queues a cast to the pool's server Id; dropped when there is no such
 * server running, as gen_server:cast/2 drops it. */
static ERL_NIF_TERM nif_cast(ErlNifEnv *env, int argc,
                             const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    moat_term_t *req;
    moat_pid_t pid;
    (void)argc;
    if (!enif_is_atom(env, argv[0]))
        return enif_make_badarg(env);
    if ((res = reg_find(argv[0])) == NULL)
        return atom_ok;
    if (res->np->remote) {
        long index = server_index(atomic_load(&res->np->servers), argv[1]);
        ErlNifBinary bin;
        if (index >= 0 && (req = encode(env, argv[2])) != NULL) {
            if (server_frame(&bin, "cast", 0, 0, index, req) == 0)
                port_send(env, res->np, &bin);
            moat_term_unref(req);
        }
        reg_done();
        return atom_ok;
    }
    if ((pid = server_pid(res->np, argv[1])) != 0 &&
        (req = encode(env, argv[2])) != NULL) {
        moat_server_cast(res->np->pool, pid, req);
        moat_term_unref(req);
    }
    reg_done();
    return atom_ok;
}

/* which_children(Pool) -> [{Id, running | restarting | undefined, worker}]
 *                       | {error, not_found} | {remote, Outcome, Fallback}
 * In start order.  A C-node pool with servers asks its C-node: the list
 * comes as Outcome, a call's ({ok, List} or {wait, Ref}), and Fallback
 * (every server restarting) is the answer when none comes.  Once the
 * supervisor has given up and until the pool restarts, every child is
 * `restarting`. */
static ERL_NIF_TERM nif_which_children(ErlNifEnv *env, int argc,
                                       const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    servers_t *sv;
    moat_child_info_t *ci = NULL;
    ERL_NIF_TERM list = enif_make_list(env, 0);
    int n;
    (void)argc;
    if (!enif_is_atom(env, argv[0]))
        return enif_make_badarg(env);
    if ((res = reg_find(argv[0])) == NULL)
        return error_tuple(env, atom_not_found);
    if ((sv = atomic_load(&res->np->servers)) == NULL) {
        reg_done();
        return list;
    }
    if (res->np->remote) {
        for (size_t i = sv->n; i > 0; i--)
            list = enif_make_list_cell(
                env,
                enif_make_tuple3(env, enif_make_copy(env, sv->ids[i - 1].id),
                                 atom_restarting, atom_worker),
                list);
        return remote_query(env, res, "which_children", list);
    }
    n = moat_sup_which_children(res->np->pool, sv->sup, &ci);
    reg_done();
    if (n == MOAT_ENOPROC) {
        for (size_t i = sv->n; i > 0; i--)
            list = enif_make_list_cell(
                env,
                enif_make_tuple3(env, enif_make_copy(env, sv->ids[i - 1].id),
                                 atom_restarting, atom_worker),
                list);
        return list;
    }
    if (n < 0)
        return error_tuple(env, atom_enomem);
    for (int i = n; i > 0; i--) {
        moat_child_info_t *c = &ci[i - 1];
        size_t len;
        const char *d = moat_term_data(c->id, &len);
        ERL_NIF_TERM id;
        if (enif_binary_to_term(env, (const unsigned char *)d, len, &id, 0) == 0)
            id = atom_undefined;
        list = enif_make_list_cell(
            env,
            enif_make_tuple3(env, id,
                             c->state == MOAT_CHILD_RUNNING      ? atom_running
                             : c->state == MOAT_CHILD_RESTARTING ? atom_restarting
                                                                 : atom_undefined,
                             c->type == MOAT_WORKER ? atom_worker : atom_supervisor),
            list);
    }
    moat_sup_children_free(ci, n);
    return list;
}

static ERL_NIF_TERM counts_map(ErlNifEnv *env, const moat_child_counts_t *c) {
    ERL_NIF_TERM map = enif_make_new_map(env);
    enif_make_map_put(env, map, atom_specs, enif_make_int(env, c->specs), &map);
    enif_make_map_put(env, map, atom_active, enif_make_int(env, c->active), &map);
    enif_make_map_put(env, map, atom_supervisors,
                      enif_make_int(env, c->supervisors), &map);
    enif_make_map_put(env, map, atom_workers, enif_make_int(env, c->workers), &map);
    return map;
}

/* count_children(Pool) -> #{specs, active, supervisors, workers}
 *                       | {error, not_found} | {remote, Outcome, Fallback}
 * A C-node pool with servers asks its C-node (see remote_query). */
static ERL_NIF_TERM nif_count_children(ErlNifEnv *env, int argc,
                                       const ERL_NIF_TERM argv[]) {
    pool_res_t *res;
    servers_t *sv;
    moat_child_counts_t c;
    (void)argc;
    if (!enif_is_atom(env, argv[0]))
        return enif_make_badarg(env);
    if ((res = reg_find(argv[0])) == NULL)
        return error_tuple(env, atom_not_found);
    memset(&c, 0, sizeof c);
    if ((sv = atomic_load(&res->np->servers)) != NULL && res->np->remote) {
        c.specs = c.workers = (int)sv->n;
        return remote_query(env, res, "count_children", counts_map(env, &c));
    }
    if (sv != NULL &&
        moat_sup_count_children(res->np->pool, sv->sup, &c) != 0) {
        /* Given up, restart pending: the specs, none active. */
        memset(&c, 0, sizeof c);
        c.specs = c.workers = (int)sv->n;
    }
    reg_done();
    return counts_map(env, &c);
}

/* -------------------------------------------------------- NIFs: streams */

/* stream_new(Pool :: atom(), Task :: atom(), Timeout, MaxConcurrency)
 *     -> Stream
 * The calling process owns the stream.  A missing pool or task is not an
 * error here: every element then ends with noproc or {unknown_task, T}. */
static ERL_NIF_TERM nif_stream_new(ErlNifEnv *env, int argc,
                                   const ERL_NIF_TERM argv[]) {
    nstream_t *s;
    pool_res_t *res;
    unsigned maxc;
    int64_t timeout_ms;
    ERL_NIF_TERM term;
    (void)argc;
    if (!enif_is_atom(env, argv[0]) || !enif_is_atom(env, argv[1]) ||
        !get_timeout(env, argv[2], &timeout_ms) ||
        !enif_get_uint(env, argv[3], &maxc) || maxc == 0 || maxc > (1u << 24))
        return enif_make_badarg(env);
    s = enif_alloc_resource(stream_rt, sizeof *s);
    if (s == NULL)
        return enif_raise_exception(env, atom_enomem);
    memset(s, 0, sizeof *s);
    term = enif_make_resource(env, s);
    enif_release_resource(s);
    enif_self(env, &s->owner);
    s->timeout_ms = timeout_ms;
    s->task_name = argv[1];
    s->slots = calloc(maxc, sizeof *s->slots);
    s->free_slots = malloc(maxc * sizeof *s->free_slots);
    s->buf = malloc(maxc * sizeof *s->buf);
    s->spare = malloc(maxc * sizeof *s->spare);
    s->lock_ok = uv_mutex_init(&s->lock) == 0;
    if (s->slots == NULL || s->free_slots == NULL || s->buf == NULL ||
        s->spare == NULL || !s->lock_ok)
        return enif_raise_exception(env, atom_enomem);
    s->nslots = maxc;
    s->batch = maxc / 4 > 256 ? 256 : maxc / 4 > 0 ? maxc / 4 : 1;
    for (uint32_t i = 0; i < maxc; i++) {
        s->slots[i].kind = K_STREAM;
        s->slots[i].s = s;
        s->free_slots[i] = maxc - 1 - i;
    }
    s->nfree = maxc;
    if ((res = reg_find(argv[0])) != NULL) {
        s->np = res->np;
        np_ref(s->np);
        s->task = task_find(s->np, argv[1]);
        if (s->task != NULL)
            watch_caller(env, res, &s->owner);
        reg_done();
    }
    return term;
}

static nstream_t *owned_stream(ErlNifEnv *env, ERL_NIF_TERM t) {
    return owned(env, t, stream_rt, offsetof(nstream_t, owner));
}

static ERL_NIF_TERM refused(ErlNifEnv *env, uint64_t index, ERL_NIF_TERM why,
                            ERL_NIF_TERM list) {
    return enif_make_list_cell(
        env, enif_make_tuple3(env, enif_make_uint64(env, index), atom_exit, why),
        list);
}

#define BATCH 64

/* A cursor over the elements of a proper list's ETF, as
 * enif_term_to_binary made it: LIST_EXT, or STRING_EXT for a list of
 * bytes.  Trusted input (the VM encoded it), walked with ei_skip_term. */
typedef struct {
    const ErlNifBinary *etf;
    int string; /* STRING_EXT: each element is one byte */
    int lost;   /* ei could not skip an element: encode one by one */
    int index;
    ERL_NIF_TERM list; /* the rest of the list, for that case */
    char small[2];
} elems_t;

static void elems_open(elems_t *c, const ErlNifBinary *etf,
                       ERL_NIF_TERM list) {
    c->etf = etf;
    c->string = etf != NULL && etf->data[1] == 107;
    c->lost = 0;
    c->index = 1 + (c->string ? 3 : 5); /* version, tag, length */
    c->list = list;
}

/* The next input as a task's argument list [Input].  NULL on out of
 * memory. */
static moat_term_t *elems_next(ErlNifEnv *env, elems_t *c) {
    const char *buf = (const char *)c->etf->data;
    ERL_NIF_TERM head;
    int start = c->index;
    enif_get_list_cell(env, c->list, &head, &c->list);
    if (c->string) {
        c->small[0] = 97; /* SMALL_INTEGER_EXT */
        c->small[1] = buf[c->index++];
        return moat_term_list1(c->small, 2);
    }
    /* A term ei does not know (a newer VM's) ends the shortcut. */
    if (!c->lost && ei_skip_term(buf, &c->index) == 0)
        return moat_term_list1(buf + start, (size_t)(c->index - start));
    c->lost = 1;
    return encode(env, enif_make_list1(env, head));
}

/* stream_submit(Stream, Inputs :: list(), FirstIndex :: non_neg_integer())
 *     -> Refused :: [{Index, exit, Reason}]
 * Submits each input I as Args = [I], numbered from FirstIndex.  The caller
 * keeps at most MaxConcurrency in flight (badarg beyond).  Inputs the pool
 * refused (noproc, overloaded, {unknown_task, T}) are returned at once,
 * last first; every other input has one outcome for stream_take. */
static ERL_NIF_TERM nif_stream_submit(ErlNifEnv *env, int argc,
                                      const ERL_NIF_TERM argv[]) {
    nstream_t *s = owned_stream(env, argv[0]);
    ERL_NIF_TERM out = enif_make_list(env, 0);
    ErlNifUInt64 index;
    ErlNifBinary etf;
    elems_t cur;
    unsigned n;
    (void)argc;
    if (s == NULL || !enif_get_list_length(env, argv[1], &n) ||
        !enif_get_uint64(env, argv[2], &index) || n > s->nfree)
        return enif_make_badarg(env);
    /* One encoding for all the inputs, cut into each task's [Input]. */
    if (n > 0 && !enif_term_to_binary(env, argv[1], &etf))
        return enif_raise_exception(env, atom_enomem);
    elems_open(&cur, n > 0 ? &etf : NULL, argv[1]);
    while (n > 0) {
        moat_job_t jobs[BATCH];
        moat_task_t *tasks[BATCH];
        uint32_t slots[BATCH];
        unsigned k = n < BATCH ? n : BATCH, got = 0;
        int accepted;
        ERL_NIF_TERM why = atom_overloaded;
        n -= k;
        for (unsigned i = 0; i < k; i++) {
            moat_term_t *args = elems_next(env, &cur);
            if (s->closed || s->np == NULL || s->task == NULL) {
                moat_term_unref(args);
                args = NULL;
            }
            if (s->closed || s->np == NULL) {
                out = refused(env, index++, atom_noproc, out);
                continue;
            }
            if (s->task == NULL) {
                out = refused(env, index++,
                              enif_make_tuple2(env, atom_unknown_task,
                                               s->task_name),
                              out);
                continue;
            }
            jobs[got].args = args;
            if (jobs[got].args == NULL) {
                out = refused(env, index++, atom_enomem, out);
                continue;
            }
            slots[got] = s->free_slots[--s->nfree];
            s->slots[slots[got]].index = index++;
            atomic_store(&s->slots[slots[got]].wire.state, WIRE_UNSENT);
            jobs[got].fn = s->np->remote ? NULL : s->task->def->run;
            jobs[got].name = s->np->remote ? s->task->cname
                                           : s->task->def->name;
            jobs[got].lib = s->task->lib;
            jobs[got].owner = pid_key(&s->owner);
            jobs[got].timeout_ms = s->timeout_ms;
            jobs[got].data = &s->slots[slots[got]];
            got++;
        }
        if (got == 0)
            continue;
        for (unsigned i = 0; i < got; i++)
            enif_keep_resource(s); /* one per callback */
        uv_mutex_lock(&s->lock);
        s->pending += got; /* before any callback can run */
        uv_mutex_unlock(&s->lock);
        accepted = s->np->remote
                       ? moat_pool_accept(s->np->pool, jobs, got, tasks)
                       : moat_pool_submit_batch(s->np->pool, jobs, got, tasks);
        if (accepted < 0) {
            if (accepted == MOAT_ECLOSED)
                why = atom_noproc;
            accepted = 0;
        }
        /* A refused suffix met a full queue (or, rarely, a pool closing or
         * no memory: the pool's stats tell). */
        for (unsigned i = 0; i < (unsigned)accepted; i++)
            s->slots[slots[i]].t = tasks[i];
        if (s->np->remote && accepted > 0) {
            moat_term_t *args[BATCH];
            for (unsigned i = 0; i < (unsigned)accepted; i++)
                args[i] = jobs[i].args; /* held by the tasks */
            tl_caller_env = tl_port_env = env;
            remote_send(env, s->np, s->task->cname, (size_t)accepted, tasks,
                        args);
            tl_caller_env = tl_port_env = NULL;
        }
        if ((unsigned)accepted < got) {
            uv_mutex_lock(&s->lock);
            s->pending -= got - (unsigned)accepted;
            uv_mutex_unlock(&s->lock);
        }
        for (unsigned i = (unsigned)accepted; i < got; i++) {
            moat_term_unref(jobs[i].args);
            s->free_slots[s->nfree++] = slots[i];
            out = refused(env, s->slots[slots[i]].index, why, out);
            enif_release_resource(s);
        }
    }
    if (cur.etf != NULL)
        enif_release_binary(&etf);
    return out;
}

/* stream_take(Stream, Ack :: boolean(), Elements :: boolean())
 *     -> [Outcome] | {[Element], N, Deadline :: boolean()}
 *   Outcome = {Index, ok, Value} | {Index, exit, Reason} | {Index, timeout}
 *   Element = {ok, Value} | {exit, Reason}
 * The outcomes ready now, in the order they completed: as Outcomes, or
 * (Elements) as async_stream's elements, a deadline being
 * {exit, timeout}, with their count and whether a deadline was among
 * them.  Ack says the caller has just received the stream's
 * {moat_stream, S} message, so a new one may be sent.  A caller that gets
 * nothing must wait for that message before it takes again. */
static ERL_NIF_TERM nif_stream_take(ErlNifEnv *env, int argc,
                                    const ERL_NIF_TERM argv[]) {
    nstream_t *s = owned_stream(env, argv[0]);
    int elements = enif_is_identical(argv[2], atom_true), deadline = 0;
    entry_t *buf;
    size_t n;
    ERL_NIF_TERM list = enif_make_list(env, 0);
    (void)argc;
    if (s == NULL)
        return enif_make_badarg(env);
    /* The spare buffer goes to the callbacks: the swap never leaves them
     * a buffer without room. */
    uv_mutex_lock(&s->lock);
    buf = s->buf;
    n = s->nbuf;
    s->buf = s->spare;
    s->nbuf = 0;
    if (enif_is_identical(argv[1], atom_true))
        s->notified = 0;
    /* Nothing for a caller that will now wait for the message: announce
     * the next outcome as soon as it comes. */
    s->waiting = n == 0;
    uv_mutex_unlock(&s->lock);
    for (size_t i = n; i-- > 0;) {
        entry_t *e = &buf[i];
        ERL_NIF_TERM out, v;
        sslot_t *sl = &s->slots[e->slot];
        int kind = e->kind;
        moat_task_release(sl->t);
        sl->t = NULL;
        s->free_slots[s->nfree++] = e->slot;
        if (kind == E_DEADLINE) {
            deadline = 1;
            v = atom_timeout;
        } else {
            size_t len;
            const char *d = moat_term_data(e->term, &len);
            if (enif_binary_to_term(env, (const unsigned char *)d, len, &v,
                                    0) == 0) {
                kind = E_EXIT;
                v = bad_result(env);
            }
        }
        if (elements)
            out = enif_make_tuple2(env, kind == E_OK ? atom_ok : atom_exit, v);
        else if (kind == E_DEADLINE)
            out = enif_make_tuple2(env, enif_make_uint64(env, e->index), v);
        else
            out = enif_make_tuple3(env, enif_make_uint64(env, e->index),
                                   kind == E_OK ? atom_ok : atom_exit, v);
        entry_free(e);
        list = enif_make_list_cell(env, out, list);
    }
    s->spare = buf;
    if (!elements)
        return list;
    return enif_make_tuple3(env, list, enif_make_uint64(env, n),
                            deadline ? atom_true : atom_false);
}

/* stream_close(Stream) -> Flush :: boolean()
 * Cancels every task of the stream still in flight (no outcome of theirs
 * will be taken) and drops outcomes not yet taken.  Flush is true when a
 * {moat_stream, S} message is in the caller's mailbox: receive it. */
static ERL_NIF_TERM nif_stream_close(ErlNifEnv *env, int argc,
                                     const ERL_NIF_TERM argv[]) {
    nstream_t *s = owned_stream(env, argv[0]);
    int notified;
    (void)argc;
    if (s == NULL)
        return enif_make_badarg(env);
    s->closed = 1;
    tl_caller_env = tl_port_env = env; /* for C-node tasks' cancels */
    for (uint32_t i = 0; i < s->nslots; i++) {
        sslot_t *sl = &s->slots[i];
        if (sl->t != NULL &&
            moat_task_cancel(sl->t, MOAT_A_SHUTDOWN, MOAT_CANCEL_SILENT) == 1)
            enif_release_resource(s); /* the callback's, which will not run */
    }
    tl_caller_env = tl_port_env = NULL;
    uv_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->nbuf; i++)
        entry_free(&s->buf[i]);
    s->nbuf = 0;
    notified = s->notified;
    s->notified = 0;
    uv_mutex_unlock(&s->lock);
    /* Every slot is free now: a later submit gets noproc refusals. */
    s->nfree = 0;
    for (uint32_t i = 0; i < s->nslots; i++) {
        if (s->slots[i].t != NULL) {
            moat_task_release(s->slots[i].t);
            s->slots[i].t = NULL;
        }
        s->free_slots[s->nfree++] = s->nslots - 1 - i;
    }
    return notified ? atom_true : atom_false;
}

/* ------------------------------------------------------------ loading */

static uv_once_t once = UV_ONCE_INIT;
static int init_rc;

static void init_once(void) {
    Dl_info info;
    /* Pin this library: pool threads, the janitor and the reaper run its
     * code whatever happens to the module. */
    if (dladdr((void *)&init_once, &info) == 0 || info.dli_fname == NULL ||
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE) == NULL) {
        init_rc = -1;
        return;
    }
    if (uv_rwlock_init(&reg_lock) != 0 ||
        jobq_start(&janitor, "moat_janitor") != 0 ||
        jobq_start(&reaper, "moat_reaper") != 0)
        init_rc = -1;
}

static int open_types(ErlNifEnv *env, ErlNifResourceFlags flags) {
    ErlNifResourceTypeInit pool_init = {.dtor = pool_dtor, .down = pool_down};
    ErlNifResourceTypeInit task_init = {.dtor = task_dtor, .down = task_down};
    ErlNifResourceTypeInit stream_init = {.dtor = stream_dtor};
    pool_rt = enif_open_resource_type_x(env, "moat_pool", &pool_init, flags,
                                        NULL);
    task_rt = enif_open_resource_type_x(env, "moat_task", &task_init, flags,
                                        NULL);
    stream_rt = enif_open_resource_type_x(env, "moat_stream", &stream_init,
                                          flags, NULL);
    return pool_rt != NULL && task_rt != NULL && stream_rt != NULL ? 0 : -1;
}

static int on_load(ErlNifEnv *env, void **priv, ERL_NIF_TERM info) {
    (void)priv;
    (void)info;
    uv_once(&once, init_once);
    if (init_rc != 0)
        return -1;
    make_atoms(env);
    /* A library loaded again after a purge (the pinned copy) finds its
     * resource types still there: take them over. */
    return open_types(env, ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER);
}

static int on_upgrade(ErlNifEnv *env, void **priv, void **old_priv,
                      ERL_NIF_TERM info) {
    (void)old_priv;
    return on_load(env, priv, info);
}

static void on_unload(ErlNifEnv *env, void *priv) {
    (void)env;
    (void)priv;
    /* Nothing to undo: the library stays mapped (pinned), and its pools
     * live as long as their handles. */
}

static ErlNifFunc funcs[] = {
    {"pool_new", 4, nif_pool_new, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"pool_close", 1, nif_pool_close, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"pool_stats", 1, nif_pool_stats, 0},
    {"pool_owner", 1, nif_pool_owner, 0},
    {"pool_crashes", 1, nif_pool_crashes, 0},
    {"cnode_pool_new", 6, nif_cnode_pool_new, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"cnode_deliver", 2, nif_cnode_deliver, 0},
    {"cnode_flush", 1, nif_cnode_flush, 0},
    {"cnode_lost", 2, nif_cnode_lost, 0},
    {"async", 5, nif_async, 0},
    {"run", 4, nif_run, 0},
    {"task_cancel", 2, nif_task_cancel, 0},
    {"task_running", 1, nif_task_running, 0},
    {"task_kill", 1, nif_task_kill, 0},
    {"task_spin", 1, nif_task_spin, 0},
    {"task_ignore", 1, nif_task_ignore, 0},
    {"stream_new", 4, nif_stream_new, 0},
    {"stream_submit", 3, nif_stream_submit, 0},
    {"stream_take", 3, nif_stream_take, 0},
    {"stream_close", 1, nif_stream_close, 0},
    {"sup_start", 3, nif_sup_start, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"call", 4, nif_call, 0},
    {"cast", 3, nif_cast, 0},
    {"which_children", 1, nif_which_children, 0},
    {"count_children", 1, nif_count_children, 0},
};

ERL_NIF_INIT(moat_nif, funcs, on_load, NULL, on_upgrade, on_unload)
