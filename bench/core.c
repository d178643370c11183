/*
 * bench/core.c: the core's figures (DESIGN.md section 10) beside their
 * targets and beside a naive peer pool measured in the same run.
 *
 *   make bench           (builds and runs every benchmark in bench/)
 *   _build/c/plain/bench_core [--quick] [--row N] [--moat-only]
 *
 * --quick (or MOAT_BENCH_QUICK=1) is a smoke run of about two seconds;
 * --row N runs one row alone and --moat-only skips the peer, e.g. for
 * perf record.
 *
 * DESIGN
 *
 * Figures drift 20-40% between runs on a shared machine, so every figure
 * with a peer is measured in trials that alternate moat and the peer, and
 * each printed rate is the median of its trials (the spread is printed
 * too).  The peer is the pool people write first: N threads, one mutex and
 * condvar around a FIFO, a condvar signal per submit and a sleep whenever
 * the queue is empty; it runs the same task functions (with an ei_x_buff
 * for the result, as moat does) and calls back in the same style.
 *
 * Threads.  The main thread submits and waits; the pool's threads run the
 * tasks and call back.  The completion callback counts outcomes in a sink:
 * in the round trip the main thread spins on that count; in the throughput
 * rows it sleeps on a futex until the pool has worked the window down to
 * half, then refills it, so that the submitter takes no CPU from the
 * workers while it waits.  Each trial makes a fresh pool and frees it.
 *
 * Nothing may be lost silently: every row ends by draining (with a
 * deadline, so a lost task cannot hang the bench), then checks that
 * completions equal submissions, that no outcome was a failure, and (for
 * moat) that the pool's own stats agree.  A failed check prints an ERROR
 * row and the bench exits 1.
 *
 * Task arguments are a static atom, so neither pool pays for per-task
 * argument terms (a transport's term copy is not measured here); moat's
 * workers still build and free each result term.
 */
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <pthread.h>

#include "moat_core.h"

/* ---------------------------------------------------------------- config */

/* Largest batch handed to one submit call. */
#define MAX_BATCH 256
/* How long a drain may take before the bench calls the missing tasks
 * lost: far beyond any honest drain of the windows used here. */
#define DRAIN_NS (10 * 1000000000ull)

typedef struct config_s {
    int quick;
    unsigned trials;     /* alternating moat/peer trials per figure */
    unsigned nthreads;   /* pool size for rows 1, 2 and 4 */
    unsigned rt_warm;    /* round trips before measuring, per trial */
    unsigned rt_n;       /* measured round trips, per trial */
    uint64_t tp_ns;      /* duration of one throughput trial */
    size_t tp_window;    /* row 2: most tasks in flight */
    size_t tp_batch;     /* row 2: tasks per submit call (or loop) */
    uint64_t cpu_ns;     /* duration of one row 3 trial */
    size_t cpu_window;   /* row 3: most tasks in flight */
    uint64_t spawn_ns;   /* duration of one row 4 trial */
    size_t spawn_out;    /* row 4 pipelined: processes outstanding */
    int moat_only;       /* --moat-only: no peer trials (for perf record) */
} config_t;

/* Pools measured per figure: moat, then the naive peer. */
static int npools(const config_t *cfg) { return cfg->moat_only ? 1 : 2; }

/* Row 3's task length and pool size (the definition of ideal). */
#define CPU_TASK_NS 10000u
#define CPU_THREADS 2u

static int g_failed; /* set by any failed check: the exit status */

/* ----------------------------------------------------------------- clocks */

static uint64_t clock_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Busy CPU time of the whole machine (/proc/stat, in clock ticks), so that
 * a row can say how much other processes took while it ran: on a shared
 * two-core machine that explains most outliers. */
static uint64_t machine_busy_ns(void) {
    unsigned long long v[8] = {0};
    long hz = sysconf(_SC_CLK_TCK);
    FILE *f = fopen("/proc/stat", "r");
    int n = 0;
    if (f == NULL)
        return 0;
    /* cpu user nice system idle iowait irq softirq steal */
    n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0],
               &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n != 8 || hz <= 0)
        return 0;
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) * (1000000000ull / hz);
}

/* CPU time of the machine, of this process and of the calling thread over
 * a span of wall time: the pool's threads are process minus caller, other
 * processes are machine minus process. */
typedef struct cpu_span_s {
    uint64_t wall, proc, self, machine;
} cpu_span_t;

static cpu_span_t cpu_mark(void) {
    cpu_span_t m = {now_ns(), clock_ns(CLOCK_PROCESS_CPUTIME_ID),
                    clock_ns(CLOCK_THREAD_CPUTIME_ID), machine_busy_ns()};
    return m;
}
static void cpu_add(cpu_span_t *acc, cpu_span_t a, cpu_span_t b) {
    acc->wall += b.wall - a.wall;
    acc->proc += b.proc - a.proc;
    acc->self += b.self - a.self;
    acc->machine += b.machine - a.machine;
}
/* The most cores other processes kept busy during any row. */
static double g_noise;

/* Cores other processes kept busy on average (tick resolution: 10 ms). */
static double cores_others(const cpu_span_t *s) {
    double c = s->wall && s->machine > s->proc
                   ? (double)(s->machine - s->proc) / (double)s->wall
                   : 0;
    if (c > g_noise)
        g_noise = c;
    return c;
}
/* Cores busy on average: of the pool's threads and of the caller. */
static double cores_pool(const cpu_span_t *s) {
    return s->wall ? (double)(s->proc - s->self) / (double)s->wall : 0;
}
static double cores_caller(const cpu_span_t *s) {
    return s->wall ? (double)s->self / (double)s->wall : 0;
}

/* ------------------------------------------------------------------- sink */

static long futex(atomic_uint *addr, int op, unsigned val,
                  const struct timespec *ts) {
    return syscall(SYS_futex, (void *)addr, op, val, ts, NULL, 0);
}

/* Where both pools' completion callbacks count outcomes. */
typedef struct sink_s {
    _Alignas(64) atomic_uint_fast64_t completed; /* every outcome */
    atomic_uint_fast64_t failed;                 /* outcomes not MOAT_OK */
    /* The waiter's mark, on its own line: 0 when nobody sleeps, else the
     * completion count at which the callback wakes it through `gen`. */
    _Alignas(64) atomic_uint_fast64_t want;
    atomic_uint gen;
} sink_t;

static void sink_init(sink_t *s) {
    atomic_init(&s->completed, 0);
    atomic_init(&s->failed, 0);
    atomic_init(&s->want, 0);
    atomic_init(&s->gen, 0);
}

static void sink_done(sink_t *s, int kind) {
    uint_fast64_t c, w;
    if (kind != MOAT_OK)
        atomic_fetch_add(&s->failed, 1);
    c = atomic_fetch_add(&s->completed, 1) + 1;
    w = atomic_load(&s->want);
    if (w != 0 && c >= w && atomic_compare_exchange_strong(&s->want, &w, 0)) {
        atomic_fetch_add(&s->gen, 1);
        futex(&s->gen, FUTEX_WAKE_PRIVATE, 1, NULL);
    }
}

/* Sleeps until `target` outcomes are counted.  Returns 0, or -1 when
 * `deadline` (monotonic ns) passed first.  The mark is published before
 * the count is read again, and the callback bumps `gen` before it wakes, so
 * a completion between the two reads cannot be missed. */
static int sink_wait(sink_t *s, uint64_t target, uint64_t deadline) {
    static const struct timespec slice = {0, 100 * 1000000};
    int rc = 0;
    for (;;) {
        unsigned g = atomic_load(&s->gen);
        if (atomic_load(&s->completed) >= target)
            break;
        atomic_store(&s->want, target);
        if (atomic_load(&s->completed) >= target)
            break;
        if (now_ns() >= deadline) {
            rc = -1;
            break;
        }
        futex(&s->gen, FUTEX_WAIT_PRIVATE, g, &slice);
    }
    atomic_store(&s->want, 0);
    return rc;
}

/* ------------------------------------------------------------------ tasks */

static int task_empty(moat_ctx_t *ctx, const char *args, int args_len,
                      ei_x_buff *out) {
    (void)ctx;
    (void)args;
    (void)args_len;
    return ei_x_encode_atom(out, "ok") == 0 ? MOAT_OK : MOAT_EXIT;
}

/* Busy for CPU_TASK_NS of wall time, as a short CPU-bound job is. */
static int task_spin(moat_ctx_t *ctx, const char *args, int args_len,
                     ei_x_buff *out) {
    uint64_t end = now_ns() + CPU_TASK_NS;
    (void)ctx;
    (void)args;
    (void)args_len;
    while (now_ns() < end)
        ;
    return ei_x_encode_atom(out, "ok") == 0 ? MOAT_OK : MOAT_EXIT;
}

/* ------------------------------------------------------- the naive peer */

typedef struct naive_task_s {
    struct naive_task_s *next;
    moat_task_fn fn;
} naive_task_t;

typedef struct naive_pool_s {
    pthread_mutex_t lock; /* guards head, tail, stop */
    pthread_cond_t cond;
    naive_task_t *head, **tail;
    int stop;
    unsigned nthreads;
    pthread_t *threads;
    sink_t *sink;
} naive_pool_t;

static void *naive_worker(void *arg) {
    naive_pool_t *p = arg;
    pthread_setname_np(pthread_self(), "naive:w"); /* for top and perf */
    for (;;) {
        naive_task_t *t;
        ei_x_buff x;
        int kind = MOAT_EXIT;
        pthread_mutex_lock(&p->lock);
        while (p->head == NULL && !p->stop)
            pthread_cond_wait(&p->cond, &p->lock);
        t = p->head;
        if (t == NULL) {
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        p->head = t->next;
        if (p->head == NULL)
            p->tail = &p->head;
        pthread_mutex_unlock(&p->lock);
        if (ei_x_new_with_version(&x) == 0) {
            kind = t->fn(NULL, NULL, 0, &x);
            ei_x_free(&x);
        }
        sink_done(p->sink, kind);
        free(t);
    }
}

static void naive_free(naive_pool_t *p) {
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    while (p->head != NULL) { /* none after a drain; freed all the same */
        naive_task_t *t = p->head;
        p->head = t->next;
        free(t);
    }
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
    free(p->threads);
    free(p);
}

static int naive_new(unsigned nthreads, sink_t *sink, naive_pool_t **out) {
    naive_pool_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return -ENOMEM;
    p->threads = calloc(nthreads, sizeof *p->threads);
    if (p->threads == NULL) {
        free(p);
        return -ENOMEM;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->tail = &p->head;
    p->sink = sink;
    for (; p->nthreads < nthreads; p->nthreads++) {
        int rc = pthread_create(&p->threads[p->nthreads], NULL, naive_worker,
                                p);
        if (rc != 0) {
            naive_free(p);
            return -rc;
        }
    }
    *out = p;
    return 0;
}

/* Queues n tasks under one lock: a signal for one, a broadcast for more. */
static int naive_submit(naive_pool_t *p, moat_task_fn fn, size_t n) {
    naive_task_t *first = NULL, **link = &first;
    for (size_t i = 0; i < n; i++) {
        naive_task_t *t = malloc(sizeof *t);
        if (t == NULL) {
            while (first != NULL) {
                naive_task_t *next = first->next;
                free(first);
                first = next;
            }
            return -ENOMEM;
        }
        t->fn = fn;
        *link = t;
        link = &t->next;
    }
    *link = NULL;
    pthread_mutex_lock(&p->lock);
    *p->tail = first;
    p->tail = link;
    if (n == 1)
        pthread_cond_signal(&p->cond);
    else
        pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

/* ------------------------------------------- one interface to both pools */

typedef struct bpool_s {
    int is_moat;
    moat_pool_t *moat;
    naive_pool_t *naive;
    sink_t sink;
    moat_job_t jobs[MAX_BATCH];
    uint64_t overloaded; /* moat refusals the bench retried */
} bpool_t;

static void moat_complete(moat_task_t *task, const moat_outcome_t *o,
                          void *data) {
    (void)task;
    sink_done(data, o->kind);
}

static int bpool_open(bpool_t *bp, int is_moat, unsigned nthreads) {
    memset(bp, 0, sizeof *bp);
    sink_init(&bp->sink);
    bp->is_moat = is_moat;
    if (is_moat) {
        moat_pool_opts_t opts = {0};
        opts.nthreads = nthreads;
        opts.name = "bench";
        opts.complete = moat_complete;
        opts.data = &bp->sink;
        return moat_pool_new(&opts, &bp->moat);
    }
    return naive_new(nthreads, &bp->sink, &bp->naive);
}

static void bpool_close(bpool_t *bp) {
    if (bp->is_moat)
        moat_pool_free(bp->moat);
    else
        naive_free(bp->naive);
}

/* Submits n tasks running fn: with one batch call when `batched`, else one
 * call per task.  A moat refusal (overloaded) is retried and counted; any
 * other error is returned. */
static int bpool_submit(bpool_t *bp, moat_task_fn fn, size_t n, int batched) {
    if (!bp->is_moat) {
        if (batched)
            return naive_submit(bp->naive, fn, n);
        for (size_t i = 0; i < n; i++) {
            int rc = naive_submit(bp->naive, fn, 1);
            if (rc != 0)
                return rc;
        }
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        moat_job_t j = {.fn = fn,
                        .name = "bench",
                        .args = moat_atom(MOAT_A_OK),
                        .timeout_ms = -1};
        bp->jobs[i] = j;
    }
    for (size_t done = 0; done < n;) {
        int rc;
        if (batched)
            rc = moat_pool_submit_batch(bp->moat, bp->jobs + done, n - done,
                                        NULL);
        else if ((rc = moat_pool_submit(bp->moat, &bp->jobs[done], NULL)) ==
                 0)
            rc = 1;
        if (rc > 0) {
            done += (size_t)rc;
        } else if (rc == MOAT_EOVERLOADED) {
            bp->overloaded++;
            sched_yield();
        } else {
            return rc;
        }
    }
    return 0;
}

/* ------------------------------------------------------- checks and rows */

/* Counts of one figure, summed over its trials, for the final check. */
typedef struct tally_s {
    uint64_t submitted, completed, failed;
    uint64_t stats_completed; /* moat only: the pool's own count */
    uint64_t overloaded;
    int drain_timeout;
} tally_t;

/* The pool's count of ended tasks (results and exit reasons).  A worker
 * may still be finishing a task's bookkeeping when its outcome (or its
 * process's DOWN) is already visible, so this waits briefly for the count
 * to reach `expected` before it settles for what it sees. */
static uint64_t pool_ended(moat_pool_t *pool, uint64_t expected) {
    uint64_t deadline = now_ns() + 1000000000u;
    moat_pool_stats_t st;
    for (;;) {
        moat_pool_stats(pool, &st);
        if (st.completed + st.failed >= expected || now_ns() >= deadline)
            return st.completed + st.failed;
        sched_yield();
    }
}

static void tally_trial(tally_t *t, bpool_t *bp, uint64_t submitted,
                        int drain_timeout) {
    t->submitted += submitted;
    t->completed += atomic_load(&bp->sink.completed);
    t->failed += atomic_load(&bp->sink.failed);
    t->overloaded += bp->overloaded;
    t->drain_timeout |= drain_timeout;
    if (bp->is_moat)
        t->stats_completed += pool_ended(bp->moat, submitted);
}

/* Prints an ERROR row unless every submission has its one outcome. */
static void check(const char *row, const char *who, const tally_t *t,
                  int is_moat) {
    int bad;
    if (t->overloaded != 0)
        printf("    note: %s: moat refused %llu submissions as overloaded; "
               "the bench retried them\n",
               who, (unsigned long long)t->overloaded);
    bad = t->completed != t->submitted || t->failed != 0 ||
              t->drain_timeout ||
              (is_moat && t->stats_completed != t->submitted);
    if (!bad)
        return;
    g_failed = 1;
    printf("ERROR %-3s %s: submitted %llu, outcomes %llu, failed %llu, "
           "pool stats say %llu%s\n",
           row, who, (unsigned long long)t->submitted,
           (unsigned long long)t->completed, (unsigned long long)t->failed,
           (unsigned long long)t->stats_completed,
           t->drain_timeout ? ", drain timed out (tasks lost)" : "");
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}
static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median_of(double *v, unsigned n) {
    if (n == 0)
        return 0;
    qsort(v, n, sizeof *v, cmp_dbl);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The table: one line per figure. */
#define ROW_FMT "%-3s %-38s %-16s %-18s %-7s %-16s %s\n"

static void fmt_rate(char *buf, size_t len, double r, const char *unit) {
    if (r >= 1e6)
        snprintf(buf, len, "%.2f M %s", r / 1e6, unit);
    else
        snprintf(buf, len, "%.0f k %s", r / 1e3, unit);
}

static void fmt_ratio(char *buf, size_t len, double moat, double peer,
                      int lower_is_better) {
    double x = lower_is_better ? peer / moat : moat / peer;
    if (moat <= 0 || peer <= 0)
        snprintf(buf, len, "-");
    else if (x > 0.95 && x < 1.05)
        snprintf(buf, len, "about equal");
    else if (x >= 1)
        snprintf(buf, len, "moat %.1fx %s", x,
                 lower_is_better ? "faster" : "more");
    else
        snprintf(buf, len, "moat %.1fx %s", 1 / x,
                 lower_is_better ? "slower" : "less");
}

/* The peer's cell when --moat-only skipped it. */
static void skip_peer(const config_t *cfg, char *buf, size_t len) {
    if (cfg->moat_only)
        snprintf(buf, len, "(skipped)");
}

/* Trial rates "a / b / c" for the detail lines. */
static void fmt_trials(char *buf, size_t len, const double *v, unsigned n,
                       double scale) {
    size_t off = 0;
    buf[0] = '\0';
    for (unsigned i = 0; i < n && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%.0f",
                                i ? " / " : "", v[i] / scale);
}

/* ------------------------------------------------- row 1: round trip */

typedef struct rt_result_s {
    uint32_t *lat; /* ns, rt_n per trial */
    size_t nlat;
    cpu_span_t cpu;
    tally_t tally;
} rt_result_t;

/* One trial: submit, spin until the callback has counted it, repeat. */
static int rt_trial(const config_t *cfg, int is_moat, rt_result_t *r) {
    bpool_t *bp = malloc(sizeof *bp);
    uint64_t submitted = 0, total = cfg->rt_warm + cfg->rt_n;
    cpu_span_t c0 = {0, 0, 0, 0};
    int rc, lost = 0;
    if (bp == NULL)
        return -ENOMEM;
    if ((rc = bpool_open(bp, is_moat, cfg->nthreads)) != 0) {
        free(bp);
        return rc;
    }
    for (uint64_t i = 0; i < total && !lost; i++) {
        uint64_t t0, t1, spins = 0;
        if (i == cfg->rt_warm)
            c0 = cpu_mark();
        t0 = now_ns();
        if ((rc = bpool_submit(bp, task_empty, 1, 0)) != 0)
            break;
        submitted++;
        while (atomic_load_explicit(&bp->sink.completed,
                                    memory_order_acquire) != submitted) {
            cpu_relax();
            if ((++spins & 0xfffff) == 0 && now_ns() - t0 > DRAIN_NS)
                lost = 1;
            if (lost)
                break;
        }
        t1 = now_ns();
        if (i >= cfg->rt_warm)
            r->lat[r->nlat++] = (uint32_t)(t1 - t0 < UINT32_MAX ? t1 - t0
                                                                : UINT32_MAX);
    }
    if (rc == 0 && !lost)
        cpu_add(&r->cpu, c0, cpu_mark());
    tally_trial(&r->tally, bp, submitted, lost);
    bpool_close(bp);
    free(bp);
    return rc;
}

static int row_roundtrip(const config_t *cfg) {
    rt_result_t res[2];
    size_t cap = (size_t)cfg->rt_n * cfg->trials;
    double med[2], p99[2];
    char a[64], b[64], c[64];
    int rc = 0;
    memset(res, 0, sizeof res);
    for (int k = 0; k < 2; k++)
        if ((res[k].lat = malloc(cap * sizeof(uint32_t))) == NULL)
            rc = -ENOMEM;
    for (unsigned t = 0; t < cfg->trials && rc == 0; t++)
        for (int k = 0; k < npools(cfg) && rc == 0; k++)
            rc = rt_trial(cfg, k == 0, &res[k]);
    if (rc != 0) {
        printf("ERROR 1   round trip: %s\n", moat_strerror(rc));
        g_failed = 1;
        goto done;
    }
    for (int k = 0; k < 2; k++) {
        size_t n = res[k].nlat;
        qsort(res[k].lat, n, sizeof(uint32_t), cmp_u32);
        med[k] = n ? res[k].lat[n / 2] / 1e3 : 0;
        p99[k] = n ? res[k].lat[(size_t)(n * 0.99)] / 1e3 : 0;
    }
    snprintf(a, sizeof a, "%.2f us", med[0]);
    snprintf(b, sizeof b, "%.2f us", med[1]);
    skip_peer(cfg, b, sizeof b);
    fmt_ratio(c, sizeof c, med[0], med[1], 1);
    printf(ROW_FMT, "1", "round trip, 1 outstanding: median", a,
           "<= 2 us median", med[0] <= 2.0 ? "ok" : "MISSED", b, c);
    snprintf(a, sizeof a, "%.2f us", p99[0]);
    snprintf(b, sizeof b, "%.2f us", p99[1]);
    skip_peer(cfg, b, sizeof b);
    fmt_ratio(c, sizeof c, p99[0], p99[1], 1);
    printf(ROW_FMT, "1", "round trip, 1 outstanding: p99", a, "-", "-", b,
           c);
    snprintf(a, sizeof a, "%.2f cores", cores_pool(&res[0].cpu));
    snprintf(b, sizeof b, "%.2f cores", cores_pool(&res[1].cpu));
    skip_peer(cfg, b, sizeof b);
    printf(ROW_FMT, "1", "  CPU of pool threads / wall", a, "-", "-", b, "");
    snprintf(a, sizeof a, "%.2f cores", cores_caller(&res[0].cpu));
    snprintf(b, sizeof b, "%.2f cores", cores_caller(&res[1].cpu));
    skip_peer(cfg, b, sizeof b);
    printf(ROW_FMT, "1", "  CPU of caller (spins) / wall", a, "-", "-", b,
           "");
    printf("    inputs: %u pool threads; %u trials x %u round trips after "
           "%u warm-up; empty task; caller spins on the callback's count; "
           "other processes busy: %.2f cores (moat trials), %.2f (naive)\n",
           cfg->nthreads, cfg->trials, cfg->rt_n, cfg->rt_warm,
           cores_others(&res[0].cpu), cores_others(&res[1].cpu));
    check("1", "moat round trip", &res[0].tally, 1);
    if (!cfg->moat_only)
        check("1", "naive round trip", &res[1].tally, 0);
done:
    free(res[0].lat);
    free(res[1].lat);
    return rc;
}

/* --------------------------------- rows 2 and 3: throughput with a window */

typedef struct tp_params_s {
    moat_task_fn fn;
    unsigned nthreads;
    size_t window, batch;
    int batched;
    uint64_t dur_ns;
} tp_params_t;

typedef struct tp_result_s {
    double rate[16]; /* per trial */
    unsigned n;
    cpu_span_t cpu;
    tally_t tally;
} tp_result_t;

/* One trial: keep at most `window` tasks in flight, refilling when half
 * are done, for dur_ns; then drain.  The rate is outcomes over the whole
 * wall time, drain included. */
static int tp_trial(const tp_params_t *p, int is_moat, tp_result_t *r) {
    bpool_t *bp = malloc(sizeof *bp);
    uint64_t submitted = 0, t0, end, t1;
    cpu_span_t c0;
    int rc, lost = 0;
    if (bp == NULL)
        return -ENOMEM;
    if ((rc = bpool_open(bp, is_moat, p->nthreads)) != 0) {
        free(bp);
        return rc;
    }
    c0 = cpu_mark();
    t0 = c0.wall;
    end = t0 + p->dur_ns;
    while (rc == 0 && !lost && now_ns() < end) {
        uint64_t done = atomic_load(&bp->sink.completed);
        while (rc == 0 && submitted + p->batch - done <= p->window) {
            rc = bpool_submit(bp, p->fn, p->batch, p->batched);
            if (rc == 0)
                submitted += p->batch;
        }
        if (rc == 0 && submitted > p->window / 2)
            lost = sink_wait(&bp->sink, submitted - p->window / 2,
                             now_ns() + DRAIN_NS) != 0;
    }
    if (!lost)
        lost = sink_wait(&bp->sink, submitted, now_ns() + DRAIN_NS) != 0;
    t1 = now_ns();
    cpu_add(&r->cpu, c0, cpu_mark());
    r->rate[r->n++] = (double)atomic_load(&bp->sink.completed) * 1e9 /
                      (double)(t1 - t0);
    tally_trial(&r->tally, bp, submitted, lost);
    bpool_close(bp);
    free(bp);
    return rc;
}

/* Alternating trials of moat and the peer.  Fills res[0] (moat) and
 * res[1] (naive). */
static int tp_run(const config_t *cfg, const tp_params_t *p,
                  tp_result_t res[2]) {
    int rc = 0;
    memset(res, 0, 2 * sizeof *res);
    for (unsigned t = 0; t < cfg->trials && rc == 0; t++)
        for (int k = 0; k < npools(cfg) && rc == 0; k++)
            rc = tp_trial(p, k == 0, &res[k]);
    return rc;
}

static int row_throughput(const config_t *cfg, int batched) {
    tp_params_t p = {task_empty, cfg->nthreads, cfg->tp_window,
                     cfg->tp_batch, batched, cfg->tp_ns};
    tp_result_t res[2];
    double med[2];
    char a[64], b[64], c[64], ta[128], tb[128];
    const char *what = batched ? "empty tasks, submit_batch" :
                                 "empty tasks, single submit";
    int rc = tp_run(cfg, &p, res);
    if (rc != 0) {
        printf("ERROR 2   %s: %s\n", what, moat_strerror(rc));
        g_failed = 1;
        return rc;
    }
    for (int k = 0; k < 2; k++) {
        fmt_trials(k ? tb : ta, sizeof ta, res[k].rate, res[k].n, 1e3);
        med[k] = median_of(res[k].rate, res[k].n);
    }
    fmt_rate(a, sizeof a, med[0], "tasks/s");
    fmt_rate(b, sizeof b, med[1], "tasks/s");
    skip_peer(cfg, b, sizeof b);
    fmt_ratio(c, sizeof c, med[0], med[1], 0);
    printf(ROW_FMT, "2", what, a, ">= 3,000,000/s",
           med[0] >= 3e6 ? "ok" : "MISSED", b, c);
    printf("    inputs: %u pool threads; up to %zu in flight, refilled at "
           "%zu; %s of %zu; %u trials x %.1f s; %llu moat tasks\n",
           cfg->nthreads, p.window, p.window / 2,
           batched ? "batches" : "single submits in runs", p.batch,
           cfg->trials, (double)p.dur_ns / 1e9,
           (unsigned long long)res[0].tally.submitted);
    printf("    trials (k tasks/s): moat %s; naive %s; CPU/wall: moat pool "
           "%.2f + caller %.2f cores, naive %.2f + %.2f; other processes "
           "%.2f / %.2f\n",
           ta, tb, cores_pool(&res[0].cpu), cores_caller(&res[0].cpu),
           cores_pool(&res[1].cpu), cores_caller(&res[1].cpu),
           cores_others(&res[0].cpu), cores_others(&res[1].cpu));
    check("2", batched ? "moat batch" : "moat single", &res[0].tally, 1);
    if (!cfg->moat_only)
        check("2", batched ? "naive batch" : "naive single", &res[1].tally,
              0);
    return 0;
}

static int row_cpu_tasks(const config_t *cfg) {
    tp_params_t p = {task_spin, CPU_THREADS, cfg->cpu_window, MAX_BATCH, 1,
                     cfg->cpu_ns};
    double ideal = CPU_THREADS * 1e9 / CPU_TASK_NS;
    tp_result_t res[2];
    double med[2];
    char a[64], b[64], c[64], ta[128], tb[128];
    int rc = tp_run(cfg, &p, res);
    if (rc != 0) {
        printf("ERROR 3   10 us tasks: %s\n", moat_strerror(rc));
        g_failed = 1;
        return rc;
    }
    for (int k = 0; k < 2; k++) {
        fmt_trials(k ? tb : ta, sizeof ta, res[k].rate, res[k].n, 1e3);
        med[k] = median_of(res[k].rate, res[k].n);
    }
    snprintf(a, sizeof a, "%.0f k/s %.1f%%", med[0] / 1e3,
             100 * med[0] / ideal);
    snprintf(b, sizeof b, "%.0f k/s %.1f%%", med[1] / 1e3,
             100 * med[1] / ideal);
    skip_peer(cfg, b, sizeof b);
    fmt_ratio(c, sizeof c, med[0], med[1], 0);
    printf(ROW_FMT, "3", "10 us CPU tasks on 2 threads (% ideal)", a,
           ">= 90% of ideal", med[0] >= 0.9 * ideal ? "ok" : "MISSED", b, c);
    printf("    inputs: pool of %u threads; tasks busy-loop %u us on "
           "CLOCK_MONOTONIC; ideal %.0f k/s; up to %zu in flight in "
           "batches of %zu; %u trials x %.1f s\n",
           CPU_THREADS, CPU_TASK_NS / 1000, ideal / 1e3, p.window, p.batch,
           cfg->trials, (double)p.dur_ns / 1e9);
    printf("    trials (k tasks/s): moat %s; naive %s; CPU/wall: moat pool "
           "%.2f + caller %.2f cores, naive %.2f + %.2f; other processes "
           "%.2f / %.2f\n",
           ta, tb, cores_pool(&res[0].cpu), cores_caller(&res[0].cpu),
           cores_pool(&res[1].cpu), cores_caller(&res[1].cpu),
           cores_others(&res[0].cpu), cores_others(&res[1].cpu));
    check("3", "moat 10 us", &res[0].tally, 1);
    if (!cfg->moat_only)
        check("3", "naive 10 us", &res[1].tally, 0);
    return 0;
}

/* ------------------------------- row 4: spawn + exit + monitor DOWN */

typedef struct spawn_state_s {
    moat_pool_t *pool;
    moat_pid_t self;
    uint64_t spawned, downs, bad;
    uint64_t refs_out, refs_in; /* sums of monitor refs, given and seen */
} spawn_state_t;

static int spawn_one(spawn_state_t *s) {
    for (;;) {
        moat_pid_t pid;
        uint64_t mref;
        int rc = moat_proc_spawn(s->pool, s->self, task_empty,
                                 moat_atom(MOAT_A_OK), MOAT_SPAWN_MONITOR,
                                 &pid, &mref);
        if (rc == 0) {
            s->spawned++;
            s->refs_out += mref;
            return 0;
        }
        if (rc != MOAT_EOVERLOADED)
            return rc;
        sched_yield();
    }
}

/* Takes one DOWN; anything but a `normal` DOWN counts as bad. */
static int down_one(spawn_state_t *s) {
    moat_msg_t *m;
    int rc = moat_proc_receive(s->pool, s->self, (int)(DRAIN_NS / 1000000),
                               &m);
    if (rc != 0)
        return rc;
    if (m->kind != MOAT_MSG_DOWN || !moat_term_is(m->term, MOAT_A_NORMAL))
        s->bad++;
    s->downs++;
    s->refs_in += m->ref;
    moat_msg_free(m);
    return 0;
}

static int spawn_trial(const config_t *cfg, size_t outstanding, double *rate,
                       cpu_span_t *cpu, tally_t *tally) {
    moat_pool_opts_t opts = {0};
    spawn_state_t s;
    sink_t sink;
    cpu_span_t c0, c1;
    uint64_t end;
    int rc;
    memset(&s, 0, sizeof s);
    sink_init(&sink);
    opts.nthreads = cfg->nthreads;
    opts.name = "bench";
    opts.complete = moat_complete; /* spawned processes never call back */
    opts.data = &sink;
    if ((rc = moat_pool_new(&opts, &s.pool)) != 0)
        return rc;
    if ((rc = moat_proc_open(s.pool, &s.self)) != 0) {
        moat_pool_free(s.pool);
        return rc;
    }
    c0 = cpu_mark();
    end = c0.wall + cfg->spawn_ns;
    while (rc == 0 && s.spawned < outstanding)
        rc = spawn_one(&s);
    while (rc == 0 && now_ns() < end) {
        rc = down_one(&s);
        if (rc == 0)
            rc = spawn_one(&s);
    }
    while (rc == 0 && s.downs < s.spawned)
        rc = down_one(&s);
    c1 = cpu_mark();
    cpu_add(cpu, c0, c1);
    *rate = (double)s.downs * 1e9 / (double)(c1.wall - c0.wall);
    tally->submitted += s.spawned;
    tally->completed += s.downs;
    tally->failed += s.bad + (s.refs_in != s.refs_out) +
                     atomic_load(&sink.completed); /* no callback expected */
    tally->stats_completed += pool_ended(s.pool, s.spawned);
    tally->drain_timeout |= rc == MOAT_ETIMEDOUT;
    moat_proc_close(s.pool, s.self, moat_atom(MOAT_A_NORMAL));
    moat_pool_free(s.pool);
    return rc == MOAT_ETIMEDOUT ? 0 : rc;
}

static int row_spawn(const config_t *cfg, size_t outstanding) {
    double rates[16], med;
    unsigned n = 0;
    cpu_span_t cpu = {0, 0, 0, 0};
    tally_t tally;
    char what[64], a[64], tr[128];
    int rc = 0;
    memset(&tally, 0, sizeof tally);
    for (unsigned t = 0; t < cfg->trials && rc == 0; t++)
        rc = spawn_trial(cfg, outstanding, &rates[n++], &cpu, &tally);
    snprintf(what, sizeof what, "spawn+exit+DOWN, %zu outstanding",
             outstanding);
    if (rc != 0) {
        printf("ERROR 4   %s: %s\n", what, moat_strerror(rc));
        g_failed = 1;
        return rc;
    }
    fmt_trials(tr, sizeof tr, rates, n, 1e3);
    med = median_of(rates, n);
    fmt_rate(a, sizeof a, med, "procs/s");
    printf(ROW_FMT, "4", what, a, "(none)", "-", "(see reference)", "");
    printf("    inputs: %u pool threads; one external process spawns with "
           "MOAT_SPAWN_MONITOR, empty task, waits for each DOWN "
           "(moat_proc_receive); %u trials x %.1f s; %llu processes\n",
           cfg->nthreads, cfg->trials, (double)cfg->spawn_ns / 1e9,
           (unsigned long long)tally.submitted);
    printf("    trials (k procs/s): %s; CPU/wall: pool %.2f + caller %.2f "
           "cores; other processes %.2f\n",
           tr, cores_pool(&cpu), cores_caller(&cpu), cores_others(&cpu));
    check("4", what, &tally, 1);
    return 0;
}

/* ---------------------------- row 5: native supervisor restarts */

/* A child whose init casts itself `crash`: the whole cycle (cast, crash,
 * terminate, exit signal over the link, the supervisor's EXIT and
 * intensity check, start, init) runs inside the pool with nothing from
 * outside in the loop, until `r5_target` inits have run.  Each init counts
 * itself in `r5_sink`, on which the caller sleeps: a caller polling for
 * the end would take a core from a two-thread pool on two cores. */
static moat_pool_t *r5_pool;
static moat_term_t *r5_crash;
static sink_t r5_sink;
static atomic_uint_fast64_t r5_target;

static int r5_init(moat_ctx_t *ctx, const char *args, int len, void **state,
                   ei_x_buff *out) {
    (void)args;
    (void)len;
    (void)out;
    *state = NULL;
    /* Cast before counting: once the count reaches the target the
     * caller may stop the pool. */
    if (atomic_load(&r5_sink.completed) + 1 < atomic_load(&r5_target))
        moat_server_cast(r5_pool, moat_self(ctx), r5_crash);
    sink_done(&r5_sink, MOAT_OK);
    return MOAT_OK;
}

static int r5_call(moat_ctx_t *ctx, void *state, const char *req, int len,
                   ei_x_buff *out) {
    (void)ctx;
    (void)state;
    (void)req;
    (void)len;
    return ei_x_encode_atom(out, "ok") ? MOAT_ERROR : MOAT_OK;
}

static int r5_cast(moat_ctx_t *ctx, void *state, const char *req, int len,
                   ei_x_buff *out) {
    (void)state;
    (void)req;
    (void)len;
    (void)out;
    return moat_error(ctx, "crash");
}

static const moat_server_def_t r5_def = {"crasher", r5_init, r5_call,
                                         r5_cast, NULL};

static int r5_trial(const config_t *cfg, uint64_t n, double *rate,
                    cpu_span_t *cpu, uint64_t *restarts) {
    moat_pool_opts_t opts = {0};
    moat_server_child_t child = {&r5_def, NULL, NULL};
    moat_child_spec_t spec;
    /* High intensity: a list scan over this window (OTP's) would walk up
     * to 10 million entries per restart. */
    moat_sup_opts_t so = {MOAT_ONE_FOR_ONE, 10000000, 10, NULL, NULL, NULL, NULL};
    moat_pool_stats_t st;
    moat_term_t *reason = NULL;
    moat_pid_t sup, w;
    uint64_t ref;
    sink_t sink;
    cpu_span_t c0, c1;
    moat_msg_t *m;
    int rc;
    sink_init(&sink);
    opts.nthreads = cfg->nthreads;
    opts.name = "bench";
    opts.complete = moat_complete;
    opts.data = &sink;
    if ((rc = moat_pool_new(&opts, &r5_pool)) != 0)
        return rc;
    child.args = moat_atom(MOAT_A_OK);
    spec.id = moat_atom(MOAT_A_OK);
    spec.start = moat_server_child_start;
    spec.arg = &child;
    spec.arg_free = NULL;
    spec.restart = MOAT_PERMANENT;
    spec.shutdown_ms = 1000;
    spec.type = MOAT_WORKER;
    sink_init(&r5_sink);
    atomic_store(&r5_target, n);
    c0 = cpu_mark();
    rc = moat_sup_start(r5_pool, 0, &so, &spec, 1, &sup, &reason);
    if (rc == 0 && sink_wait(&r5_sink, n, now_ns() + DRAIN_NS) != 0)
        rc = MOAT_ETIMEDOUT;
    c1 = cpu_mark();
    cpu_add(cpu, c0, c1);
    *rate = (double)(n - 1) * 1e9 / (double)(c1.wall - c0.wall);
    if (rc == 0 && (rc = moat_proc_open(r5_pool, &w)) == 0) {
        moat_proc_monitor(r5_pool, w, sup, &ref);
        moat_proc_exit(r5_pool, 0, sup, moat_atom(MOAT_A_SHUTDOWN));
        rc = moat_proc_receive(r5_pool, w, (int)(DRAIN_NS / 1000000), &m);
        if (rc == 0)
            moat_msg_free(m);
        moat_proc_close(r5_pool, w, moat_atom(MOAT_A_NORMAL));
    }
    /* Read once the supervisor is gone: the last init runs before the
     * supervisor counts its restart. */
    moat_pool_stats(r5_pool, &st);
    *restarts += st.restarts;
    moat_term_unref(reason);
    moat_pool_free(r5_pool);
    r5_pool = NULL;
    return rc;
}

static int row_restarts(const config_t *cfg) {
    double rates[16], med;
    unsigned n = 0;
    uint64_t per = cfg->quick ? 200000 : 2000000, restarts = 0;
    cpu_span_t cpu = {0, 0, 0, 0};
    char a[64], tr[128];
    int rc = 0;
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_atom(&x, "crash");
    r5_crash = moat_term_from_x(&x);
    for (unsigned t = 0; t < cfg->trials && rc == 0; t++)
        rc = r5_trial(cfg, per, &rates[n++], &cpu, &restarts);
    moat_term_unref(r5_crash);
    if (rc != 0 || restarts != (per - 1) * cfg->trials) {
        printf("ERROR 5   supervisor restarts: %s (restarts counted %llu, "
               "expected %llu)\n",
               rc != 0 ? moat_strerror(rc) : "a restart was lost",
               (unsigned long long)restarts,
               (unsigned long long)((per - 1) * cfg->trials));
        g_failed = 1;
        return rc != 0 ? rc : -1;
    }
    fmt_trials(tr, sizeof tr, rates, n, 1e3);
    med = median_of(rates, n);
    fmt_rate(a, sizeof a, med, "restarts/s");
    printf(ROW_FMT, "5", "native supervisor restarts, one_for_one", a,
           ">= 1,000,000/s", med >= 1e6 ? "ok" : "MISSED",
           "(see reference)", "");
    printf("    inputs: %u pool threads; intensity 10,000,000 in 10 s; one "
           "permanent native server whose init casts itself `crash`; each "
           "restart = cast, crash, terminate, exit signal, supervisor EXIT "
           "and intensity check, start, init; %u trials x %llu restarts\n",
           cfg->nthreads, cfg->trials, (unsigned long long)(per - 1));
    printf("    trials (k restarts/s): %s; CPU/wall: pool %.2f + caller "
           "%.2f cores; other processes %.2f\n",
           tr, cores_pool(&cpu), cores_caller(&cpu), cores_others(&cpu));
    printf("    reference figures, not measured in this run (REFERENCE.md "
           "§8, this kind of machine): OTP supervisor at high intensity "
           "~4-5 k/s steady; bare spawn_link + trap_exit loop ~308 k/s; a "
           "Rust actor runtime reports 285 k/s\n");
    return 0;
}

/* ------------------------------------------------------------------ main */

static void cpu_model(char *buf, size_t len) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    snprintf(buf, len, "unknown");
    if (f == NULL)
        return;
    while (fgets(line, sizeof line, f) != NULL) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "model name", 10) == 0 && colon != NULL) {
            colon += 1 + (colon[1] == ' ');
            colon[strcspn(colon, "\n")] = '\0';
            snprintf(buf, len, "%s", colon);
            break;
        }
    }
    fclose(f);
}

static void print_header(const config_t *cfg) {
    char model[128], date[64], load[64] = "?";
    struct utsname u;
    time_t now = time(NULL);
    FILE *f = fopen("/proc/loadavg", "r");
    if (f != NULL) {
        if (fgets(load, sizeof load, f) != NULL)
            load[strcspn(load, "\n")] = '\0';
        fclose(f);
    }
    cpu_model(model, sizeof model);
    strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S %Z", localtime(&now));
    if (uname(&u) != 0)
        snprintf(u.release, sizeof u.release, "?");
    printf("moat core benchmark (bench/core.c)\n");
    printf("  machine: %ld online CPUs (nproc), %s, Linux %s\n",
           sysconf(_SC_NPROCESSORS_ONLN), model, u.release);
    printf("  date:    %s; load average at start: %s\n", date, load);
    printf("  pools:   moat and the naive peer with %u threads (online CPUs) "
           "for rows 1, 2, 4; %u threads for row 3; moat defaults otherwise "
           "(spin 50 us, max_queue 65536)\n",
           cfg->nthreads, CPU_THREADS);
    printf("  peer:    naive pool in this file: one mutex + condvar FIFO, "
           "a condvar signal per submit, workers sleep when it is empty\n");
    printf("  repeat:  make bench   or   _build/c/plain/bench_core "
           "[--quick] [--row N]   (%s run; figures drift 20-40%% between "
           "runs: compare within one run)\n\n",
           cfg->quick ? "quick smoke" : "full");
    printf(ROW_FMT, "row", "figure", "moat", "target", "verdict",
           "naive peer", "moat vs peer");
}

int main(int argc, char **argv) {
    config_t cfg;
    const char *q = getenv("MOAT_BENCH_QUICK");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int only = 0; /* --row N: that row alone (for perf record) */
    memset(&cfg, 0, sizeof cfg);
    cfg.quick = q != NULL && q[0] != '\0' && strcmp(q, "0") != 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            cfg.quick = 1;
        } else if (strcmp(argv[i], "--moat-only") == 0) {
            cfg.moat_only = 1;
        } else if (strcmp(argv[i], "--row") == 0 && i + 1 < argc &&
                   atoi(argv[i + 1]) >= 1 && atoi(argv[i + 1]) <= 5) {
            only = atoi(argv[++i]);
        } else {
            fprintf(stderr,
                    "usage: %s [--quick] [--row 1|2|3|4|5] [--moat-only]\n",
                    argv[0]);
            return 2;
        }
    }
    cfg.nthreads = ncpu > 0 ? (unsigned)ncpu : 1;
    cfg.tp_window = 16384;
    cfg.tp_batch = MAX_BATCH;
    cfg.cpu_window = 2048;
    cfg.spawn_out = 64;
    if (cfg.quick) {
        cfg.trials = 1;
        cfg.rt_warm = 2000;
        cfg.rt_n = 20000;
        cfg.tp_ns = cfg.cpu_ns = cfg.spawn_ns = 200000000u;
    } else {
        /* About 45 s in all on two cores. */
        cfg.trials = 3;
        cfg.rt_warm = 10000;
        cfg.rt_n = 100000;
        cfg.tp_ns = 1500000000u;
        cfg.cpu_ns = 2000000000u;
        cfg.spawn_ns = 1500000000u;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    print_header(&cfg);
    if (only == 0 || only == 1)
        row_roundtrip(&cfg);
    if (only == 0 || only == 2) {
        row_throughput(&cfg, 1);
        row_throughput(&cfg, 0);
    }
    if (only == 0 || only == 3)
        row_cpu_tasks(&cfg);
    if (only == 0 || only == 4) {
        row_spawn(&cfg, cfg.spawn_out);
        row_spawn(&cfg, 1);
    }
    if (only == 0 || only == 4)
        printf("    reference for row 4 (reference figure, not measured in "
               "this run): BEAM spawn_monitor + reply, batched, ~300 k "
               "tasks/s on this kind of machine (REFERENCE.md section 8)\n");
    if (only == 0 || only == 5)
        row_restarts(&cfg);
    /* A quarter of a core taken by others already moves the round trip
     * and the 10 us row by more than their margins. */
    if (g_noise > 0.25)
        printf("\nnote: other processes kept up to %.2f cores busy during "
               "some rows (see \"other processes\" above); those figures "
               "are unreliable: repeat on a quiet machine\n",
               g_noise);
    if (g_failed)
        printf("\nbench_core: FAILED: see the ERROR rows above\n");
    return g_failed ? 1 : 0;
}
