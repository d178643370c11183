/* internal.h: private to c_src/core.  Shared structures of the pool, its
 * tasks and its native processes. */
#ifndef MOAT_INTERNAL_H
#define MOAT_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "moat_core.h"

/* ------------------------------------------------------ intrusive lists */

typedef struct moat__node_s {
    struct moat__node_s *prev;
    struct moat__node_s *next;
} moat__node_t;

static inline void moat__list_init(moat__node_t *h) { h->prev = h->next = h; }
static inline int moat__list_empty(const moat__node_t *h) {
    return h->next == h;
}
static inline void moat__list_push(moat__node_t *h, moat__node_t *n) {
    n->prev = h->prev;
    n->next = h;
    h->prev->next = n;
    h->prev = n;
}
static inline void moat__list_push_front(moat__node_t *h, moat__node_t *n) {
    moat__list_push(h->next, n);
}
static inline void moat__list_remove(moat__node_t *n) {
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}
#define MOAT__CONTAINER(ptr, type, field)                                  \
    ((type *)((char *)(ptr)-offsetof(type, field)))

/* Something a worker runs from sysq (a native server with messages). */
typedef struct moat__sysitem_s {
    moat__node_t node;
    void (*run)(struct moat__sysitem_s *item);
} moat__sysitem_t;

/* ---------------------------------------------------------------- timers */

/* A deadline kept by the housekeeping thread.  `idx` is its heap slot
 * (>= 0), -1 when not armed, or -2 - q while it waits in deadline queue q
 * (on `node`); guarded by the pool's timer lock. */
typedef struct moat__timer_s {
    uint64_t due_ns;
    int idx;
    moat__node_t node;
    void (*cb)(struct moat__timer_s *timer);
} moat__timer_t;

/* Deadlines of one length, in the order they were armed, which is the
 * order they fall due: arming and disarming one is O(1), where the heap
 * is O(log n).  Task deadlines use them: a stream arms thousands of
 * deadlines of one length. */
#define MOAT__NDQ 8
typedef struct moat__dq_s {
    int64_t ms;
    moat__node_t list;
} moat__dq_t;

/* Arms `timer` to fire `ms` from now on the housekeeping thread. */
void moat__timer_start(moat_pool_t *pool, moat__timer_t *timer, int64_t ms);
/* The same with timer_lock held; returns 1, or -1 when out of memory
 * (not armed: the caller fires it after unlocking). */
int moat__timer_insert(moat_pool_t *pool, moat__timer_t *timer, int64_t ms);
/* Returns 1 if it disarmed the timer, 0 if it had fired or was not armed. */
int moat__timer_stop(moat_pool_t *pool, moat__timer_t *timer);

/* ----------------------------------------------------------------- tasks */

enum { MOAT__OPEN = 0, MOAT__CLAIMED = 1, MOAT__DELIVERED = 2 };
/* MOAT__REMOTE: accepted by moat_pool_accept, its body elsewhere, until
 * moat_pool_remote_done or _lost takes it out of the pool's table. */
enum { MOAT__QUEUED = 1, MOAT__RUNNING = 2, MOAT__DONE = 3, MOAT__REMOTE = 4 };

typedef struct moat__owner_s moat__owner_t;
typedef struct moat__proc_s moat__proc_t;

struct moat_task_s {
    moat_ctx_t ctx; /* first: the task ABI's context is the task */
    moat_pool_t *pool;
    moat__node_t qnode; /* run queue; pool->rq_lock */
    moat__node_t onode; /* owner's list; its stripe lock */
    moat__owner_t *orec;
    moat__timer_t timer;
    moat_task_fn fn;
    const char *name;
    const moat_lib_t *lib;
    moat_term_t *args;
    uint64_t id;
    uint64_t owner;
    uint64_t submitted; /* uv_hrtime() when it was made */
    void *data;
    atomic_int refs;
    atomic_int claim;   /* MOAT__OPEN -> CLAIMED -> DELIVERED, once */
    atomic_int stop;    /* what moat_should_stop reads */
    int where;          /* MOAT__QUEUED/RUNNING/DONE/REMOTE; pool->rq_lock */
    int abandoned;      /* its outcome came first; pool->rq_lock */
    int internal;       /* spawned by a process: no completion callback */
    int here;           /* run by moat_pool_run_here: its thread is its
                           caller's, never replaced when abandoned */
    int has_deadline;   /* its timer may be armed */
    moat_pid_t pid;     /* 0 until the task uses its id; pool->sig_lock */
    int proc_done;      /* its process has had its end; pool->sig_lock */
    moat_task_t *end_next;   /* proc.c's list of tasks to end; sig_lock;
                                also the free list's link (task_cache) */
    moat_term_t *end_reason;
    char *errmsg;       /* set by moat_error, owned */
};

/* Ends a task from outside its body with `reason` if nobody has decided
 * its outcome yet (as moat_task_cancel).  Returns 1 if this call decided.
 * No pool lock may be held. */
int moat__task_end(moat_task_t *t, moat_term_t *reason, unsigned flags);
/* The rest of an end once the claim is taken (proc.c takes it together
 * with the death of the task's process). */
void moat__task_settle(moat_task_t *t, moat_term_t *reason, unsigned flags);
void moat__task_unref(moat_task_t *t);
/* Hands the calling thread's cache of free task structs to the shared
 * depot (pool threads do it as they exit; moat_pool_free does it for its
 * caller). */
void moat__task_cache_flush(void);
/* Admits and makes an internal task (no completion callback) without
 * queueing it, so that its process can be set up first.  The caller holds
 * one reference besides the run reference. */
int moat__task_prepare(moat_pool_t *pool, const moat_job_t *job,
                       moat_task_t **out);
/* Queues a prepared task; on a stopping pool it ends with `shutdown`. */
void moat__task_queue(moat_task_t *t);

extern const moat_api_t moat__task_api;

/* The outcome of a callback that returned `rc` with `x` (which it frees or
 * takes): the term (never NULL) and *kind, MOAT_OK or MOAT_EXIT.  A
 * malformed term or an unknown status is a {native_error, _}. */
moat_term_t *moat__result_term(int rc, ei_x_buff *x, const char *errmsg,
                               int *kind);

/* -------------------------------------------------------------- processes */

/* Makes the running task a native process (its first use of its id).
 * Returns its pid, or 0 when the task has already been ended. */
moat_pid_t moat__task_pid(moat_task_t *t);
/* Takes the task's claim if it is open and, in the same sig_lock
 * section, ends its process (if any) with `reason` and forbids a later
 * one.  Returns 1 if it took the claim. */
int moat__proc_claim(moat_task_t *t, moat_term_t *reason);
/* moat_spawn with the library in which the child finds tasks by name. */
int moat__spawn(moat_pool_t *pool, moat_pid_t parent, moat_task_fn fn,
                const moat_lib_t *lib, moat_term_t *args, unsigned flags,
                moat_pid_t *pid, uint64_t *mref);
/* Receive for a task's own process: encodes the message as ETF. */
int moat__proc_receive_etf(moat_pool_t *pool, moat_pid_t self, int timeout_ms,
                           ei_x_buff *out);
int moat__proc_table_init(moat_pool_t *pool);
/* Every live process exits with `shutdown`; waits for nothing. */
void moat__proc_shutdown_all(moat_pool_t *pool);
void moat__proc_table_free(moat_pool_t *pool);

/* A native server (server.c), or a built-in one such as the supervisor,
 * which has `info` instead of a def and traps exits. */
typedef struct moat__server_s moat__server_t;
struct moat__server_s {
    moat__sysitem_t item; /* on sysq while scheduled */
    moat_ctx_t ctx;       /* api: moat__server_api */
    moat_pool_t *pool;
    moat_pid_t pid;
    const moat_server_def_t *def; /* NULL for a built-in */
    const moat_lib_t *lib;
    void *state;
    /* Built-ins: every message but calls and casts (takes it), and the
     * end (in place of terminate; frees what `state` holds). */
    void (*info)(moat__server_t *s, moat_msg_t *m);
    void (*finish)(moat__server_t *s, moat_term_t *reason);
    /* pool->sig_lock: */
    int scheduled;         /* on sysq or running */
    moat_task_t *current;  /* the call being handled, with its reference */
    int dead;              /* its process has died */
    moat_msg_t *stop_msg;  /* the one stop request, until used */
    moat_msg_t *leftover;  /* its mailbox when it died */
    moat_term_t *reason;   /* why it died */
    /* its own thread only: */
    int terminated; /* terminate (or finish) has run */
    atomic_int stopping;
    char *errmsg;
};

extern const moat_api_t moat__server_api;

moat__server_t *moat__server_alloc(moat_pool_t *pool);
/* Makes the server's process, runs `init` on this thread (it returns NULL
 * or the failure reason, which goes to *reason with MOAT_ESTART), then
 * links it to `parent` and lets it run.  *pid is set before it can run:
 * once this returns, `s` may already be freed.  Frees `s` (and a
 * built-in's state, through finish) on any failure. */
int moat__server_launch(moat__server_t *s, moat_pid_t parent, unsigned flags,
                        moat_term_t *(*init)(moat__server_t *s, void *arg),
                        void *arg, moat_pid_t *pid, moat_term_t **reason);

/* proc.c's side of servers; each takes sig_lock itself. */
int moat__proc_server_new(moat_pool_t *pool, moat__server_t *s);
int moat__proc_server_publish(moat_pool_t *pool, moat__server_t *s,
                              moat_pid_t parent, unsigned flags);
/* The next message (1), none (0, and the server is idle now), or
 * -1 when its process has died. */
int moat__proc_server_next(moat__server_t *s, moat_msg_t **m);
/* After a batch: stay scheduled if there is more to do, else go idle. */
void moat__proc_server_yield(moat__server_t *s);
/* Ends the server's process with `reason` (after its terminate). */
void moat__proc_server_exit(moat__server_t *s, moat_term_t *reason);
moat_msg_t *moat__proc_server_leftover(moat__server_t *s);
/* Queues a message to a live process (with user_servers, only to a native
 * server with a def: calls and casts); MOAT_ENOPROC when there is none. */
int moat__proc_post(moat_pool_t *pool, moat_pid_t pid, moat_msg_t *m,
                    int user_servers);
moat_msg_t *moat__msg_new(moat_msg_kind_t kind);
/* Runs fn on the live server `pid` with sig_lock held (so the server
 * cannot be freed meanwhile); MOAT_ENOPROC when there is none. */
int moat__proc_with_server(moat_pool_t *pool, moat_pid_t pid,
                           int (*fn)(moat__server_t *s, void *arg), void *arg);

/* pool.c's side of calls. */
moat_task_t *moat__task_call_new(moat_pool_t *pool, uint64_t owner,
                                 void *data, int handle, int timeout);
/* After a successful post: registers the owner and arms the deadline, each
 * only while the call is unanswered.  The caller holds a reference. */
int moat__task_call_posted(moat_task_t *t, int64_t timeout_ms);
void moat__task_call_drop(moat_task_t *t);
/* Delivers a call's reply or reason if nobody decided yet. */
int moat__task_finish(moat_task_t *t, int kind, moat_term_t *term);

typedef struct moat__slot_s {
    uint32_t gen;
    moat__proc_t *proc;
} moat__slot_t;

/* ------------------------------------------------------------------ pool */

typedef struct moat__worker_s {
    moat_pool_t *pool;
    uv_thread_t tid;
    unsigned index;
    /* The task it runs, or the one it finished, until its next pop;
     * pool->rq_lock.  The worker holds a reference to it. */
    moat_task_t *current;
    int exited; /* set by the thread as it leaves; pool->thr_lock */
    int claimed; /* moat_pool_stop joins it: the housekeeper leaves it
                    alone; pool->thr_lock */
    /* Its local slot (pool.c's DESIGN, "Locality"); pool->rq_lock:
     * the native process its current run made runnable, run next here
     * unless stolen; on pool->slotted (snode) while set. */
    moat__sysitem_t *next;
    moat__node_t snode;
    unsigned streak;     /* slot items run in a row */
    uint64_t runs;       /* items taken so far */
    uint64_t mark_runs;  /* runs when a thief first saw the slot set */
    uint64_t mark_ns;    /* when it did; 0: not seen */
    uint64_t seen_pushes; /* pool->slot_pushes when it last went to sleep */
    /* Its own counters, on its own line: two workers bumping one shared
     * counter per task would bounce a cache line between them. */
    _Alignas(64) atomic_uint_fast64_t n_completed;
    atomic_uint_fast64_t n_failed;
} moat__worker_t;

#define MOAT__OWNER_STRIPES 64

typedef struct moat__stripe_s {
    uv_mutex_t lock; /* guards `owners` and each owner's task list */
    moat__owner_t *owners;
} moat__stripe_t;

/*
 * Lock order: sig_lock -> rq_lock -> (stripe lock | timer_lock) ->
 * thr_lock.  No callback into the transport runs under any of them.
 */
struct moat_pool_s {
    moat_pool_opts_t opts;
    char name[16];
    unsigned max_spinners;
    uint64_t spin_ns;

    /* The run queue.  `sysq` holds runnable native processes and is served
     * before `jobs`.  nqueued mirrors their length for lock-free peeking by
     * spinning workers. */
    uv_mutex_t rq_lock; /* guards jobs, sysq, nsleeping, slotted, the
                           workers' slots, remote, task where/abandoned */
    uv_cond_t rq_cond;
    moat__node_t jobs;
    moat__node_t sysq;
    unsigned nsleeping;
    unsigned nsleeping_untimed; /* of them, those without a timeout */
    moat__node_t slotted; /* workers whose local slot is set */
    moat__node_t heres;   /* tasks running in moat_pool_run_here, by
                             qnode */
    uint64_t slot_pushes; /* items put in local slots so far */
    size_t njobs; /* tasks in `jobs` */
    /* What spinning workers read without the lock: its own cache line. */
    _Alignas(64) atomic_uint nspinning;
    atomic_size_t nqueued;
    atomic_uint nslotted; /* local slots set (not counted in nqueued) */
    atomic_int draining; /* moat_pool_drain: new tasks refused */
    /* Remote tasks by id: open addressing, linear probing, NULL empty;
     * each entry holds a task reference.  rq_lock. */
    moat_task_t **remote;
    size_t nremote, capremote;
    atomic_int stopping;

    /* Admission: queued plus running (not abandoned) tasks. */
    _Alignas(64) atomic_uint_fast64_t admitted;
    uint64_t max_admitted;
    _Alignas(64) atomic_uint_fast64_t seq;

    /* Threads.  `serving` counts workers not stuck in an abandoned task. */
    uv_mutex_t thr_lock; /* guards workers, nworkers, serving, want_spawn */
    moat__worker_t **workers;
    unsigned nworkers, capworkers;
    unsigned serving;
    unsigned want_spawn;
    unsigned extra; /* live replacement threads beyond nthreads */
    atomic_int threads_up; /* the workers were started (lazy_threads) */

    /* The housekeeping thread: deadlines, replacement threads, joins. */
    uv_thread_t hk_tid;
    uv_mutex_t timer_lock; /* guards heap, hk_stop, hk_work, hk_wake_ns,
                              hk_started (set once, read unlocked after
                              hk_stop) */
    uv_cond_t timer_cond;
    moat__timer_t **heap;
    unsigned nheap, capheap;
    moat__dq_t dqs[MOAT__NDQ];
    int hk_stop;
    int hk_work; /* thread work is waiting: spawn or join */
    uint64_t hk_wake_ns; /* when the sleeping housekeeper wakes by itself
                            (UINT64_MAX: never; 0: it is awake) */
    int hk_started;

    moat__stripe_t stripes[MOAT__OWNER_STRIPES];

    /* Native processes. */
    uv_mutex_t sig_lock; /* guards the table and every process's fields */
    moat__slot_t *slots;
    unsigned nslots, capslots;
    uint32_t *free_slots;
    unsigned nfree;
    uint64_t next_ref;
    moat__proc_t *proc_cache; /* freed processes kept for reuse (proc.c) */
    unsigned nproc_cache;

    int stopped;
    atomic_int closed; /* 0 open, 1 closing, 2 closed (moat_pool_close) */

    _Alignas(64) atomic_uint_fast64_t n_completed, n_failed, n_cancelled,
        n_timeouts, n_rejected, n_abandoned, n_restarts;
};

/* Makes an item runnable and wakes a worker if needed.  Called by a
 * worker running a native process of this pool, it puts the item in the
 * worker's local slot when that is free (it runs there next, see pool.c's
 * DESIGN), unless `shared`; else it goes to the tail of sysq.  The caller
 * may hold sig_lock (lock order), not rq_lock. */
void moat__pool_ready_sys(moat_pool_t *pool, moat__sysitem_t *item,
                          int shared);

#endif /* MOAT_INTERNAL_H */
