/*
 * pool.c: the worker pool, its run queue, tasks, owners and the
 * housekeeping thread.
 *
 * DESIGN
 *
 * Threads.  N workers (default: online CPUs) serve one run queue: `sysq`
 * (runnable native processes) first, then `jobs` (tasks, FIFO).  One more
 * thread, the housekeeper, fires deadlines from a binary heap, starts
 * replacement workers and joins retired ones.  It starts on first need
 * (the first timer, the first abandoned body), so that a pool that never
 * needs it, such as a process-isolation worker's, costs one thread less
 * to start and to end.  Every pool thread is created with all signals
 * blocked but the faults (MOAT_FAULT_SIGNALS) and is named
 * "<pool>:<role><n>".
 *
 * Waking.  A condvar wake-up costs ~11 us across CPUs, five times the
 * round-trip target, so an idle worker first spins (reading `nqueued`
 * without the lock, with a pause instruction) for spin_us before it sleeps.
 * At most max_spinners workers (half the pool, at least one) spin at once,
 * so spinning never takes every CPU from the submitters.  A submit signals
 * the condvar only when a worker sleeps and none spins; a worker that takes
 * an item and sees more queued hands off to a sleeper the same way.  A busy
 * pool therefore pays no wake-ups: workers find the next task on return.
 * A spinner yields its CPU every 64 pauses (about a microsecond): a
 * thread woken on that CPU, such as the VM scheduler that is to read an
 * outcome, or a C-node's loop, would otherwise wait for the spin to end.
 * On two cores the VM's scheduler was seen waiting 55 us that way (perf
 * sched), once per round trip; NIF round trips and fan-out measured the
 * same with and without the yield.
 *
 * Locality.  When a native process (a server, a supervisor) running on
 * a worker makes another one runnable (a message, an exit signal), the
 * other goes to that worker's local slot, not to sysq: the worker runs it
 * as soon as the current run returns, on a warm cache, and no other
 * worker is woken for it.  A crash, its exit signal to the supervisor and
 * the restart's init thus stay on one thread instead of hopping between
 * two (three times the cost on two cores).  A slot holds one item, is
 * set only during its worker's run, and is not in nqueued, so spinners do
 * not rush at it.  So that a long callback cannot hold it hostage, an idle
 * worker steals a slot item when the slot's worker has taken no new item
 * for STEAL_NS since the thief first saw it set: spinners look every
 * LOOK_NS, and a worker that sleeps while slots are in use sleeps at most
 * WATCH_NS (a slot push wakes a worker that sleeps without a timeout).
 * A worker runs at most SLOT_STREAK slot items in a row while sysq or
 * jobs hold work, so that two processes messaging each other cannot
 * starve the shared queues.  A server that yields after a full batch goes
 * to sysq, behind the others, as before.
 *
 * Outcomes.  Every task has one atomic claim (OPEN -> CLAIMED ->
 * DELIVERED).  Whoever takes it (the worker returning from the body, a
 * canceller, the deadline, the owner's death, pool stop) decides the
 * outcome and calls the transport's complete callback once; a loser waits
 * until the winner's callback has returned, so a caller that cancels knows
 * no callback is still in flight.
 *
 * Abandoning.  A running task whose outcome came from elsewhere cannot be
 * preempted: its stop flag is set and its thread is left to finish it.  So
 * that the pool keeps serving, the housekeeper starts a replacement worker
 * (at most max_abandoned beyond N); when the abandoned body returns, its
 * thread retires if the pool has enough serving workers, else serves on.
 *
 * Here.  moat_pool_run_here runs a task on its caller's thread, as a
 * worker would (admission, claim, callback, stop flag), for a transport
 * whose own thread would otherwise hand each task over and sleep.  While
 * it runs it is on the `heres` list, so that a close finds it; abandoned,
 * it keeps its caller's thread and no replacement is started.  With
 * lazy_threads the workers start with the first item queued, so that a
 * pool whose tasks all run here has no thread of its own.  The stop flag
 * of a task run here can also be set from a signal handler on its thread
 * (moat_here_stop), through its moat_here_t: the handler sets the
 * handle's flag, then the task's if the body has begun, and the caller
 * copies the handle's flag into the task after publishing it, so that a
 * signal at any point between is seen.
 *
 * Remote tasks.  A transport that runs bodies elsewhere (the C-node)
 * still decides outcomes here: moat_pool_accept admits tasks without
 * queueing them and keeps them in a table by id until the transport
 * reports their end (moat_pool_remote_done) or loses the other side
 * (moat_pool_remote_lost).  An outcome decided here first (cancel,
 * deadline, owner, close) abandons the remote body, as it would a local
 * one, and calls remote_cancel so that the transport can stop it.  A
 * remote pool starts no workers.
 *
 * Shutdown.  moat_pool_close refuses new work, ends every queued and
 * running task with `shutdown` and ends every native process, without
 * waiting for any thread.  moat_pool_stop closes, then wakes everyone,
 * joins the workers (waiting for abandoned bodies to return), then stops
 * and joins the housekeeper.
 *
 * Lock order is in internal.h.  Task memory is reference-counted: the run
 * queue or the worker holds one reference, the caller's handle one, an
 * armed deadline one.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_MAX_QUEUE 65536
/* Long enough to catch the next submit of a caller in a round-trip loop
 * (a few us), short enough that an idle pool goes quiet at once. */
#define DEFAULT_SPIN_US 50
/* Locality (DESIGN).  A slot item waits for its worker's run to return
 * for at most about STEAL_NS while a thief spins (a server callback is
 * expected to take a few microseconds), or WATCH_NS while every other
 * worker sleeps (rare, and one timed wake-up per WATCH_NS costs an idle
 * worker nothing measurable). */
#define STEAL_NS 20000u
#define LOOK_NS 10000u
#define WATCH_NS 1000000u
#define SLOT_STREAK 64

/* The worker running a native process on this thread, else NULL: where
 * moat__pool_ready_sys finds the local slot. */
static _Thread_local moat__worker_t *tl_worker;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#else
    sched_yield();
#endif
}

/* ------------------------------------------------------------- threads */

static void thread_setup(moat_pool_t *pool, const char *role, unsigned n) {
    char name[48];
    snprintf(name, sizeof name, "%s:%s%u", pool->name, role, n);
    name[15] = '\0'; /* the kernel's limit for a thread name */
    pthread_setname_np(pthread_self(), name);
    if (pool->opts.thread_start != NULL)
        pool->opts.thread_start(pool->opts.data);
}

static void thread_teardown(moat_pool_t *pool) {
    if (pool->opts.thread_stop != NULL)
        pool->opts.thread_stop(pool->opts.data);
    moat__task_cache_flush();
}

/* Starts a pool thread with every signal blocked but the faults
 * (MOAT_FAULT_SIGNALS) from its first instruction: it inherits the mask
 * in force while it is created. */
static int spawn_thread(uv_thread_t *tid, void (*fn)(void *), void *arg) {
    static const int faults[] = {MOAT_FAULT_SIGNALS};
    sigset_t mask, old;
    int rc;
    sigfillset(&mask);
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
        sigdelset(&mask, faults[i]);
    pthread_sigmask(SIG_SETMASK, &mask, &old);
    rc = uv_thread_create(tid, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

static void worker_main(void *arg);

/* Starts one more worker.  thr_lock held. */
static int add_worker(moat_pool_t *pool) {
    moat__worker_t *w;
    int rc;
    if (pool->nworkers == pool->capworkers) {
        unsigned cap = pool->capworkers ? pool->capworkers * 2 : 8;
        moat__worker_t **ws = realloc(pool->workers, cap * sizeof *ws);
        if (ws == NULL)
            return -ENOMEM;
        pool->workers = ws;
        pool->capworkers = cap;
    }
    w = calloc(1, sizeof *w);
    if (w == NULL)
        return -ENOMEM;
    w->pool = pool;
    w->index = pool->nworkers;
    moat__list_init(&w->snode);
    rc = spawn_thread(&w->tid, worker_main, w);
    if (rc != 0) {
        free(w);
        return rc;
    }
    pool->workers[pool->nworkers++] = w;
    pool->serving++;
    return 0;
}

/* Starts the pool's nthreads workers.  Returns 0, or the error of the
 * first that could not start (those started keep serving). */
static int start_workers(moat_pool_t *pool) {
    int rc = 0;
    uv_mutex_lock(&pool->thr_lock);
    if (!atomic_load(&pool->threads_up)) {
        for (unsigned i = 0; i < pool->opts.nthreads && rc == 0; i++)
            rc = add_worker(pool);
        /* One is enough to serve the queue; none: the next item tries. */
        if (pool->nworkers > 0)
            atomic_store(&pool->threads_up, 1);
    }
    uv_mutex_unlock(&pool->thr_lock);
    return rc;
}

/* Before an item is queued: a lazy pool starts its workers now.  Any
 * lock but thr_lock may be held (lock order). */
static void need_workers(moat_pool_t *pool) {
    if (pool->opts.lazy_threads &&
        !atomic_load_explicit(&pool->threads_up, memory_order_acquire))
        (void)start_workers(pool);
}

static void hk_main(void *arg);

/* Starts the housekeeper unless it runs, or has been told to stop (what
 * is armed then is fired by moat_pool_stop).  timer_lock held: the new
 * thread waits for it before it looks at anything.  Returns 0 or a
 * negative error. */
static int hk_need(moat_pool_t *pool) {
    int rc;
    if (pool->hk_started || pool->hk_stop)
        return 0;
    rc = spawn_thread(&pool->hk_tid, hk_main, pool);
    if (rc == 0)
        pool->hk_started = 1;
    return rc;
}

/* Tells the housekeeper there is thread work, starting it if `start`.
 * The flag, set under the lock it waits with, makes the poke stick even
 * when the housekeeper is busy elsewhere at that moment.  Returns 0, or a
 * negative error when it cannot start. */
static int hk_poke(moat_pool_t *pool, int start) {
    int rc = 0;
    uv_mutex_lock(&pool->timer_lock);
    if (start)
        rc = hk_need(pool);
    pool->hk_work = 1;
    uv_cond_signal(&pool->timer_cond);
    uv_mutex_unlock(&pool->timer_lock);
    return rc;
}

/* A running task was abandoned: its thread no longer serves.  Called in
 * the rq_lock section that marks the task abandoned, so that the body's
 * end, which reads the mark under rq_lock (run_task), always finds its
 * thread counted out: counted after the lock, a body that returned at
 * once took itself for a surplus thread and retired, and the count then
 * left no room for a replacement (a pool of one thread was left with
 * none).  Returns nonzero when a replacement is wanted: the caller then
 * calls replace_thread, without rq_lock. */
static int abandon_thread(moat_pool_t *pool) {
    int want = 0;
    atomic_fetch_add(&pool->n_abandoned, 1);
    uv_mutex_lock(&pool->thr_lock);
    pool->serving--;
    if (pool->extra < pool->opts.max_abandoned &&
        !atomic_load(&pool->stopping)) {
        pool->extra++;
        pool->want_spawn++;
        want = 1;
    }
    uv_mutex_unlock(&pool->thr_lock);
    return want;
}

/* Has the housekeeper start the replacement abandon_thread counted. */
static void replace_thread(moat_pool_t *pool) {
    if (hk_poke(pool, 1) != 0) {
        /* No housekeeper, no replacement: the pool serves with one
         * thread less until the body returns. */
        uv_mutex_lock(&pool->thr_lock);
        if (pool->want_spawn > 0) {
            pool->want_spawn--;
            pool->extra--;
        }
        uv_mutex_unlock(&pool->thr_lock);
    }
}

/* An abandoned body returned (and no longer counts as abandoned).
 * Returns 1 when its thread should retire. */
static int rejoin_thread(moat_pool_t *pool) {
    int retire;
    uv_mutex_lock(&pool->thr_lock);
    retire = pool->serving >= pool->opts.nthreads;
    if (retire)
        pool->extra--;
    else
        pool->serving++;
    uv_mutex_unlock(&pool->thr_lock);
    return retire;
}

/* ---------------------------------------------------------------- timers */

static int heap_less(moat__timer_t *a, moat__timer_t *b) {
    return a->due_ns < b->due_ns;
}

static void heap_set(moat_pool_t *pool, unsigned i, moat__timer_t *t) {
    pool->heap[i] = t;
    t->idx = (int)i;
}

static void heap_up(moat_pool_t *pool, unsigned i) {
    moat__timer_t *t = pool->heap[i];
    while (i > 0) {
        unsigned parent = (i - 1) / 2;
        if (!heap_less(t, pool->heap[parent]))
            break;
        heap_set(pool, i, pool->heap[parent]);
        i = parent;
    }
    heap_set(pool, i, t);
}

static void heap_down(moat_pool_t *pool, unsigned i) {
    moat__timer_t *t = pool->heap[i];
    for (;;) {
        unsigned c = 2 * i + 1;
        if (c >= pool->nheap)
            break;
        if (c + 1 < pool->nheap && heap_less(pool->heap[c + 1], pool->heap[c]))
            c++;
        if (!heap_less(pool->heap[c], t))
            break;
        heap_set(pool, i, pool->heap[c]);
        i = c;
    }
    heap_set(pool, i, t);
}

static void heap_remove(moat_pool_t *pool, moat__timer_t *t) {
    unsigned i = (unsigned)t->idx;
    moat__timer_t *last = pool->heap[--pool->nheap];
    t->idx = -1;
    if (last == t)
        return;
    heap_set(pool, i, last);
    heap_up(pool, i);
    heap_down(pool, (unsigned)last->idx);
}

/* Deadlines beyond this are as good as never (and keep due_ns from
 * overflowing): about 31 years. */
#define MAX_TIMER_MS ((int64_t)1 << 40)

/* The deadline queue for `ms`: the one holding that length, else an
 * empty one, else none (-1).  Timer lock held. */
static int dq_for(moat_pool_t *pool, int64_t ms) {
    int empty = -1;
    for (int q = 0; q < MOAT__NDQ; q++) {
        if (pool->dqs[q].ms == ms)
            return q;
        if (empty < 0 && moat__list_empty(&pool->dqs[q].list))
            empty = q;
    }
    if (empty >= 0)
        pool->dqs[empty].ms = ms;
    return empty;
}

/* The timer due first, or NULL.  Timer lock held. */
static moat__timer_t *timer_first(moat_pool_t *pool) {
    moat__timer_t *first = pool->nheap > 0 ? pool->heap[0] : NULL;
    for (int q = 0; q < MOAT__NDQ; q++) {
        moat__timer_t *t;
        if (moat__list_empty(&pool->dqs[q].list))
            continue;
        t = MOAT__CONTAINER(pool->dqs[q].list.next, moat__timer_t, node);
        if (first == NULL || t->due_ns < first->due_ns)
            first = t;
    }
    return first;
}

static void timer_remove(moat_pool_t *pool, moat__timer_t *t) {
    if (t->idx >= 0) {
        heap_remove(pool, t);
    } else {
        moat__list_remove(&t->node);
        t->idx = -1;
    }
}

static void timer_wake(moat_pool_t *pool, moat__timer_t *timer) {
    /* Wake the housekeeper only if it would sleep past this deadline: a
     * round trip with a deadline then costs no wake-up, since a deadline
     * due after the last one the housekeeper waits for is found when it
     * wakes for that one. */
    if (timer->due_ns < pool->hk_wake_ns)
        uv_cond_signal(&pool->timer_cond);
}

int moat__timer_insert(moat_pool_t *pool, moat__timer_t *timer, int64_t ms) {
    int q;
    if (hk_need(pool) != 0)
        return -1; /* as for no memory: nothing would fire it */
    if (ms > MAX_TIMER_MS)
        ms = MAX_TIMER_MS;
    /* Read under the lock, so each queue's deadlines stay in order. */
    timer->due_ns = uv_hrtime() + (uint64_t)ms * 1000000u;
    if ((q = dq_for(pool, ms)) >= 0) {
        moat__list_push(&pool->dqs[q].list, &timer->node);
        timer->idx = -2 - q;
        timer_wake(pool, timer);
        return 1;
    }
    if (pool->nheap == pool->capheap) {
        unsigned cap = pool->capheap ? pool->capheap * 2 : 64;
        moat__timer_t **h = realloc(pool->heap, cap * sizeof *h);
        if (h == NULL)
            return -1;
        pool->heap = h;
        pool->capheap = cap;
    }
    pool->heap[pool->nheap] = timer;
    timer->idx = (int)pool->nheap++;
    heap_up(pool, (unsigned)timer->idx);
    timer_wake(pool, timer);
    return 1;
}

void moat__timer_start(moat_pool_t *pool, moat__timer_t *timer, int64_t ms) {
    int rc;
    uv_mutex_lock(&pool->timer_lock);
    rc = moat__timer_insert(pool, timer, ms);
    uv_mutex_unlock(&pool->timer_lock);
    /* No memory for the heap: fire at once rather than never, so the
     * promise (something happens by then) still holds. */
    if (rc < 0)
        timer->cb(timer);
}

int moat__timer_stop(moat_pool_t *pool, moat__timer_t *timer) {
    int armed;
    uv_mutex_lock(&pool->timer_lock);
    armed = timer->idx != -1;
    if (armed)
        timer_remove(pool, timer);
    uv_mutex_unlock(&pool->timer_lock);
    return armed;
}

/* Starts wanted workers and joins retired ones.  Housekeeper only. */
static void hk_threads(moat_pool_t *pool) {
    uv_mutex_lock(&pool->thr_lock);
    while (pool->want_spawn > 0 && !atomic_load(&pool->stopping)) {
        pool->want_spawn--;
        /* The abandoned body may have returned meanwhile and its thread
         * serves again: then no replacement is due. */
        if (pool->serving >= pool->opts.nthreads || add_worker(pool) != 0)
            pool->extra--;
    }
    for (unsigned i = 0; i < pool->nworkers;) {
        moat__worker_t *w = pool->workers[i];
        if (!w->exited || w->claimed) {
            i++;
            continue;
        }
        pool->workers[i] = pool->workers[--pool->nworkers];
        uv_mutex_unlock(&pool->thr_lock);
        uv_thread_join(&w->tid);
        free(w);
        uv_mutex_lock(&pool->thr_lock);
    }
    uv_mutex_unlock(&pool->thr_lock);
}

static void hk_main(void *arg) {
    moat_pool_t *pool = arg;
    thread_setup(pool, "hk", 0);
    uv_mutex_lock(&pool->timer_lock);
    while (!pool->hk_stop) {
        moat__timer_t *first;
        uint64_t now;
        pool->hk_wake_ns = 0; /* awake: it looks at the heap again */
        if (pool->hk_work) {
            pool->hk_work = 0;
            uv_mutex_unlock(&pool->timer_lock);
            hk_threads(pool);
            uv_mutex_lock(&pool->timer_lock);
            continue;
        }
        now = uv_hrtime();
        first = timer_first(pool);
        if (first != NULL && first->due_ns <= now) {
            timer_remove(pool, first);
            uv_mutex_unlock(&pool->timer_lock);
            first->cb(first);
            uv_mutex_lock(&pool->timer_lock);
        } else if (first != NULL) {
            pool->hk_wake_ns = first->due_ns;
            uv_cond_timedwait(&pool->timer_cond, &pool->timer_lock,
                              first->due_ns - now);
        } else {
            pool->hk_wake_ns = UINT64_MAX;
            uv_cond_wait(&pool->timer_cond, &pool->timer_lock);
        }
    }
    uv_mutex_unlock(&pool->timer_lock);
    thread_teardown(pool);
}

/* ---------------------------------------------------------------- owners */

struct moat__owner_s {
    moat__owner_t *next;
    uint64_t key;
    moat__node_t tasks;
};

static moat__stripe_t *stripe_of(moat_pool_t *pool, uint64_t key) {
    /* Owners are pids or pointers: mix the bits before taking a stripe. */
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return &pool->stripes[key % MOAT__OWNER_STRIPES];
}

/* Stripe lock held. */
static moat__owner_t **owner_find(moat__stripe_t *s, uint64_t key) {
    moat__owner_t **p = &s->owners;
    while (*p != NULL && (*p)->key != key)
        p = &(*p)->next;
    return p;
}

/* The owner record for key, made if there is none; NULL on out of
 * memory.  Stripe lock held. */
static moat__owner_t *owner_get(moat__stripe_t *s, uint64_t key) {
    moat__owner_t **p = owner_find(s, key), *o = *p;
    if (o == NULL && (o = malloc(sizeof *o)) != NULL) {
        o->key = key;
        o->next = NULL;
        moat__list_init(&o->tasks);
        *p = o;
    }
    return o;
}

/* Puts t on its owner's list; with if_open, only while its claim is open
 * (checked under the stripe lock, which deliver's owner_remove takes after
 * claiming, so an answered task is never left on the list). */
static int owner_add(moat_pool_t *pool, moat_task_t *t, int if_open) {
    moat__stripe_t *s = stripe_of(pool, t->owner);
    moat__owner_t *o;
    uv_mutex_lock(&s->lock);
    if (if_open && atomic_load(&t->claim) != MOAT__OPEN) {
        uv_mutex_unlock(&s->lock);
        return 0;
    }
    if ((o = owner_get(s, t->owner)) == NULL) {
        uv_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    /* Newest first: cancel_owner then ends queued tasks before it abandons
     * a running one, whose replacement thread would otherwise run them. */
    moat__list_push_front(&o->tasks, &t->onode);
    t->orec = o;
    uv_mutex_unlock(&s->lock);
    return 0;
}

static void owner_remove(moat_pool_t *pool, moat_task_t *t) {
    moat__stripe_t *s;
    moat__owner_t **p;
    if (t->owner == 0)
        return;
    s = stripe_of(pool, t->owner);
    uv_mutex_lock(&s->lock);
    if (t->orec != NULL) {
        moat__list_remove(&t->onode);
        if (moat__list_empty(&t->orec->tasks)) {
            p = owner_find(s, t->owner);
            *p = t->orec->next;
            free(t->orec);
        }
        t->orec = NULL;
    }
    uv_mutex_unlock(&s->lock);
}

/* ------------------------------------------------------ task memory */

/*
 * Task structs are recycled.  A task is allocated by the submitting thread
 * and freed by a worker; through malloc that is a cross-thread free, which
 * takes the allocating arena's lock on every task (measured: over half of
 * the submitter's time at a few million tasks/s).  Each thread keeps a
 * cache of free structs; a cache that grows past 2 * CACHE_BATCH hands a
 * batch to the shared depot, an empty one takes a batch from it, so the
 * depot's lock is taken once per CACHE_BATCH tasks.  The depot is bounded;
 * beyond it, structs go back to malloc.  Sanitizer builds use plain calloc
 * and free, so ASan and TSan see each task's real lifetime.
 */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TASK_RECYCLE 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TASK_RECYCLE 0
#endif
#endif
#ifndef TASK_RECYCLE
#define TASK_RECYCLE 1
#endif

#define CACHE_BATCH 32
/* 4096 batches of 32 structs of ~250 bytes: at most ~32 MiB kept. */
#define DEPOT_MAX_BATCHES 4096

typedef struct task_cache_s {
    moat_task_t *head; /* linked through end_next */
    unsigned n;
} task_cache_t;

static _Thread_local task_cache_t tcache;
static uv_once_t depot_once = UV_ONCE_INIT;
static uv_mutex_t depot_lock; /* guards depot, depot_n */
static task_cache_t depot[DEPOT_MAX_BATCHES]; /* batches */
static unsigned depot_n;
static pthread_key_t cache_key; /* its destructor flushes at thread exit */

static void cache_exit(void *unused) {
    (void)unused;
    moat__task_cache_flush();
}

static void depot_init(void) {
    if (uv_mutex_init(&depot_lock) != 0 ||
        pthread_key_create(&cache_key, cache_exit) != 0)
        abort(); /* at first use, before any task exists: a broken system */
}

/* Takes the first CACHE_BATCH structs off the cache as one chain. */
static moat_task_t *cache_cut(task_cache_t *c) {
    moat_task_t *head = c->head, *t = head;
    for (unsigned i = 1; i < CACHE_BATCH; i++)
        t = t->end_next;
    c->head = t->end_next;
    t->end_next = NULL;
    c->n -= CACHE_BATCH;
    return head;
}

static void chain_free(moat_task_t *t) {
    while (t != NULL) {
        moat_task_t *next = t->end_next;
        free(t);
        t = next;
    }
}

/* Stores a chain of n structs in the depot, or frees it when full. */
static void depot_put(moat_task_t *batch, unsigned n) {
    uv_once(&depot_once, depot_init);
    uv_mutex_lock(&depot_lock);
    if (depot_n < DEPOT_MAX_BATCHES) {
        depot[depot_n++] = (task_cache_t){batch, n};
        batch = NULL;
    }
    uv_mutex_unlock(&depot_lock);
    chain_free(batch);
}

void moat__task_cache_flush(void) {
    while (tcache.n > 0) {
        moat_task_t *batch;
        unsigned n = tcache.n >= CACHE_BATCH ? CACHE_BATCH : tcache.n;
        if (n == CACHE_BATCH) {
            batch = cache_cut(&tcache);
        } else {
            batch = tcache.head;
            tcache.head = NULL;
            tcache.n = 0;
        }
        depot_put(batch, n);
    }
}

static moat_task_t *task_alloc(void) {
    moat_task_t *t;
    if (!TASK_RECYCLE)
        return calloc(1, sizeof *t);
    if (tcache.n == 0) {
        uv_once(&depot_once, depot_init);
        pthread_setspecific(cache_key, &tcache); /* arms cache_exit */
        uv_mutex_lock(&depot_lock);
        if (depot_n > 0)
            tcache = depot[--depot_n];
        uv_mutex_unlock(&depot_lock);
        if (tcache.n == 0)
            return calloc(1, sizeof *t);
    }
    t = tcache.head;
    tcache.head = t->end_next;
    tcache.n--;
    memset(t, 0, sizeof *t);
    return t;
}

static void task_release(moat_task_t *t) {
    if (!TASK_RECYCLE) {
        free(t);
        return;
    }
    if (tcache.n == 0) { /* a thread may only ever free: arm its flush */
        uv_once(&depot_once, depot_init);
        pthread_setspecific(cache_key, &tcache);
    }
    t->end_next = tcache.head;
    tcache.head = t;
    if (++tcache.n >= 2 * CACHE_BATCH)
        depot_put(cache_cut(&tcache), CACHE_BATCH);
}

/* ----------------------------------------------------------------- tasks */

static void task_free(moat_task_t *t) {
    moat_term_unref(t->args);
    free(t->errmsg);
    task_release(t);
}

void moat__task_unref(moat_task_t *t) {
    if (atomic_fetch_sub(&t->refs, 1) == 1)
        task_free(t);
}

/* Takes the claim of a task that has no process (see settle). */
static int claim(moat_task_t *t) {
    int open = MOAT__OPEN;
    return atomic_compare_exchange_strong(&t->claim, &open, MOAT__CLAIMED);
}

/* After losing a claim: the winner's callback may still be running (it is
 * short); returns once it has. */
static void wait_delivered(moat_task_t *t) {
    while (atomic_load(&t->claim) != MOAT__DELIVERED)
        sched_yield();
}

/* The claim is ours: tidy up and call back once. */
static void deliver(moat_task_t *t, int kind, moat_term_t *term,
                    unsigned flags, atomic_uint_fast64_t *stat) {
    moat_pool_t *pool = t->pool;
    if (t->has_deadline && moat__timer_stop(pool, &t->timer))
        moat__task_unref(t); /* the deadline's reference */
    owner_remove(pool, t);
    if (stat != NULL)
        atomic_fetch_add(stat, 1);
    if (!t->internal && !(flags & MOAT_CANCEL_SILENT)) {
        moat_outcome_t o = {kind, term};
        pool->opts.complete(t, &o, pool->opts.data);
    }
    atomic_store(&t->claim, MOAT__DELIVERED);
}

static atomic_uint_fast64_t *stat_for(moat_pool_t *pool, moat_term_t *r) {
    if (moat_term_is(r, MOAT_A_TIMEOUT))
        return &pool->n_timeouts;
    if (moat_term_is(r, MOAT_A_SHUTDOWN) || moat_term_is(r, MOAT_A_KILLED))
        return &pool->n_cancelled;
    return &pool->n_failed; /* e.g. a task process killed by a link */
}

/* The claim is ours and the outcome is `reason`: take the task off the
 * queue or abandon its running body, then deliver. */
void moat__task_settle(moat_task_t *t, moat_term_t *reason, unsigned flags) {
    moat_pool_t *pool = t->pool;
    int was_queued = 0, was_running = 0;
    int was_remote = 0, replace = 0;
    uv_mutex_lock(&pool->rq_lock);
    if (t->where == MOAT__QUEUED) {
        moat__list_remove(&t->qnode);
        pool->njobs--;
        atomic_fetch_sub(&pool->nqueued, 1);
        t->where = MOAT__DONE;
        was_queued = 1;
    } else if (t->where == MOAT__RUNNING && !t->abandoned) {
        t->abandoned = 1;
        was_running = 1;
        if (t->here) /* its caller's thread: nothing to replace */
            atomic_fetch_add(&pool->n_abandoned, 1);
        else
            replace = abandon_thread(pool);
    } else if (t->where == MOAT__REMOTE && !t->abandoned) {
        t->abandoned = 1;
        was_remote = 1;
        atomic_fetch_add(&pool->n_abandoned, 1);
    }
    atomic_store(&t->stop, 1);
    uv_mutex_unlock(&pool->rq_lock);
    if (was_queued || was_running || was_remote)
        atomic_fetch_sub(&pool->admitted, 1);
    if (replace)
        replace_thread(pool);
    /* Before deliver: the complete callback may free the transport's
     * data, which remote_cancel reads. */
    if (was_remote && pool->opts.remote_cancel != NULL)
        pool->opts.remote_cancel(t, reason, pool->opts.data);
    deliver(t, MOAT_EXIT, reason, flags, stat_for(pool, reason));
    if (was_queued)
        moat__task_unref(t); /* the run queue's reference */
}

/* Ends a task from outside its body.  Returns 1 if this call decided;
 * else, with `wait`, returns once the winner's callback has. */
static int end_from_outside(moat_task_t *t, moat_term_t *reason,
                            unsigned flags, int wait) {
    /* The claim and the death of the task's process (if it has one) are
     * one step, so its monitors and its outcome give the same reason. */
    if (!moat__proc_claim(t, reason)) {
        if (wait)
            wait_delivered(t);
        return 0;
    }
    moat__task_settle(t, reason, flags);
    return 1;
}

int moat__task_end(moat_task_t *t, moat_term_t *reason, unsigned flags) {
    return end_from_outside(t, reason, flags, 1);
}

static void deadline_fired(moat__timer_t *timer) {
    moat_task_t *t = MOAT__CONTAINER(timer, moat_task_t, timer);
    /* No waiting here: the housekeeper has other deadlines to keep. */
    end_from_outside(t, moat_atom(MOAT_A_TIMEOUT), 0, 0);
    moat__task_unref(t); /* the deadline's reference */
}

/* Arms a task's deadline unless its outcome is already decided; then the
 * deadline's reference is dropped here.  Under timer_lock, so that a
 * deliver (which claims first, then stops the timer under the same lock)
 * either finds the timer armed or keeps it from being armed. */
static void arm_deadline(moat_task_t *t, int64_t ms) {
    moat_pool_t *pool = t->pool;
    int armed = 0;
    uv_mutex_lock(&pool->timer_lock);
    if (atomic_load(&t->claim) == MOAT__OPEN)
        armed = moat__timer_insert(pool, &t->timer, ms);
    uv_mutex_unlock(&pool->timer_lock);
    if (armed < 0) /* no memory for the heap: the deadline is now */
        deadline_fired(&t->timer);
    else if (!armed)
        moat__task_unref(t);
}

int moat_task_cancel(moat_task_t *task, moat_atom_t reason, unsigned flags) {
    if (task == NULL || reason < 0 || reason >= MOAT_A__COUNT)
        return MOAT_EINVAL;
    return end_from_outside(task, moat_atom(reason), flags, 1);
}

int moat_task_running(moat_task_t *task) {
    moat_pool_t *pool = task->pool;
    int running;
    uv_mutex_lock(&pool->rq_lock);
    running = task->where == MOAT__RUNNING || task->where == MOAT__REMOTE;
    uv_mutex_unlock(&pool->rq_lock);
    return running;
}

uint64_t moat_task_id(const moat_task_t *task) { return task->id; }
uint64_t moat_task_submitted(const moat_task_t *task) {
    return task->submitted;
}
void *moat_task_data(const moat_task_t *task) { return task->data; }
void moat_task_release(moat_task_t *task) { moat__task_unref(task); }

int moat_pool_cancel_owner(moat_pool_t *pool, uint64_t owner,
                           moat_atom_t reason, unsigned flags) {
    moat__stripe_t *s = stripe_of(pool, owner);
    int n = 0;
    if (owner == 0 || reason < 0 || reason >= MOAT_A__COUNT)
        return MOAT_EINVAL;
    /* One task at a time: each end removes it from the owner's list (the
     * winner of its claim does, before DELIVERED), so the loop ends. */
    for (;;) {
        moat__owner_t *o;
        moat_task_t *t;
        uv_mutex_lock(&s->lock);
        o = *owner_find(s, owner);
        if (o == NULL) {
            uv_mutex_unlock(&s->lock);
            return n;
        }
        t = MOAT__CONTAINER(o->tasks.next, moat_task_t, onode);
        atomic_fetch_add(&t->refs, 1);
        uv_mutex_unlock(&s->lock);
        n += end_from_outside(t, moat_atom(reason), flags, 1);
        moat__task_unref(t);
    }
}

/* Takes `n` admission slots or as many as remain.  Returns how many. */
static size_t admit(moat_pool_t *pool, size_t n) {
    uint_fast64_t cur = atomic_load(&pool->admitted), take;
    do {
        if (cur >= pool->max_admitted)
            return 0;
        take = pool->max_admitted - cur;
        if (take > n)
            take = n;
    } while (!atomic_compare_exchange_weak(&pool->admitted, &cur, cur + take));
    return (size_t)take;
}

static moat_task_t *task_make(moat_pool_t *pool, const moat_job_t *job,
                              int internal, int handle, uint64_t now) {
    moat_task_t *t = task_alloc();
    if (t == NULL)
        return NULL;
    t->ctx.api = &moat__task_api;
    t->pool = pool;
    moat__list_init(&t->qnode);
    moat__list_init(&t->onode);
    t->timer.idx = -1;
    t->timer.cb = deadline_fired;
    t->fn = job->fn;
    t->name = job->name;
    t->lib = job->lib;
    t->owner = job->owner;
    t->data = job->data;
    t->internal = internal;
    t->id = atomic_fetch_add(&pool->seq, 1) + 1;
    t->submitted = now;
    t->has_deadline = job->timeout_ms >= 0;
    atomic_init(&t->refs, 1 + (handle ? 1 : 0) + t->has_deadline);
    atomic_init(&t->claim, MOAT__OPEN);
    atomic_init(&t->stop, 0);
    return t;
}

/* Undoes task_make for a task nobody else has seen (its args stay the
 * caller's). */
static void task_unmake(moat_task_t *t) { task_release(t); }

/* Puts ts[i] on its owner's list, and the tasks after it that have the
 * same owner, under one stripe lock (a batch usually has one owner).  The
 * others are added by their own turn of the caller's loop: a task already
 * on a list is skipped there (orec set).  rq_lock held. */
static int owner_add_run(moat_pool_t *pool, moat_task_t **ts, size_t i,
                         size_t k) {
    moat__stripe_t *s;
    moat__owner_t *o;
    uint64_t key = ts[i]->owner;
    if (ts[i]->orec != NULL)
        return 0; /* added with an earlier task of its owner */
    s = stripe_of(pool, key);
    uv_mutex_lock(&s->lock);
    if ((o = owner_get(s, key)) == NULL) {
        uv_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    /* Newest first, as owner_add does. */
    for (size_t j = i; j < k && ts[j]->owner == key; j++) {
        moat__list_push_front(&o->tasks, &ts[j]->onode);
        ts[j]->orec = o;
    }
    uv_mutex_unlock(&s->lock);
    return 0;
}

/* Arms the deadlines of a batch under one timer lock; see arm_deadline. */
static void arm_deadlines(moat_pool_t *pool, const moat_job_t *jobs,
                          moat_task_t **ts, size_t k) {
    enum { NOTHING, ARMED, DROP, FIRE };
    unsigned char st[64];
    for (size_t base = 0; base < k; base += sizeof st) {
        size_t m = k - base < sizeof st ? k - base : sizeof st;
        int any = 0;
        for (size_t i = 0; i < m; i++)
            any |= jobs[base + i].timeout_ms >= 0;
        if (!any)
            continue;
        uv_mutex_lock(&pool->timer_lock);
        for (size_t i = 0; i < m; i++) {
            moat_task_t *t = ts[base + i];
            int64_t ms = jobs[base + i].timeout_ms;
            int rc;
            if (ms < 0)
                st[i] = NOTHING;
            else if (atomic_load(&t->claim) != MOAT__OPEN)
                st[i] = DROP;
            else if ((rc = moat__timer_insert(pool, &t->timer, ms)) < 0)
                st[i] = FIRE;
            else
                st[i] = rc ? ARMED : DROP;
        }
        uv_mutex_unlock(&pool->timer_lock);
        for (size_t i = 0; i < m; i++) {
            if (st[i] == FIRE)
                deadline_fired(&ts[base + i]->timer);
            else if (st[i] == DROP)
                moat__task_unref(ts[base + i]);
        }
    }
}

/* ---------------------------------------------------------- remote tasks */

static size_t remote_hash(uint64_t id) {
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdULL;
    id ^= id >> 33;
    return (size_t)id;
}

static void remote_put(moat_pool_t *pool, moat_task_t *t) {
    size_t mask = pool->capremote - 1, i;
    for (i = remote_hash(t->id) & mask; pool->remote[i] != NULL;
         i = (i + 1) & mask)
        ;
    pool->remote[i] = t;
    pool->nremote++;
}

/* Makes room for n more remote tasks, keeping the table at most half
 * full.  rq_lock held. */
static int remote_reserve(moat_pool_t *pool, size_t n) {
    size_t need = pool->nremote + n, cap = pool->capremote ? pool->capremote
                                                           : 64;
    moat_task_t **old = pool->remote;
    size_t oldcap = pool->capremote;
    if (need * 2 <= pool->capremote)
        return 0;
    while (need * 2 > cap)
        cap *= 2;
    if ((pool->remote = calloc(cap, sizeof *pool->remote)) == NULL) {
        pool->remote = old;
        return -ENOMEM;
    }
    pool->capremote = cap;
    pool->nremote = 0;
    for (size_t i = 0; i < oldcap; i++)
        if (old[i] != NULL)
            remote_put(pool, old[i]);
    free(old);
    return 0;
}

/* Takes remote task `id` out of the table (backward-shift deletion, so no
 * tombstones); NULL when absent.  rq_lock held. */
static moat_task_t *remote_take(moat_pool_t *pool, uint64_t id) {
    size_t mask, i, j;
    moat_task_t *t;
    if (pool->capremote == 0)
        return NULL;
    mask = pool->capremote - 1;
    for (i = remote_hash(id) & mask;; i = (i + 1) & mask) {
        if (pool->remote[i] == NULL)
            return NULL;
        if (pool->remote[i]->id == id)
            break;
    }
    t = pool->remote[i];
    pool->remote[i] = NULL;
    pool->nremote--;
    for (j = (i + 1) & mask; pool->remote[j] != NULL; j = (j + 1) & mask) {
        size_t home = remote_hash(pool->remote[j]->id) & mask;
        /* Entry j stays unless its home lies cyclically outside (i, j]. */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            pool->remote[i] = pool->remote[j];
            pool->remote[j] = NULL;
            i = j;
        }
    }
    return t;
}

/* A remote task has left the table: it gives back its admission slot, or
 * stops counting as abandoned.  rq_lock held. */
static void remote_left(moat_pool_t *pool, moat_task_t *t) {
    if (t->abandoned)
        atomic_fetch_sub(&pool->n_abandoned, 1);
    else
        atomic_fetch_sub(&pool->admitted, 1);
    t->where = MOAT__DONE;
}

int moat_pool_remote_done(moat_pool_t *pool, uint64_t id, int kind,
                          moat_term_t *term) {
    moat_task_t *t;
    int decided = 0;
    if (pool == NULL || (term != NULL && kind != MOAT_OK && kind != MOAT_EXIT))
        return MOAT_EINVAL;
    uv_mutex_lock(&pool->rq_lock);
    if ((t = remote_take(pool, id)) != NULL)
        remote_left(pool, t);
    uv_mutex_unlock(&pool->rq_lock);
    if (t == NULL)
        return MOAT_ENOPROC;
    /* Its `where` is DONE now, so a canceller that wins this claim
     * neither abandons it nor asks the transport to stop it: it ended. */
    if (claim(t)) {
        if (term == NULL)
            deliver(t, MOAT_EXIT, moat_atom(MOAT_A_KILLED), 0,
                    &pool->n_cancelled);
        else
            deliver(t, kind, term, 0,
                    kind == MOAT_OK ? &pool->n_completed : &pool->n_failed);
        decided = 1;
    }
    moat__task_unref(t); /* the table's reference */
    return decided;
}

int moat_pool_remote_lost(moat_pool_t *pool, moat_term_t *reason) {
    moat_task_t **tab;
    size_t cap;
    int n = 0;
    if (pool == NULL || reason == NULL)
        return MOAT_EINVAL;
    uv_mutex_lock(&pool->rq_lock);
    /* Under the lock submit_n checks it under: an accept either finds the
     * flag or put its task in the table taken here. */
    atomic_store(&pool->draining, 1);
    tab = pool->remote;
    cap = pool->capremote;
    pool->remote = NULL;
    pool->capremote = pool->nremote = 0;
    for (size_t i = 0; i < cap; i++)
        if (tab[i] != NULL)
            remote_left(pool, tab[i]);
    uv_mutex_unlock(&pool->rq_lock);
    for (size_t i = 0; i < cap; i++) {
        if (tab[i] == NULL)
            continue;
        if (claim(tab[i])) {
            deliver(tab[i], MOAT_EXIT, reason, 0, &pool->n_failed);
            n++;
        }
        moat__task_unref(tab[i]);
    }
    free(tab);
    return n;
}

/* Ends `t` (NULL: none) with `reason` and drops the reference the caller
 * took for it; returns 1 when there was a task, else 0.  The end_first_*
 * helpers pick a task under their lock and finish with this. */
static int end_held(moat_task_t *t, moat_atom_t reason) {
    if (t == NULL)
        return 0;
    end_from_outside(t, moat_atom(reason), 0, 1);
    moat__task_unref(t);
    return 1;
}

/* Ends the first remote task whose outcome is open; 0 when none.  A scan
 * of the table: only the fallback of end_remote. */
static int end_first_remote(moat_pool_t *pool, moat_atom_t reason) {
    moat_task_t *t = NULL;
    uv_mutex_lock(&pool->rq_lock);
    for (size_t i = 0; i < pool->capremote && t == NULL; i++) {
        moat_task_t *c = pool->remote[i];
        if (c != NULL && !c->abandoned && atomic_load(&c->claim) == MOAT__OPEN)
            t = c;
    }
    if (t != NULL)
        atomic_fetch_add(&t->refs, 1);
    uv_mutex_unlock(&pool->rq_lock);
    return end_held(t, reason);
}

/* Ends every remote task whose outcome is open, in one pass. */
static void end_remote(moat_pool_t *pool, moat_atom_t reason) {
    moat_task_t **ts = NULL;
    size_t n = 0;
    uv_mutex_lock(&pool->rq_lock);
    if (pool->nremote > 0 &&
        (ts = malloc(pool->nremote * sizeof *ts)) != NULL) {
        for (size_t i = 0; i < pool->capremote; i++) {
            moat_task_t *c = pool->remote[i];
            if (c != NULL && !c->abandoned &&
                atomic_load(&c->claim) == MOAT__OPEN) {
                atomic_fetch_add(&c->refs, 1);
                ts[n++] = c;
            }
        }
    }
    uv_mutex_unlock(&pool->rq_lock);
    for (size_t i = 0; i < n; i++) {
        end_from_outside(ts[i], moat_atom(reason), 0, 1);
        moat__task_unref(ts[i]);
    }
    free(ts);
    while (end_first_remote(pool, reason)) /* out of memory above, or */
        ;                                  /* accepted meanwhile */
}

static size_t submit_n(moat_pool_t *pool, const moat_job_t *jobs, size_t n,
                       moat_task_t **out, int internal, int remote,
                       int *err) {
    moat_task_t *stack[64];
    moat_task_t **ts = n <= 64 ? stack : malloc(n * sizeof *ts);
    size_t k = 0, taken;
    uint64_t now;
    int wake;
    *err = 0;
    if (ts == NULL) {
        *err = -ENOMEM;
        return 0;
    }
    if (atomic_load(&pool->stopping) ||
        (!internal && atomic_load(&pool->draining))) {
        *err = MOAT_ECLOSED;
        goto done;
    }
    taken = admit(pool, n);
    if (taken < n)
        atomic_fetch_add(&pool->n_rejected, n - taken);
    if (taken == 0) {
        *err = MOAT_EOVERLOADED;
        goto done;
    }
    if (!remote)
        need_workers(pool);
    now = uv_hrtime();
    for (; k < taken; k++) {
        ts[k] = task_make(pool, &jobs[k], internal, out != NULL, now);
        if (ts[k] == NULL)
            break;
    }
    if (k < taken) {
        atomic_fetch_sub(&pool->admitted, taken - k);
        if (k == 0) {
            *err = -ENOMEM;
            goto done;
        }
    }
    uv_mutex_lock(&pool->rq_lock);
    if (atomic_load(&pool->stopping) ||
        (!internal && atomic_load(&pool->draining)) ||
        (remote && remote_reserve(pool, k) != 0)) {
        *err = atomic_load(&pool->stopping) || atomic_load(&pool->draining)
                   ? MOAT_ECLOSED
                   : -ENOMEM;
        uv_mutex_unlock(&pool->rq_lock);
        atomic_fetch_sub(&pool->admitted, k);
        while (k > 0)
            task_unmake(ts[--k]);
        goto done;
    }
    /* A task becomes visible (to its owner's cancel, to workers) only
     * here, queued, so nothing can end it before it is. */
    for (size_t i = 0; i < k; i++) {
        if (ts[i]->owner != 0 && owner_add_run(pool, ts, i, k) != 0) {
            size_t j = k;
            atomic_fetch_sub(&pool->admitted, k - i);
            while (j > i)
                task_unmake(ts[--j]);
            k = i;
            *err = -ENOMEM;
            break;
        }
        ts[i]->args = jobs[i].args; /* accepted: the args are ours now */
        if (remote) {
            /* The run reference is the table's. */
            ts[i]->where = MOAT__REMOTE;
            remote_put(pool, ts[i]);
        } else {
            ts[i]->where = MOAT__QUEUED;
            moat__list_push(&pool->jobs, &ts[i]->qnode);
        }
    }
    if (!remote) {
        pool->njobs += k;
        atomic_fetch_add(&pool->nqueued, k);
    }
    wake = !remote && pool->nsleeping > 0 &&
           atomic_load(&pool->nspinning) == 0;
    uv_mutex_unlock(&pool->rq_lock);
    if (wake)
        uv_cond_signal(&pool->rq_cond);
    arm_deadlines(pool, jobs, ts, k);
    if (out != NULL)
        for (size_t i = 0; i < k; i++)
            out[i] = ts[i];
done:
    if (ts != stack)
        free(ts);
    return k;
}

int moat_pool_submit(moat_pool_t *pool, const moat_job_t *job,
                     moat_task_t **task) {
    int err;
    if (pool == NULL || job == NULL || job->fn == NULL || job->args == NULL ||
        pool->opts.remote)
        return MOAT_EINVAL;
    return submit_n(pool, job, 1, task, 0, 0, &err) == 1 ? 0 : err;
}

int moat_pool_submit_batch(moat_pool_t *pool, const moat_job_t *jobs,
                           size_t n, moat_task_t **tasks) {
    int err;
    size_t k;
    if (pool == NULL || jobs == NULL || n == 0 || n > INT32_MAX ||
        pool->opts.remote)
        return MOAT_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (jobs[i].fn == NULL || jobs[i].args == NULL)
            return MOAT_EINVAL;
    k = submit_n(pool, jobs, n, tasks, 0, 0, &err);
    return k > 0 ? (int)k : err;
}

int moat_pool_accept(moat_pool_t *pool, const moat_job_t *jobs, size_t n,
                     moat_task_t **tasks) {
    int err;
    size_t k;
    if (pool == NULL || jobs == NULL || n == 0 || n > INT32_MAX)
        return MOAT_EINVAL;
    k = submit_n(pool, jobs, n, tasks, 0, 1, &err);
    return k > 0 ? (int)k : err;
}

/* A call is a task whose body is a server's handle_call: it is never
 * queued or admitted here, only delivered through the same claim. */
moat_task_t *moat__task_call_new(moat_pool_t *pool, uint64_t owner,
                                 void *data, int handle, int timeout) {
    moat_job_t job = {NULL, "call", NULL, NULL, owner, timeout ? 0 : -1,
                      data};
    return task_make(pool, &job, 0, handle, uv_hrtime());
}

int moat__task_call_posted(moat_task_t *t, int64_t timeout_ms) {
    moat_pool_t *pool = t->pool;
    int rc = t->owner != 0 ? owner_add(pool, t, 1) : 0;
    if (timeout_ms >= 0)
        arm_deadline(t, timeout_ms);
    return rc;
}

void moat__task_call_drop(moat_task_t *t) { task_unmake(t); }

int moat__task_finish(moat_task_t *t, int kind, moat_term_t *term) {
    moat_pool_t *pool = t->pool;
    if (!claim(t))
        return 0; /* a late reply: the caller already has its outcome */
    deliver(t, kind, term, 0,
            kind == MOAT_OK ? &pool->n_completed : &pool->n_failed);
    return 1;
}

int moat__task_prepare(moat_pool_t *pool, const moat_job_t *job,
                       moat_task_t **out) {
    moat_task_t *t;
    if (atomic_load(&pool->stopping))
        return MOAT_ECLOSED;
    if (admit(pool, 1) == 0) {
        atomic_fetch_add(&pool->n_rejected, 1);
        return MOAT_EOVERLOADED;
    }
    t = task_make(pool, job, 1, 1, uv_hrtime());
    if (t == NULL) {
        atomic_fetch_sub(&pool->admitted, 1);
        return -ENOMEM;
    }
    t->args = job->args;
    *out = t;
    return 0;
}

void moat__task_queue(moat_task_t *t) {
    moat_pool_t *pool = t->pool;
    int wake;
    need_workers(pool);
    uv_mutex_lock(&pool->rq_lock);
    if (atomic_load(&t->claim) != MOAT__OPEN) {
        /* Ended before it was queued (its parent died and the link took
         * it along): it never runs. */
        uv_mutex_unlock(&pool->rq_lock);
        atomic_fetch_sub(&pool->admitted, 1);
        moat__task_unref(t); /* the run reference */
        return;
    }
    if (atomic_load(&pool->stopping)) {
        uv_mutex_unlock(&pool->rq_lock);
        atomic_fetch_sub(&pool->admitted, 1);
        end_from_outside(t, moat_atom(MOAT_A_SHUTDOWN), 0, 1);
        moat__task_unref(t); /* the run reference */
        return;
    }
    t->where = MOAT__QUEUED;
    moat__list_push(&pool->jobs, &t->qnode);
    pool->njobs++;
    atomic_fetch_add(&pool->nqueued, 1);
    wake = pool->nsleeping > 0 && atomic_load(&pool->nspinning) == 0;
    uv_mutex_unlock(&pool->rq_lock);
    if (wake)
        uv_cond_signal(&pool->rq_cond);
}

moat_term_t *moat__result_term(int rc, ei_x_buff *x, const char *errmsg,
                               int *kind) {
    moat_term_t *term = NULL;
    *kind = MOAT_EXIT;
    if (rc == MOAT_OK || rc == MOAT_EXIT) {
        if (x->buff != NULL && moat_etf_check(x->buff, (size_t)x->index) == 0) {
            term = moat_term_from_x(x);
            *kind = rc;
        } else {
            static const char m[] = "callback returned a malformed term";
            term = moat_term_tagged_binary("native_error", m, sizeof m - 1);
        }
    } else if (rc == MOAT_ERROR) {
        const char *m = errmsg != NULL ? errmsg : "error";
        term = moat_term_tagged_binary("native_error", m, strlen(m));
    } else {
        static const char m[] = "callback returned an unknown status";
        term = moat_term_tagged_binary("native_error", m, sizeof m - 1);
    }
    ei_x_free(x);
    return term != NULL ? term : moat_atom(MOAT_A_ENOMEM);
}

/* Runs a task body and builds its outcome.  Returns the term (never NULL)
 * and sets *kind. */
static moat_term_t *run_body(moat_task_t *t, int *kind) {
    ei_x_buff x;
    size_t alen;
    const char *a = moat_term_data(t->args, &alen);
    int rc;
    *kind = MOAT_EXIT;
    if (ei_x_new_with_version(&x) != 0)
        return moat_atom(MOAT_A_ENOMEM);
    rc = t->fn(&t->ctx, a, (int)alen, &x);
    return moat__result_term(rc, &x, t->errmsg, kind);
}

/* Runs a task the worker took from the queue.  Returns 1 when the worker
 * should retire (it was abandoned and the pool has enough threads).
 *
 * The hot path takes no lock: the worker claims the outcome with a CAS,
 * and a task whose claim the worker won cannot have been abandoned
 * (abandoning takes the claim).  The task stays the worker's `current`,
 * with the worker's reference, until its next pop, which clears it in
 * the lock section it takes anyway. */
static int run_task(moat__worker_t *w, moat_task_t *t) {
    moat_pool_t *pool = w->pool;
    int kind, abandoned, retire = 0;
    moat_term_t *term = run_body(t, &kind);
    /* Only this thread sets t->pid (or moat_spawn did, before the task
     * was queued), so it may read it unlocked.  A task with a process
     * claims together with its process's death (proc.c). */
    if (t->pid == 0 ? claim(t)
                    : moat__proc_claim(t, kind == MOAT_OK
                                              ? moat_atom(MOAT_A_NORMAL)
                                              : term)) {
        atomic_fetch_sub(&pool->admitted, 1);
        deliver(t, kind, term, 0,
                kind == MOAT_OK ? &w->n_completed : &w->n_failed);
        moat_term_unref(term);
        return 0;
    }
    /* Lost: a cancel, deadline or kill decided first, and may be marking
     * the body abandoned right now; rq_lock orders us after it. */
    uv_mutex_lock(&pool->rq_lock);
    abandoned = t->abandoned;
    /* In the same lock section as `where`: whoever sees the body gone
     * (moat_task_running) sees it no longer counted as abandoned. */
    if (abandoned)
        atomic_fetch_sub(&pool->n_abandoned, 1);
    t->where = MOAT__DONE;
    w->current = NULL;
    uv_mutex_unlock(&pool->rq_lock);
    if (abandoned)
        retire = rejoin_thread(pool);
    else
        atomic_fetch_sub(&pool->admitted, 1);
    moat_term_unref(term);
    moat__task_unref(t); /* the worker's (was the queue's) reference */
    return retire;
}

void moat_here_stop(moat_here_t *here) {
    moat_task_t *t;
    atomic_store(&here->stop, 1);
    t = atomic_load(&here->task);
    if (t != NULL)
        atomic_store(&t->stop, 1);
}

int moat_pool_run_here(moat_pool_t *pool, const moat_job_t *job,
                       moat_here_t *here) {
    moat_task_t *t;
    moat_term_t *term;
    int kind, won, abandoned;
    if (pool == NULL || job == NULL || here == NULL || job->fn == NULL ||
        pool->opts.remote || job->owner != 0 || job->timeout_ms >= 0)
        return MOAT_EINVAL;
    if (atomic_load(&pool->stopping) || atomic_load(&pool->draining))
        return MOAT_ECLOSED;
    if (admit(pool, 1) == 0) {
        atomic_fetch_add(&pool->n_rejected, 1);
        return MOAT_EOVERLOADED;
    }
    if ((t = task_make(pool, job, 0, 0, uv_hrtime())) == NULL) {
        atomic_fetch_sub(&pool->admitted, 1);
        return -ENOMEM;
    }
    t->here = 1;
    uv_mutex_lock(&pool->rq_lock);
    if (atomic_load(&pool->stopping) || atomic_load(&pool->draining)) {
        uv_mutex_unlock(&pool->rq_lock);
        atomic_fetch_sub(&pool->admitted, 1);
        task_unmake(t);
        return MOAT_ECLOSED;
    }
    t->args = job->args; /* accepted */
    t->where = MOAT__RUNNING;
    moat__list_push(&pool->heres, &t->qnode);
    uv_mutex_unlock(&pool->rq_lock);
    /* Published first, then the flag read: a moat_here_stop before this
     * read is copied here, one after it finds the task (see DESIGN). */
    atomic_store(&here->task, t);
    if (atomic_load(&here->stop))
        atomic_store(&t->stop, 1);
    term = run_body(t, &kind);
    atomic_store(&here->task, NULL);
    won = t->pid == 0 ? claim(t)
                      : moat__proc_claim(t, kind == MOAT_OK
                                                ? moat_atom(MOAT_A_NORMAL)
                                                : term);
    /* Lost: the winner may be marking it abandoned right now; rq_lock
     * orders us after it (as run_task). */
    uv_mutex_lock(&pool->rq_lock);
    abandoned = !won && t->abandoned;
    if (abandoned)
        atomic_fetch_sub(&pool->n_abandoned, 1);
    t->where = MOAT__DONE;
    moat__list_remove(&t->qnode);
    uv_mutex_unlock(&pool->rq_lock);
    if (!abandoned)
        atomic_fetch_sub(&pool->admitted, 1);
    if (won)
        deliver(t, kind, term, 0,
                kind == MOAT_OK ? &pool->n_completed : &pool->n_failed);
    moat_term_unref(term);
    moat__task_unref(t); /* the run reference */
    return 0;
}

/* Empties w's local slot.  rq_lock held. */
static moat__sysitem_t *unslot(moat_pool_t *pool, moat__worker_t *w) {
    moat__sysitem_t *item = w->next;
    w->next = NULL;
    moat__list_remove(&w->snode);
    atomic_fetch_sub(&pool->nslotted, 1);
    return item;
}

/* Takes a slot item whose worker has taken nothing new for STEAL_NS since
 * a thief first saw the slot set (DESIGN), marking the slots seen for the
 * first time.  rq_lock held. */
static moat__sysitem_t *steal(moat_pool_t *pool, uint64_t now) {
    for (moat__node_t *n = pool->slotted.next; n != &pool->slotted;
         n = n->next) {
        moat__worker_t *v = MOAT__CONTAINER(n, moat__worker_t, snode);
        if (v->mark_ns == 0 || v->mark_runs != v->runs) {
            v->mark_runs = v->runs;
            v->mark_ns = now;
        } else if (now - v->mark_ns >= STEAL_NS) {
            return unslot(pool, v);
        }
    }
    return NULL;
}

static void worker_main(void *arg) {
    moat__worker_t *w = arg;
    moat_pool_t *pool = w->pool;
    moat_task_t *prev = NULL; /* the finished task to release */
    uint64_t quiet = 0; /* w->runs when it last slept or started */
    thread_setup(pool, "w", w->index);
    for (;;) {
        moat__sysitem_t *item = NULL;
        moat__node_t *n = NULL;
        int sys = 0, spun = 0;
        uint64_t spin_end = 0;
        uv_mutex_lock(&pool->rq_lock);
        prev = w->current;
        w->current = NULL;
        for (;;) {
            if (w->next != NULL) {
                item = unslot(pool, w);
                if (w->streak < SLOT_STREAK ||
                    (moat__list_empty(&pool->sysq) &&
                     moat__list_empty(&pool->jobs))) {
                    w->streak++;
                    break;
                }
                /* Its turn in the shared queue, behind what waits. */
                moat__list_push(&pool->sysq, &item->node);
                atomic_fetch_add(&pool->nqueued, 1);
                item = NULL;
            }
            if (!moat__list_empty(&pool->sysq)) {
                n = pool->sysq.next;
                sys = 1;
                break;
            }
            if (!moat__list_empty(&pool->jobs)) {
                n = pool->jobs.next;
                break;
            }
            if (atomic_load(&pool->stopping))
                goto out;
            if (prev != NULL) { /* idle: let go of it before waiting */
                uv_mutex_unlock(&pool->rq_lock);
                moat__task_unref(prev);
                prev = NULL;
                uv_mutex_lock(&pool->rq_lock);
                continue;
            }
            if (!moat__list_empty(&pool->slotted) &&
                (item = steal(pool, uv_hrtime())) != NULL)
                break;
            /* Spinning pays only in a stream of work: a worker that has
             * run nothing since it started or last slept (a new thread, a
             * timed wake-up) sleeps at once. */
            if (!spun && w->runs != quiet &&
                atomic_load(&pool->nspinning) < pool->max_spinners) {
                uint64_t now = uv_hrtime(), look = now + LOOK_NS;
                unsigned i = 0;
                if (spin_end == 0)
                    spin_end = now + pool->spin_ns;
                atomic_fetch_add(&pool->nspinning, 1);
                uv_mutex_unlock(&pool->rq_lock);
                while (atomic_load_explicit(&pool->nqueued,
                                            memory_order_acquire) == 0 &&
                       !atomic_load(&pool->stopping)) {
                    cpu_relax();
                    if ((++i & 63) != 0)
                        continue;
                    /* Not a CPU kept from a thread woken on it (DESIGN). */
                    sched_yield();
                    if ((now = uv_hrtime()) >= spin_end ||
                        (now >= look && atomic_load(&pool->nslotted) > 0))
                        break;
                }
                atomic_fetch_sub(&pool->nspinning, 1);
                uv_mutex_lock(&pool->rq_lock);
                spun = now >= spin_end;
                continue;
            }
            /* While slots are in use, sleep with a timeout so as to
             * steal from a worker stuck in a long run (DESIGN). */
            pool->nsleeping++;
            if (!moat__list_empty(&pool->slotted) ||
                w->seen_pushes != pool->slot_pushes) {
                w->seen_pushes = pool->slot_pushes;
                uv_cond_timedwait(&pool->rq_cond, &pool->rq_lock, WATCH_NS);
            } else {
                pool->nsleeping_untimed++;
                uv_cond_wait(&pool->rq_cond, &pool->rq_lock);
                pool->nsleeping_untimed--;
            }
            pool->nsleeping--;
            quiet = w->runs;
            spun = 0;
            spin_end = 0;
        }
        w->runs++;
        if (item == NULL) {
            moat__list_remove(n);
            w->streak = 0;
            if (atomic_fetch_sub(&pool->nqueued, 1) > 1 &&
                pool->nsleeping > 0 && atomic_load(&pool->nspinning) == 0)
                uv_cond_signal(&pool->rq_cond);
            if (sys)
                item = MOAT__CONTAINER(n, moat__sysitem_t, node);
        }
        if (item != NULL) {
            uv_mutex_unlock(&pool->rq_lock);
            if (prev != NULL)
                moat__task_unref(prev);
            tl_worker = w;
            item->run(item);
            tl_worker = NULL;
        } else {
            moat_task_t *t = MOAT__CONTAINER(n, moat_task_t, qnode);
            t->where = MOAT__RUNNING;
            pool->njobs--;
            w->current = t;
            uv_mutex_unlock(&pool->rq_lock);
            if (prev != NULL)
                moat__task_unref(prev);
            if (run_task(w, t))
                break;
        }
        prev = NULL;
    }
    if (0) {
out:
        uv_mutex_unlock(&pool->rq_lock);
        if (prev != NULL)
            moat__task_unref(prev);
    }
    thread_teardown(pool);
    /* Its counts move to the pool's under the lock moat_pool_stats reads
     * them with, before it leaves the list: a count is never missed nor
     * seen twice. */
    uv_mutex_lock(&pool->thr_lock);
    atomic_fetch_add(&pool->n_completed, atomic_exchange(&w->n_completed, 0));
    atomic_fetch_add(&pool->n_failed, atomic_exchange(&w->n_failed, 0));
    w->exited = 1;
    uv_mutex_unlock(&pool->thr_lock);
    /* Joined by the housekeeper if there is one (a thread retires after
     * an abandoned body, which started it), else by moat_pool_stop. */
    hk_poke(pool, 0);
}

void moat__pool_ready_sys(moat_pool_t *pool, moat__sysitem_t *item,
                          int shared) {
    moat__worker_t *w = tl_worker;
    int wake;
    need_workers(pool);
    uv_mutex_lock(&pool->rq_lock);
    if (!shared && w != NULL && w->pool == pool && w->next == NULL) {
        w->next = item;
        moat__list_push(&pool->slotted, &w->snode);
        atomic_fetch_add(&pool->nslotted, 1);
        pool->slot_pushes++;
        /* Nobody watches the slot if every idle worker sleeps without a
         * timeout: one of them must, should this run be long. */
        wake = pool->nsleeping_untimed > 0 &&
               atomic_load(&pool->nspinning) == 0;
    } else {
        moat__list_push(&pool->sysq, &item->node);
        atomic_fetch_add(&pool->nqueued, 1);
        wake = pool->nsleeping > 0 && atomic_load(&pool->nspinning) == 0;
    }
    uv_mutex_unlock(&pool->rq_lock);
    if (wake)
        uv_cond_signal(&pool->rq_cond);
}

/* ------------------------------------------------------------- lifecycle */

static unsigned online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

static void pool_destroy_sync(moat_pool_t *pool, int stage) {
    /* Each stage is the number of objects initialised, in pool_new's
     * order; undone in reverse. */
    if (stage >= 5)
        moat__proc_table_free(pool);
    if (stage >= 4)
        for (unsigned i = 0; i < MOAT__OWNER_STRIPES; i++)
            uv_mutex_destroy(&pool->stripes[i].lock);
    if (stage >= 3) {
        uv_mutex_destroy(&pool->timer_lock);
        uv_cond_destroy(&pool->timer_cond);
    }
    if (stage >= 2)
        uv_mutex_destroy(&pool->thr_lock);
    if (stage >= 1) {
        uv_mutex_destroy(&pool->rq_lock);
        uv_cond_destroy(&pool->rq_cond);
    }
}

int moat_pool_new(const moat_pool_opts_t *opts, moat_pool_t **out) {
    moat_pool_t *pool;
    int rc, stage = 0;
    if (opts == NULL || opts->complete == NULL || out == NULL)
        return MOAT_EINVAL;
    pool = calloc(1, sizeof *pool);
    if (pool == NULL)
        return -ENOMEM;
    pool->opts = *opts;
    if (pool->opts.nthreads == 0)
        pool->opts.nthreads = online_cpus();
    if (pool->opts.max_queue == 0)
        pool->opts.max_queue = DEFAULT_MAX_QUEUE;
    if (pool->opts.max_abandoned == 0)
        pool->opts.max_abandoned = pool->opts.nthreads;
    if (pool->opts.spin_us == 0)
        pool->opts.spin_us = DEFAULT_SPIN_US;
    snprintf(pool->name, sizeof pool->name, "%s",
             opts->name != NULL ? opts->name : "moat");
    pool->opts.name = pool->name;
    pool->max_spinners = pool->opts.nthreads / 2 > 0 ? pool->opts.nthreads / 2
                                                     : 1;
    pool->spin_ns = (uint64_t)pool->opts.spin_us * 1000u;
    pool->max_admitted =
        (uint64_t)pool->opts.nthreads + (uint64_t)pool->opts.max_queue;
    moat__list_init(&pool->jobs);
    moat__list_init(&pool->sysq);
    moat__list_init(&pool->slotted);
    moat__list_init(&pool->heres);

    if ((rc = uv_mutex_init(&pool->rq_lock)) != 0)
        goto fail;
    if ((rc = uv_cond_init(&pool->rq_cond)) != 0) {
        uv_mutex_destroy(&pool->rq_lock);
        goto fail;
    }
    stage = 1;
    if ((rc = uv_mutex_init(&pool->thr_lock)) != 0)
        goto fail;
    stage = 2;
    for (int q = 0; q < MOAT__NDQ; q++) {
        pool->dqs[q].ms = -1;
        moat__list_init(&pool->dqs[q].list);
    }
    if ((rc = uv_mutex_init(&pool->timer_lock)) != 0)
        goto fail;
    if ((rc = uv_cond_init(&pool->timer_cond)) != 0) {
        uv_mutex_destroy(&pool->timer_lock);
        goto fail;
    }
    stage = 3;
    for (unsigned i = 0; i < MOAT__OWNER_STRIPES; i++) {
        if ((rc = uv_mutex_init(&pool->stripes[i].lock)) != 0) {
            while (i > 0)
                uv_mutex_destroy(&pool->stripes[--i].lock);
            goto fail;
        }
    }
    stage = 4;
    if ((rc = moat__proc_table_init(pool)) != 0)
        goto fail;
    stage = 5;

    if (!opts->remote && !opts->lazy_threads)
        rc = start_workers(pool);
    if (rc != 0) {
        moat_pool_free(pool);
        return rc;
    }
    *out = pool;
    return 0;
fail:
    pool_destroy_sync(pool, stage);
    free(pool);
    return rc;
}

/* Ends the first queued task with reason; 0 when none. */
static int end_first_queued(moat_pool_t *pool, moat_atom_t reason) {
    moat_task_t *t;
    uv_mutex_lock(&pool->rq_lock);
    if (moat__list_empty(&pool->jobs)) {
        uv_mutex_unlock(&pool->rq_lock);
        return 0;
    }
    t = MOAT__CONTAINER(pool->jobs.next, moat_task_t, qnode);
    atomic_fetch_add(&t->refs, 1);
    uv_mutex_unlock(&pool->rq_lock);
    return end_held(t, reason);
}

/* Ends the first running task that is not abandoned yet with reason; 0
 * when none. */
static int end_first_running(moat_pool_t *pool, moat_atom_t reason) {
    moat_task_t *t = NULL;
    uv_mutex_lock(&pool->rq_lock);
    uv_mutex_lock(&pool->thr_lock);
    for (unsigned i = 0; i < pool->nworkers && t == NULL; i++) {
        moat_task_t *c = pool->workers[i]->current;
        /* A finished task waits there for its worker's next pop. */
        if (c != NULL && !c->abandoned &&
            atomic_load(&c->claim) == MOAT__OPEN)
            t = c;
    }
    uv_mutex_unlock(&pool->thr_lock);
    for (moat__node_t *n = pool->heres.next; n != &pool->heres && t == NULL;
         n = n->next) {
        moat_task_t *c = MOAT__CONTAINER(n, moat_task_t, qnode);
        if (!c->abandoned && atomic_load(&c->claim) == MOAT__OPEN)
            t = c;
    }
    if (t != NULL)
        atomic_fetch_add(&t->refs, 1);
    uv_mutex_unlock(&pool->rq_lock);
    return end_held(t, reason);
}

static void end_all(moat_pool_t *pool, moat_atom_t reason) {
    while (end_first_queued(pool, reason))
        ;
    while (end_first_running(pool, reason))
        ;
    end_remote(pool, reason);
}

void moat_pool_close(moat_pool_t *pool) {
    int was = 0;
    if (!atomic_compare_exchange_strong(&pool->closed, &was, 1)) {
        /* Another caller is closing it: return once it has. */
        while (atomic_load(&pool->closed) != 2)
            sched_yield();
        return;
    }
    uv_mutex_lock(&pool->rq_lock);
    atomic_store(&pool->stopping, 1);
    uv_mutex_unlock(&pool->rq_lock);

    moat__proc_shutdown_all(pool);
    end_all(pool, MOAT_A_SHUTDOWN);
    atomic_store(&pool->closed, 2);
}

void moat_pool_drain(moat_pool_t *pool, moat_atom_t reason) {
    /* Under the lock submit_n checks it under: a batch either sees the
     * flag or is queued before end_all looks. */
    uv_mutex_lock(&pool->rq_lock);
    atomic_store(&pool->draining, 1);
    uv_mutex_unlock(&pool->rq_lock);
    end_all(pool, reason);
}

void moat_pool_stop(moat_pool_t *pool) {
    if (pool->stopped)
        return;
    pool->stopped = 1;
    moat_pool_close(pool);

    uv_mutex_lock(&pool->rq_lock);
    uv_cond_broadcast(&pool->rq_cond);
    /* Bodies run here on other threads (abandoned by the close): like
     * the workers', they are waited for. */
    while (!moat__list_empty(&pool->heres)) {
        uv_mutex_unlock(&pool->rq_lock);
        uv_sleep(1);
        uv_mutex_lock(&pool->rq_lock);
    }
    uv_mutex_unlock(&pool->rq_lock);

    for (;;) {
        moat__worker_t *w;
        uv_mutex_lock(&pool->thr_lock);
        if (pool->nworkers == 0) {
            uv_mutex_unlock(&pool->thr_lock);
            break;
        }
        /* Claimed, so that the housekeeper (which joins retired workers)
         * never joins the same thread, but listed until joined, so that
         * moat_pool_stats still counts what it runs meanwhile. */
        w = pool->workers[pool->nworkers - 1];
        w->claimed = 1;
        uv_mutex_unlock(&pool->thr_lock);
        uv_thread_join(&w->tid);
        uv_mutex_lock(&pool->thr_lock);
        for (unsigned i = 0; i < pool->nworkers; i++)
            if (pool->workers[i] == w) {
                pool->workers[i] = pool->workers[--pool->nworkers];
                break;
            }
        uv_mutex_unlock(&pool->thr_lock);
        free(w);
    }
    uv_mutex_lock(&pool->timer_lock);
    pool->hk_stop = 1;
    uv_cond_signal(&pool->timer_cond);
    uv_mutex_unlock(&pool->timer_lock);
    if (pool->hk_started)
        uv_thread_join(&pool->hk_tid);
    pool->hk_started = 0;
    /* Timers still armed: deadlines of tasks that already ended, and
     * supervisors' kill timers for processes now dead.  Firing them is
     * harmless and releases what each holds. */
    for (moat__timer_t *t; (t = timer_first(pool)) != NULL;) {
        timer_remove(pool, t);
        t->cb(t);
    }
    /* Servers made runnable after the last worker left (the close's exit
     * signals reach servers that were idle; a worker that saw `stopping`
     * with nothing queued may have gone first): run them here, alone, so
     * that each one's terminate runs and nothing of it is left. */
    for (;;) {
        moat__node_t *n;
        uv_mutex_lock(&pool->rq_lock);
        if (moat__list_empty(&pool->sysq)) {
            uv_mutex_unlock(&pool->rq_lock);
            break;
        }
        n = pool->sysq.next;
        moat__list_remove(n);
        atomic_fetch_sub(&pool->nqueued, 1);
        uv_mutex_unlock(&pool->rq_lock);
        MOAT__CONTAINER(n, moat__sysitem_t, node)->run(
            MOAT__CONTAINER(n, moat__sysitem_t, node));
    }
}

void moat_pool_free(moat_pool_t *pool) {
    if (pool == NULL)
        return;
    moat_pool_stop(pool);
    /* Remote bodies never reported: their tasks go with the pool. */
    for (size_t i = 0; i < pool->capremote; i++)
        if (pool->remote[i] != NULL)
            moat__task_unref(pool->remote[i]);
    free(pool->remote);
    moat__task_cache_flush();
    pool_destroy_sync(pool, 5);
    free(pool->heap);
    free(pool->workers);
    free(pool);
}

void moat_pool_stats(moat_pool_t *pool, moat_pool_stats_t *st) {
    uint64_t queued, admitted;
    uv_mutex_lock(&pool->rq_lock);
    queued = pool->njobs;
    uv_mutex_unlock(&pool->rq_lock);
    admitted = atomic_load(&pool->admitted);
    st->queued = queued;
    st->running = admitted > queued ? admitted - queued : 0;
    uv_mutex_lock(&pool->thr_lock);
    st->completed = atomic_load(&pool->n_completed);
    st->failed = atomic_load(&pool->n_failed);
    for (unsigned i = 0; i < pool->nworkers; i++) {
        st->completed += atomic_load(&pool->workers[i]->n_completed);
        st->failed += atomic_load(&pool->workers[i]->n_failed);
    }
    uv_mutex_unlock(&pool->thr_lock);
    st->cancelled = atomic_load(&pool->n_cancelled);
    st->timeouts = atomic_load(&pool->n_timeouts);
    st->rejected = atomic_load(&pool->n_rejected);
    st->abandoned = atomic_load(&pool->n_abandoned);
    st->restarts = atomic_load(&pool->n_restarts);
    uv_mutex_lock(&pool->thr_lock);
    st->threads = 0;
    for (unsigned i = 0; i < pool->nworkers; i++)
        st->threads += !pool->workers[i]->exited;
    uv_mutex_unlock(&pool->thr_lock);
}
