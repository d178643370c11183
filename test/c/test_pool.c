/* test_pool.c: the worker pool: one outcome per task whatever ends it,
 * overload as a value, cancellation, deadlines, owners, abandoned tasks,
 * stop, stats and thread set-up. */
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "core_util.h"

typedef t_rec_t rec_t;

static atomic_int total_outcomes; /* every callback, for the stress cases */

static void record(moat_task_t *t, const moat_outcome_t *o, void *d) {
    t_record(t, o, d);
    atomic_fetch_add(&total_outcomes, 1);
}

static moat_pool_t *pool_make(unsigned threads, unsigned max_queue) {
    atomic_store(&total_outcomes, 0);
    return t_pool(threads, max_queue, "tpool", record);
}

/* ------------------------------------------------------------- tasks */

static atomic_int gate; /* tasks blocked on it run until it opens */

static int t_ok(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    (void)a;
    (void)n;
    ei_x_encode_atom(out, "ok");
    return MOAT_OK;
}

/* Echoes its argument list. */
static int t_echo(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    out->index = 0;
    return ei_x_append_buf(out, a, n) ? MOAT_ERROR : MOAT_OK;
}

static int t_gate(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    (void)a;
    (void)n;
    while (!atomic_load(&gate))
        sched_yield();
    ei_x_encode_atom(out, "late");
    return MOAT_OK;
}

/* Waits for moat_should_stop, or the gate. */
static int t_polite(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)a;
    (void)n;
    while (!moat_should_stop(c) && !atomic_load(&gate))
        sched_yield();
    ei_x_encode_atom(out, "late");
    return MOAT_OK;
}

static int t_fail(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)a;
    (void)n;
    (void)out;
    return moat_error(c, "bad %d", 42);
}

/* A plain message (no format directive) of 1500 bytes. */
static int t_fail_long(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    static char msg[1501];
    (void)a;
    (void)n;
    (void)out;
    memset(msg, 'x', 1500);
    msg[0] = 'p';
    return moat_error(c, msg);
}

static int t_exit(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    (void)a;
    (void)n;
    ei_x_encode_atom(out, "my_reason");
    return MOAT_EXIT;
}

static int t_badstatus(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    (void)a;
    (void)n;
    (void)out;
    return 7;
}

static int t_malformed(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    (void)a;
    (void)n;
    ei_x_encode_tuple_header(out, 3); /* and no elements */
    return MOAT_OK;
}

static moat_job_t job(moat_task_fn fn, void *data) {
    moat_job_t j = {fn, "test", NULL, t_nil(), 0, -1, data};
    return j;
}

static moat_task_t *submit(moat_pool_t *pool, moat_task_fn fn, rec_t *r,
                           uint64_t owner, int64_t timeout_ms) {
    moat_job_t j = job(fn, r);
    moat_task_t *t = NULL;
    j.owner = owner;
    j.timeout_ms = timeout_ms;
    assert_int_equal(moat_pool_submit(pool, &j, &t), 0);
    return t;
}

/* Returns once at least n tasks of the pool run. */
static void wait_running(moat_pool_t *pool, uint64_t n) {
    moat_pool_stats_t st;
    do {
        sched_yield();
        moat_pool_stats(pool, &st);
    } while (st.running < n);
}

/* Blocks every worker of the pool on the gate; returns once all run. */
static void block_workers(moat_pool_t *pool, rec_t *r, unsigned n) {
    atomic_store(&gate, 0);
    for (unsigned i = 0; i < n; i++)
        moat_task_release(submit(pool, t_gate, &r[i], 0, -1));
    wait_running(pool, n);
}

/* ------------------------------------------------------------- cases */

/* Each task's result reaches the callback once, with its kind and term. */
static void test_pool_result_and_reasons(void **state) {
    moat_pool_t *pool = pool_make(2, 0);
    rec_t r[6] = {0};
    moat_task_fn fns[6] = {t_ok, t_echo, t_fail, t_exit, t_badstatus,
                           t_malformed};
    moat_term_t *ok = t_atom("ok"), *mine = t_atom("my_reason"),
                *nil = t_nil();
    (void)state;
    for (int i = 0; i < 6; i++)
        moat_task_release(submit(pool, fns[i], &r[i], 0, -1));
    for (int i = 0; i < 6; i++)
        t_wait(&r[i]);
    assert_int_equal(r[0].kind, MOAT_OK);
    assert_true(moat_term_equal(r[0].term, ok));
    assert_int_equal(r[1].kind, MOAT_OK);
    assert_true(moat_term_equal(r[1].term, nil));
    assert_int_equal(r[2].kind, MOAT_EXIT);
    {
        moat_term_t *e = moat_term_tagged_binary("native_error", "bad 42", 6);
        assert_true(moat_term_equal(r[2].term, e));
        moat_term_unref(e);
    }
    assert_int_equal(r[3].kind, MOAT_EXIT);
    assert_true(moat_term_equal(r[3].term, mine));
    for (int i = 4; i < 6; i++) {
        assert_int_equal(r[i].kind, MOAT_EXIT);
        assert_true(moat_term_is_abnormal(r[i].term));
    }
    moat_pool_free(pool);
    for (int i = 0; i < 6; i++)
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
    t_rec_clear(r, 6);
    moat_term_unref(ok);
    moat_term_unref(mine);
    moat_term_unref(nil);
}

/* moat_error's message, plain or formatted, is cut at 1023 bytes. */
static void test_pool_error_message_cut(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r = {0};
    char want[1023];
    moat_term_t *e;
    (void)state;
    moat_task_release(submit(pool, t_fail_long, &r, 0, -1));
    t_wait(&r);
    memset(want, 'x', sizeof want);
    want[0] = 'p';
    e = moat_term_tagged_binary("native_error", want, sizeof want);
    assert_int_equal(r.kind, MOAT_EXIT);
    assert_true(moat_term_equal(r.term, e));
    moat_term_unref(e);
    moat_pool_free(pool);
    t_rec_clear(&r, 1);
}

/* A full pool refuses with MOAT_EOVERLOADED, never blocks, and a refused
 * task gets no callback; size + max_queue tasks are admitted. */
/* A task knows when it was accepted (moat_task_submitted): between the
 * clock before and after the submit, for one task and for a batch. */
static void test_pool_task_submitted_time(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r[3] = {0};
    moat_job_t js[2] = {job(t_ok, &r[1]), job(t_ok, &r[2])};
    moat_task_t *t, *ts[2];
    uint64_t before, after;
    (void)state;
    before = uv_hrtime();
    t = submit(pool, t_ok, &r[0], 0, -1);
    after = uv_hrtime();
    assert_true(moat_task_submitted(t) >= before);
    assert_true(moat_task_submitted(t) <= after);
    before = uv_hrtime();
    assert_int_equal(moat_pool_submit_batch(pool, js, 2, ts), 2);
    after = uv_hrtime();
    for (int i = 0; i < 2; i++) {
        assert_true(moat_task_submitted(ts[i]) >= before);
        assert_true(moat_task_submitted(ts[i]) <= after);
        moat_task_release(ts[i]);
    }
    moat_task_release(t);
    for (int i = 0; i < 3; i++)
        t_wait(&r[i]);
    moat_pool_free(pool);
    t_rec_clear(r, 3);
}

static void test_pool_overload_is_a_value(void **state) {
    moat_pool_t *pool = pool_make(1, 2);
    rec_t r[4] = {0};
    moat_job_t j = job(t_ok, &r[3]);
    moat_pool_stats_t st;
    (void)state;
    block_workers(pool, r, 1);
    moat_task_release(submit(pool, t_ok, &r[1], 0, -1));
    moat_task_release(submit(pool, t_ok, &r[2], 0, -1));
    assert_int_equal(moat_pool_submit(pool, &j, NULL), MOAT_EOVERLOADED);
    moat_term_unref(j.args); /* refused: still ours */
    moat_pool_stats(pool, &st);
    assert_int_equal(st.rejected, 1);
    assert_int_equal(st.queued, 2);
    atomic_store(&gate, 1);
    for (int i = 0; i < 3; i++)
        t_wait(&r[i]);
    moat_pool_free(pool);
    assert_int_equal(atomic_load(&r[3].outcomes), 0);
    t_rec_clear(r, 4);
}

/* A batch is queued whole when it fits, and cut at the admission limit
 * when it does not; every accepted task has one outcome. */
static void test_pool_batch_submit(void **state) {
    enum { N = 100 };
    moat_pool_t *pool = pool_make(2, 50);
    rec_t r[N] = {0}, g[2] = {0};
    moat_job_t jobs[N];
    moat_task_t *ts[N];
    int k;
    (void)state;
    for (int i = 0; i < N; i++)
        jobs[i] = job(t_ok, &r[i]);
    block_workers(pool, g, 2);
    k = moat_pool_submit_batch(pool, jobs, N, ts);
    assert_int_equal(k, 50);
    for (int i = k; i < N; i++)
        moat_term_unref(jobs[i].args);
    atomic_store(&gate, 1);
    for (int i = 0; i < k; i++) {
        t_wait(&r[i]);
        moat_task_release(ts[i]);
    }
    moat_pool_free(pool);
    for (int i = 0; i < N; i++)
        assert_int_equal(atomic_load(&r[i].outcomes), i < k ? 1 : 0);
    t_rec_clear(r, N);
    t_rec_clear(g, 2);
}

/* Cancelling a queued task removes it at once: the callback has run with
 * `shutdown` when cancel returns, and the body never runs. */
static void test_pool_cancel_queued(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t g[1] = {0}, r = {0};
    moat_task_t *t;
    (void)state;
    block_workers(pool, g, 1);
    t = submit(pool, t_ok, &r, 0, -1);
    assert_int_equal(moat_task_cancel(t, MOAT_A_SHUTDOWN, 0), 1);
    assert_int_equal(atomic_load(&r.outcomes), 1);
    assert_true(moat_term_is(r.term, MOAT_A_SHUTDOWN));
    assert_int_equal(moat_task_cancel(t, MOAT_A_SHUTDOWN, 0), 0);
    moat_task_release(t);
    atomic_store(&gate, 1);
    moat_pool_free(pool);
    assert_int_equal(atomic_load(&r.outcomes), 1);
    t_rec_clear(&r, 1);
    t_rec_clear(g, 1);
}

/* Cancelling a running task flags it (moat_should_stop) and decides its
 * outcome at once; its late result is discarded. */
static void test_pool_cancel_running_flags_task(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r = {0};
    moat_task_t *t;
    (void)state;
    atomic_store(&gate, 0);
    t = submit(pool, t_polite, &r, 0, -1);
    wait_running(pool, 1);
    assert_int_equal(moat_task_cancel(t, MOAT_A_KILLED, 0), 1);
    assert_true(moat_term_is(r.term, MOAT_A_KILLED));
    moat_task_release(t);
    moat_pool_free(pool); /* joins: the polite body has seen the flag */
    assert_int_equal(atomic_load(&r.outcomes), 1);
    t_rec_clear(&r, 1);
}

/* A silent cancel decides the outcome without calling back; cancelling a
 * finished task returns 0 and changes nothing. */
static void test_pool_cancel_silent_and_after_completion(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t g[1] = {0}, r1 = {0}, r2 = {0};
    moat_task_t *t1, *t2;
    (void)state;
    t2 = submit(pool, t_ok, &r2, 0, -1);
    t_wait(&r2);
    assert_int_equal(moat_task_cancel(t2, MOAT_A_SHUTDOWN, 0), 0);
    assert_int_equal(r2.kind, MOAT_OK);
    block_workers(pool, g, 1);
    t1 = submit(pool, t_ok, &r1, 0, -1);
    assert_int_equal(moat_task_cancel(t1, MOAT_A_SHUTDOWN, MOAT_CANCEL_SILENT),
                     1);
    atomic_store(&gate, 1);
    moat_task_release(t1);
    moat_task_release(t2);
    moat_pool_free(pool);
    assert_int_equal(atomic_load(&r1.outcomes), 0);
    assert_int_equal(atomic_load(&r2.outcomes), 1);
    t_rec_clear(&r2, 1);
    t_rec_clear(g, 1);
}

/* A deadline ends a running task with `timeout`, and a queued one without
 * ever running it; both count as timeouts. */
static void test_pool_deadline_timeout(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r1 = {0}, r2 = {0};
    moat_pool_stats_t st;
    (void)state;
    atomic_store(&gate, 0);
    moat_task_release(submit(pool, t_polite, &r1, 0, 30));
    moat_task_release(submit(pool, t_ok, &r2, 0, 10));
    t_wait(&r1);
    t_wait(&r2);
    assert_true(moat_term_is(r1.term, MOAT_A_TIMEOUT));
    assert_true(moat_term_is(r2.term, MOAT_A_TIMEOUT));
    moat_pool_stats(pool, &st);
    assert_int_equal(st.timeouts, 2);
    moat_pool_free(pool);
    assert_int_equal(atomic_load(&r1.outcomes), 1);
    assert_int_equal(atomic_load(&r2.outcomes), 1);
    t_rec_clear(&r1, 1);
    t_rec_clear(&r2, 1);
}

/* Deadlines of more lengths than there are deadline queues (the rest go
 * on the heap), armed out of order: every one fires, each with `timeout`,
 * and shorter ones never after longer ones armed at the same time. */
static atomic_int fire_seq;
static int fired_at[24];
static rec_t *fired_recs;

static void record_order(moat_task_t *t, const moat_outcome_t *o, void *d) {
    rec_t *r = moat_task_data(t);
    if (r >= fired_recs && r < fired_recs + 24) /* not the blocker */
        fired_at[r - fired_recs] = atomic_fetch_add(&fire_seq, 1);
    record(t, o, d);
}

static void test_pool_deadline_many_lengths(void **state) {
    moat_pool_t *pool = t_pool(1, 0, "tdl", record_order);
    rec_t blocker = {0}, r[24] = {0};
    (void)state;
    fired_recs = r;
    atomic_store(&fire_seq, 0);
    atomic_store(&gate, 0);
    moat_task_release(submit(pool, t_gate, &blocker, 0, -1));
    /* 12 lengths, 10 ms apart, two tasks each, longest first. */
    for (int i = 23; i >= 0; i--)
        moat_task_release(submit(pool, t_ok, &r[i], 0, 10 + 10 * (i / 2)));
    for (int i = 0; i < 24; i++) {
        t_wait(&r[i]);
        assert_true(moat_term_is(r[i].term, MOAT_A_TIMEOUT));
    }
    for (int i = 2; i < 24; i++)
        assert_true(fired_at[i - 2] < fired_at[i]);
    atomic_store(&gate, 1);
    t_wait(&blocker);
    moat_pool_free(pool);
    t_rec_clear(&blocker, 1);
    t_rec_clear(r, 24);
}

/* A task that finishes before its deadline keeps its result. */
static void test_pool_deadline_not_reached(void **state) {
    moat_pool_t *pool = pool_make(2, 0);
    rec_t r[20] = {0};
    (void)state;
    for (int i = 0; i < 20; i++)
        moat_task_release(submit(pool, t_ok, &r[i], 0, 60000));
    for (int i = 0; i < 20; i++) {
        t_wait(&r[i]);
        assert_int_equal(r[i].kind, MOAT_OK);
    }
    moat_pool_free(pool); /* frees the still-armed deadlines */
    t_rec_clear(r, 20);
}

/* Cancelling an owner ends exactly its tasks, queued and running. */
static void test_pool_cancel_owner(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t a[10] = {0}, b[10] = {0};
    (void)state;
    atomic_store(&gate, 0);
    moat_task_release(submit(pool, t_polite, &a[0], 42, -1));
    wait_running(pool, 1);
    for (int i = 1; i < 10; i++)
        moat_task_release(submit(pool, t_ok, &a[i], 42, -1));
    for (int i = 0; i < 10; i++)
        moat_task_release(submit(pool, t_ok, &b[i], 43, -1));
    assert_int_equal(moat_pool_cancel_owner(pool, 42, MOAT_A_SHUTDOWN, 0), 10);
    assert_int_equal(moat_pool_cancel_owner(pool, 42, MOAT_A_SHUTDOWN, 0), 0);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(atomic_load(&a[i].outcomes), 1);
        assert_true(moat_term_is(a[i].term, MOAT_A_SHUTDOWN));
        t_wait(&b[i]);
        assert_int_equal(b[i].kind, MOAT_OK);
    }
    moat_pool_free(pool);
    t_rec_clear(a, 10);
    t_rec_clear(b, 10);
}

/* Tasks that ignore cancellation keep their threads, and replacement
 * threads keep the pool serving; once they return, the pool shrinks back
 * to its size. */
static void test_pool_abandoned_tasks_do_not_starve(void **state) {
    moat_pool_t *pool = pool_make(2, 0);
    rec_t stuck[2] = {0}, r[50] = {0};
    moat_task_t *ts[2];
    moat_pool_stats_t st;
    (void)state;
    atomic_store(&gate, 0);
    for (int i = 0; i < 2; i++)
        ts[i] = submit(pool, t_gate, &stuck[i], 0, -1);
    wait_running(pool, 2);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(moat_task_cancel(ts[i], MOAT_A_SHUTDOWN, 0), 1);
        moat_task_release(ts[i]);
    }
    for (int i = 0; i < 50; i++)
        moat_task_release(submit(pool, t_ok, &r[i], 0, -1));
    for (int i = 0; i < 50; i++)
        t_wait(&r[i]);
    /* The housekeeper starts the replacements in its own time: the first
     * may have run all 50 before the second is up (seen under TSan). */
    for (int i = 0;; i++) {
        moat_pool_stats(pool, &st);
        if (st.threads == 4)
            break;
        if (i >= 10000)
            fail_msg("%llu threads, not 4", (unsigned long long)st.threads);
        uv_sleep(1);
    }
    assert_int_equal(st.abandoned, 2);
    atomic_store(&gate, 1);
    do {
        sched_yield();
        moat_pool_stats(pool, &st);
    } while (st.abandoned > 0 || st.threads > 2);
    moat_pool_free(pool);
    for (int i = 0; i < 2; i++)
        assert_int_equal(atomic_load(&stuck[i].outcomes), 1);
    t_rec_clear(stuck, 2);
    t_rec_clear(r, 50);
}

/* Waits for r's outcome for at most `ms`; returns whether it came. */
static int wait_for(rec_t *r, uint64_t ms) {
    uint64_t end = uv_hrtime() + ms * 1000000u;
    while (!atomic_load_explicit(&r->ready, memory_order_acquire)) {
        if (uv_hrtime() >= end)
            return 0;
        sched_yield();
    }
    return 1;
}

/* A body that returns the moment its cancel lands can reach its end
 * before the cancel has counted its thread out.  Whichever comes first,
 * the pool keeps its one thread and runs the next task: the body's end
 * once counted itself as a surplus thread and retired, and the cancel
 * then found no room for a replacement, which left the pool without a
 * thread and the next task queued for ever.  (The window is a few
 * instructions wide: this caught it in one run of four to eight with
 * three busy loops beside it, rarely on an idle machine.) */
static void test_pool_cancel_racing_the_body_keeps_the_thread(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    moat_pool_stats_t st;
    (void)state;
    atomic_store(&gate, 0);
    for (int i = 0; i < 2000; i++) {
        rec_t polite = {0}, ok = {0};
        moat_task_t *t = submit(pool, t_polite, &polite, 0, -1);
        wait_running(pool, 1);
        assert_int_equal(moat_task_cancel(t, MOAT_A_SHUTDOWN, 0), 1);
        moat_task_release(t);
        moat_task_release(submit(pool, t_ok, &ok, 0, -1));
        if (!wait_for(&ok, 5000)) {
            moat_pool_stats(pool, &st);
            fail_msg("round %d: a task waited 5 s on a pool of %llu threads",
                     i, (unsigned long long)st.threads);
        }
        t_wait(&polite);
        t_rec_clear(&polite, 1);
        t_rec_clear(&ok, 1);
    }
    for (int i = 0;; i++) {
        moat_pool_stats(pool, &st);
        if (st.abandoned == 0 && st.threads == 1)
            break;
        if (i >= 10000)
            fail_msg("%llu threads, %llu abandoned, not 1 and 0",
                     (unsigned long long)st.threads,
                     (unsigned long long)st.abandoned);
        uv_sleep(1);
    }
    moat_pool_free(pool);
}

/* moat_pool_stats never goes back: a thread that retires after its
 * abandoned body returns hands its counts to the pool's, and no reader
 * sees them missing meanwhile. */
typedef struct {
    moat_pool_t *pool;
    atomic_int done;
    atomic_long drops;
} stats_reader_t;

static void *read_stats(void *arg) {
    stats_reader_t *sr = arg;
    uint64_t last = 0;
    while (!atomic_load(&sr->done)) {
        moat_pool_stats_t st;
        moat_pool_stats(sr->pool, &st);
        if (st.completed < last)
            atomic_fetch_add(&sr->drops, 1);
        last = st.completed;
    }
    return NULL;
}

static void test_pool_stats_never_go_back(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    stats_reader_t sr = {pool, 0, 0};
    pthread_t reader;
    moat_pool_stats_t st;
    int rounds = 200;
    (void)state;
    assert_int_equal(pthread_create(&reader, NULL, read_stats, &sr), 0);
    for (int round = 0; round < rounds; round++) {
        rec_t ok[5] = {0}, stuck = {0};
        moat_task_t *t;
        for (int i = 0; i < 5; i++)
            moat_task_release(submit(pool, t_ok, &ok[i], 0, -1));
        for (int i = 0; i < 5; i++)
            t_wait(&ok[i]);
        /* This thread, with its 5 counts, takes the gate and is
         * abandoned; a replacement serves; the gate opens and one of the
         * two retires. */
        atomic_store(&gate, 0);
        t = submit(pool, t_gate, &stuck, 0, -1);
        wait_running(pool, 1);
        assert_int_equal(moat_task_cancel(t, MOAT_A_SHUTDOWN, 0), 1);
        moat_task_release(t);
        atomic_store(&gate, 1);
        do {
            sched_yield();
            moat_pool_stats(pool, &st);
        } while (st.abandoned > 0 || st.threads > 1);
        t_rec_clear(ok, 5);
        t_rec_clear(&stuck, 1);
    }
    atomic_store(&sr.done, 1);
    assert_int_equal(pthread_join(reader, NULL), 0);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.completed, 5 * (uint64_t)rounds);
    assert_int_equal(atomic_load(&sr.drops), 0);
    moat_pool_free(pool);
}

/* Stop gives every queued and running task `shutdown`, refuses new work
 * with MOAT_ECLOSED, and returns once every body has returned. */
static void test_pool_stop_ends_everything(void **state) {
    moat_pool_t *pool = pool_make(2, 0);
    rec_t r[20] = {0};
    moat_job_t j;
    (void)state;
    atomic_store(&gate, 0);
    for (int i = 0; i < 20; i++)
        moat_task_release(submit(pool, i < 2 ? t_polite : t_ok, &r[i], 0, -1));
    moat_pool_stop(pool);
    for (int i = 0; i < 20; i++) {
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
        if (i < 2)
            assert_true(moat_term_is(r[i].term, MOAT_A_SHUTDOWN));
    }
    j = job(t_ok, &r[0]);
    assert_int_equal(moat_pool_submit(pool, &j, NULL), MOAT_ECLOSED);
    moat_term_unref(j.args);
    moat_pool_stop(pool); /* idempotent */
    moat_pool_free(pool);
    t_rec_clear(r, 20);
}

/* Close settles every task with `shutdown` at once and waits for no
 * thread: a body that ignores its stop flag is still running afterwards,
 * moat_task_running says so until it returns, and stop then joins it. */
static void test_pool_close_waits_for_no_thread(void **state) {
    moat_pool_t *pool = pool_make(2, 0);
    rec_t r[6] = {0};
    moat_task_t *stuck, *queued;
    moat_job_t j;
    (void)state;
    block_workers(pool, r, 2);
    stuck = submit(pool, t_ok, &r[2], 0, -1); /* queued behind them */
    queued = stuck;
    assert_int_equal(moat_task_running(queued), 0);
    moat_pool_close(pool);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
        assert_true(moat_term_is(r[i].term, MOAT_A_SHUTDOWN));
    }
    assert_int_equal(moat_task_running(queued), 0);
    j = job(t_ok, &r[3]);
    assert_int_equal(moat_pool_submit(pool, &j, NULL), MOAT_ECLOSED);
    moat_term_unref(j.args);
    moat_pool_close(pool); /* idempotent */
    atomic_store(&gate, 1);
    moat_pool_stop(pool);
    moat_task_release(queued);
    moat_pool_free(pool);
    t_rec_clear(r, 4);
}

/* moat_task_running follows a cancelled body until it returns. */
static void test_pool_task_running_after_cancel(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r[1] = {0};
    moat_task_t *t;
    (void)state;
    atomic_store(&gate, 0);
    t = submit(pool, t_gate, &r[0], 0, -1);
    while (!moat_task_running(t))
        sched_yield();
    assert_int_equal(moat_task_cancel(t, MOAT_A_SHUTDOWN, MOAT_CANCEL_SILENT), 1);
    assert_int_equal(moat_task_running(t), 1);
    atomic_store(&gate, 1);
    while (moat_task_running(t))
        sched_yield();
    assert_int_equal(atomic_load(&r[0].outcomes), 0); /* silent */
    moat_task_release(t);
    moat_pool_free(pool);
}

/* The counters add up: completed, failed, cancelled. */
static void test_pool_stats_counters(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r[10] = {0}, g[1] = {0};
    moat_task_t *t;
    moat_pool_stats_t st;
    (void)state;
    for (int i = 0; i < 5; i++)
        moat_task_release(submit(pool, t_ok, &r[i], 0, -1));
    for (int i = 5; i < 8; i++)
        moat_task_release(submit(pool, t_fail, &r[i], 0, -1));
    for (int i = 0; i < 8; i++)
        t_wait(&r[i]);
    block_workers(pool, g, 1);
    t = submit(pool, t_ok, &r[8], 0, -1);
    moat_task_cancel(t, MOAT_A_SHUTDOWN, 0);
    moat_task_release(t);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.completed, 5);
    assert_int_equal(st.failed, 3);
    assert_int_equal(st.cancelled, 1);
    assert_int_equal(st.queued, 0);
    assert_int_equal(st.running, 1);
    assert_int_equal(st.threads, 1);
    atomic_store(&gate, 1);
    moat_pool_free(pool);
    t_rec_clear(r, 10);
    t_rec_clear(g, 1);
}

/* Pool threads are named and block every signal but the faults, whose
 * handlers would be bypassed if they were blocked (MOAT_FAULT_SIGNALS). */
static int t_inspect(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    static const int faults[] = {MOAT_FAULT_SIGNALS};
    char name[16] = "";
    sigset_t mask;
    int faults_open = 1;
    (void)c;
    (void)a;
    (void)n;
    pthread_getname_np(pthread_self(), name, sizeof name);
    pthread_sigmask(SIG_BLOCK, NULL, &mask);
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
        faults_open = faults_open && !sigismember(&mask, faults[i]);
    ei_x_encode_tuple_header(out, 2);
    ei_x_encode_atom(out, name);
    ei_x_encode_atom(out, sigismember(&mask, SIGINT) &&
                                  sigismember(&mask, SIGTERM) &&
                                  sigismember(&mask, SIGCHLD) &&
                                  sigismember(&mask, SIGUSR1) && faults_open
                              ? "blocked"
                              : "open");
    return MOAT_OK;
}

static void test_pool_threads_named_signals_blocked(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r = {0};
    moat_term_t *want = t_pair("tpool:w0", "blocked");
    (void)state;
    moat_task_release(submit(pool, t_inspect, &r, 0, -1));
    t_wait(&r);
    assert_true(moat_term_equal(r.term, want));
    moat_term_unref(want);
    moat_pool_free(pool);
    t_rec_clear(&r, 1);
}

/* Threads of this process named `name`. */
static int threads_named(const char *name) {
    DIR *d = opendir("/proc/self/task");
    struct dirent *de;
    int n = 0;
    assert_non_null(d);
    while ((de = readdir(d)) != NULL) {
        char path[300], comm[32] = "";
        FILE *f;
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", de->d_name);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        if (fgets(comm, sizeof comm, f) != NULL)
            comm[strcspn(comm, "\n")] = '\0';
        fclose(f);
        n += strcmp(comm, name) == 0;
    }
    closedir(d);
    return n;
}

/* Waits up to 10 s for `n` threads named `name`: a new thread names
 * itself as it starts, and a joined one may be listed for a moment. */
static void expect_threads_named(const char *name, int n) {
    for (int i = 0; threads_named(name) != n; i++) {
        if (i >= 10000)
            fail_msg("%d threads named %s, not %d", threads_named(name),
                     name, n);
        uv_sleep(1);
    }
}

/* The housekeeper starts on first need: a pool that has run tasks
 * without a deadline has none; the first deadline starts it (one that
 * never fires here: a fired one would abandon the body, and the
 * replacement thread the housekeeper starts bears its name for a
 * moment).  The body waits on the gate, for a deadline is armed only
 * while its task is open.  test_pool_deadline_timeout shows deadlines
 * fire. */
static void test_pool_housekeeper_starts_on_first_need(void **state) {
    moat_pool_t *pool = pool_make(1, 0);
    rec_t r1 = {0}, r2 = {0};
    (void)state;
    moat_task_release(submit(pool, t_ok, &r1, 0, -1));
    t_wait(&r1);
    assert_int_equal(threads_named("tpool:hk0"), 0);
    atomic_store(&gate, 0);
    moat_task_release(submit(pool, t_gate, &r2, 0, 60000));
    expect_threads_named("tpool:hk0", 1);
    atomic_store(&gate, 1);
    t_wait(&r2);
    assert_false(moat_term_is(r2.term, MOAT_A_TIMEOUT));
    moat_pool_free(pool);
    expect_threads_named("tpool:hk0", 0);
    t_rec_clear(&r1, 1);
    t_rec_clear(&r2, 1);
}

/* ------------------------------------------------- tasks run here */

static moat_pool_t *lazy_pool(unsigned max_queue) {
    moat_pool_opts_t o = {0};
    moat_pool_t *pool = NULL;
    atomic_store(&total_outcomes, 0);
    o.nthreads = 1;
    o.max_queue = max_queue;
    o.name = "tlazy";
    o.complete = record;
    o.lazy_threads = 1;
    assert_int_equal(moat_pool_new(&o, &pool), 0);
    return pool;
}

static pthread_t body_thread;

static int t_where(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    body_thread = pthread_self();
    return t_ok(c, a, n, out);
}

/* moat_pool_run_here runs the body and calls back on the caller's
 * thread, with the outcomes a worker gives; a lazy pool has no thread
 * until something is queued. */
static void test_pool_run_here_outcomes(void **state) {
    moat_pool_t *pool = lazy_pool(1);
    moat_here_t h1 = MOAT_HERE_INIT, h2 = MOAT_HERE_INIT,
                h3 = MOAT_HERE_INIT;
    rec_t r[5] = {0};
    moat_job_t j;
    moat_pool_stats_t st;
    (void)state;
    j = job(t_where, &r[0]);
    assert_int_equal(moat_pool_run_here(pool, &j, &h1), 0);
    assert_int_equal(atomic_load(&r[0].outcomes), 1);
    assert_int_equal(r[0].kind, MOAT_OK);
    assert_true(pthread_equal(body_thread, pthread_self()));
    j = job(t_fail, &r[1]);
    assert_int_equal(moat_pool_run_here(pool, &j, &h2), 0);
    assert_int_equal(atomic_load(&r[1].outcomes), 1);
    assert_int_equal(r[1].kind, MOAT_EXIT);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.completed, 1);
    assert_int_equal(st.failed, 1);
    assert_int_equal(st.running, 0);
    assert_int_equal(threads_named("tlazy:w0"), 0);
    /* What the caller keeps itself, and a full pool, are refused. */
    j = job(t_ok, &r[2]);
    j.timeout_ms = 10;
    assert_int_equal(moat_pool_run_here(pool, &j, &h3), MOAT_EINVAL);
    j.timeout_ms = -1;
    j.owner = 7;
    assert_int_equal(moat_pool_run_here(pool, &j, &h3), MOAT_EINVAL);
    moat_term_unref(j.args);
    block_workers(pool, &r[3], 1); /* starts the worker */
    expect_threads_named("tlazy:w0", 1);
    moat_task_release(submit(pool, t_ok, &r[4], 0, -1)); /* queued */
    j = job(t_ok, &r[2]);
    assert_int_equal(moat_pool_run_here(pool, &j, &h3), MOAT_EOVERLOADED);
    assert_int_equal(atomic_load(&r[2].outcomes), 0);
    moat_term_unref(j.args); /* still ours */
    atomic_store(&gate, 1);
    t_wait(&r[4]);
    moat_pool_free(pool);
    assert_int_equal(atomic_load(&total_outcomes), 4);
    t_rec_clear(r, 5);
}

static moat_here_t *signal_here;

static void on_stop_signal(int sig) {
    (void)sig;
    moat_here_stop(signal_here);
}

static atomic_int body_began;

/* t_polite, saying when it begins. */
static int t_polite_began(moat_ctx_t *c, const char *a, int n,
                          ei_x_buff *out) {
    atomic_store(&body_began, 1);
    return t_polite(c, a, n, out);
}

static void *send_stop_signal(void *arg) {
    (void)arg;
    while (!atomic_load(&body_began))
        sched_yield();
    pthread_kill(body_thread, SIGUSR1);
    return NULL;
}

/* moat_here_stop, from a signal handler on the body's thread while the
 * body runs, or before it begins, makes moat_should_stop true; the
 * outcome is still the body's. */
static void test_pool_run_here_stop_from_signal(void **state) {
    moat_pool_t *pool = lazy_pool(0);
    moat_here_t h1 = MOAT_HERE_INIT, h2 = MOAT_HERE_INIT;
    struct sigaction sa, old;
    rec_t r[2] = {0};
    pthread_t tid;
    moat_job_t j;
    (void)state;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    assert_int_equal(sigaction(SIGUSR1, &sa, &old), 0);
    atomic_store(&gate, 0);
    signal_here = &h1;
    body_thread = pthread_self();
    atomic_store(&body_began, 0);
    assert_int_equal(pthread_create(&tid, NULL, send_stop_signal, NULL), 0);
    j = job(t_polite_began, &r[0]);
    assert_int_equal(moat_pool_run_here(pool, &j, &h1), 0);
    pthread_join(tid, NULL);
    assert_int_equal(atomic_load(&r[0].outcomes), 1);
    assert_int_equal(r[0].kind, MOAT_OK); /* "late": the body's own */
    moat_here_stop(&h2); /* before: t_polite returns at once */
    j = job(t_polite, &r[1]);
    assert_int_equal(moat_pool_run_here(pool, &j, &h2), 0);
    assert_int_equal(atomic_load(&r[1].outcomes), 1);
    assert_int_equal(sigaction(SIGUSR1, &old, NULL), 0);
    moat_pool_free(pool);
    t_rec_clear(r, 2);
}

static void *close_when_running(void *arg) {
    moat_pool_t *pool = arg;
    while (!atomic_load(&body_began))
        sched_yield();
    moat_pool_close(pool);
    return NULL;
}

/* A close from another thread ends a body run here as it ends a
 * worker's: the outcome `shutdown` at once, the body flagged and
 * abandoned (counted as such until it returns), no replacement thread. */
static void test_pool_run_here_abandoned_by_close(void **state) {
    moat_pool_t *pool = lazy_pool(0);
    moat_here_t h = MOAT_HERE_INIT;
    moat_pool_stats_t st;
    rec_t r = {0};
    pthread_t tid;
    moat_job_t j;
    (void)state;
    atomic_store(&gate, 0);
    atomic_store(&body_began, 0);
    assert_int_equal(pthread_create(&tid, NULL, close_when_running, pool), 0);
    j = job(t_polite_began, &r);
    assert_int_equal(moat_pool_run_here(pool, &j, &h), 0);
    pthread_join(tid, NULL);
    assert_int_equal(atomic_load(&r.outcomes), 1);
    assert_true(moat_term_is(r.term, MOAT_A_SHUTDOWN));
    moat_pool_stats(pool, &st);
    assert_int_equal(st.abandoned, 0);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.cancelled, 1);
    assert_int_equal(threads_named("tlazy:w0"), 0);
    assert_int_equal(threads_named("tlazy:hk0"), 0);
    j = job(t_ok, &r);
    assert_int_equal(moat_pool_run_here(pool, &j, &h), MOAT_ECLOSED);
    moat_term_unref(j.args);
    moat_pool_free(pool);
    t_rec_clear(&r, 1);
}

/* Bad arguments are values. */
static void test_pool_invalid_arguments(void **state) {
    moat_pool_opts_t o = {0};
    moat_pool_t *pool = NULL;
    moat_job_t j = {NULL, "x", NULL, NULL, 0, -1, NULL};
    (void)state;
    assert_int_equal(moat_pool_new(&o, &pool), MOAT_EINVAL); /* no callback */
    pool = pool_make(1, 0);
    assert_int_equal(moat_pool_submit(pool, &j, NULL), MOAT_EINVAL);
    assert_int_equal(moat_pool_submit_batch(pool, &j, 0, NULL), MOAT_EINVAL);
    assert_int_equal(moat_pool_cancel_owner(pool, 0, MOAT_A_SHUTDOWN, 0),
                     MOAT_EINVAL);
    moat_pool_free(pool);
}

/* Exactly one outcome per task under a random mix of results, failures,
 * cancellations, deadlines and owner deaths, racing from two threads. */
typedef struct stress_s {
    moat_pool_t *pool;
    rec_t *recs;
    int n;
    unsigned seed;
} stress_t;

static int t_short(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)a;
    (void)n;
    for (int i = 0; i < 200 && !moat_should_stop(c); i++)
        sched_yield();
    ei_x_encode_atom(out, "ok");
    return MOAT_OK;
}

static void *stress_thread(void *arg) {
    stress_t *s = arg;
    moat_task_t **ts = calloc((size_t)s->n, sizeof *ts);
    for (int i = 0; i < s->n; i++) {
        int what = (int)(rand_r(&s->seed) % 6);
        moat_task_fn fn = what == 1 ? t_fail : what == 2 ? t_short : t_ok;
        moat_job_t j = job(fn, &s->recs[i]);
        j.owner = 1 + (uint64_t)(rand_r(&s->seed) % 8);
        j.timeout_ms = what == 3 ? (int64_t)(rand_r(&s->seed) % 3) : -1;
        if (moat_pool_submit(s->pool, &j, &ts[i]) != 0) {
            /* overloaded: a value, and no callback will come */
            moat_term_unref(j.args);
            atomic_store(&s->recs[i].outcomes, -1);
            ts[i] = NULL;
            continue;
        }
        if (what == 4)
            moat_task_cancel(ts[i], MOAT_A_SHUTDOWN, 0);
        if (what == 5 && (i % 16) == 0)
            moat_pool_cancel_owner(s->pool, j.owner, MOAT_A_SHUTDOWN, 0);
    }
    for (int i = 0; i < s->n; i++) {
        if (ts[i] != NULL) {
            t_wait(&s->recs[i]);
            moat_task_release(ts[i]);
        }
    }
    free(ts);
    return NULL;
}

static void test_pool_exactly_one_outcome_stress(void **state) {
    enum { PER = 3000 };
    moat_pool_t *pool = pool_make(2, 256);
    stress_t s[2];
    pthread_t th[2];
    int accepted = 0;
    (void)state;
    for (int k = 0; k < 2; k++) {
        s[k].pool = pool;
        s[k].recs = calloc(PER, sizeof(rec_t));
        s[k].n = PER;
        s[k].seed = 1234u + (unsigned)k;
        assert_int_equal(pthread_create(&th[k], NULL, stress_thread, &s[k]),
                         0);
    }
    for (int k = 0; k < 2; k++)
        pthread_join(th[k], NULL);
    moat_pool_free(pool);
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < PER; i++) {
            int n = atomic_load(&s[k].recs[i].outcomes);
            assert_true(n == 1 || n == -1);
            accepted += n == 1;
        }
        t_rec_clear(s[k].recs, PER);
        free(s[k].recs);
    }
    assert_int_equal(atomic_load(&total_outcomes), accepted);
}

/* An owner cancelled again and again while its tasks are being submitted:
 * every accepted task still has exactly one outcome, a refused one none,
 * and stop returns. */
typedef struct owner_race_s {
    moat_pool_t *pool;
    atomic_int done;
} owner_race_t;

static void *cancel_loop(void *arg) {
    owner_race_t *o = arg;
    while (!atomic_load(&o->done))
        moat_pool_cancel_owner(o->pool, 7, MOAT_A_SHUTDOWN, 0);
    return NULL;
}

static void test_pool_cancel_owner_races_submit(void **state) {
    enum { N = 20000 };
    owner_race_t o = {pool_make(2, 64), 0};
    rec_t *r = calloc(N, sizeof *r);
    pthread_t th;
    int accepted = 0;
    (void)state;
    assert_int_equal(pthread_create(&th, NULL, cancel_loop, &o), 0);
    for (int i = 0; i < N; i++) {
        moat_job_t j = job(t_ok, &r[i]);
        j.owner = 7;
        if (moat_pool_submit(o.pool, &j, NULL) == 0)
            accepted++;
        else
            moat_term_unref(j.args);
    }
    atomic_store(&o.done, 1);
    pthread_join(th, NULL);
    moat_pool_free(o.pool);
    for (int i = 0; i < N; i++)
        assert_true(atomic_load(&r[i].outcomes) <= 1);
    assert_int_equal(atomic_load(&total_outcomes), accepted);
    t_rec_clear(r, N);
    free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_result_and_reasons),
        cmocka_unit_test(test_pool_error_message_cut),
        cmocka_unit_test(test_pool_overload_is_a_value),
        cmocka_unit_test(test_pool_batch_submit),
        cmocka_unit_test(test_pool_task_submitted_time),
        cmocka_unit_test(test_pool_cancel_queued),
        cmocka_unit_test(test_pool_cancel_running_flags_task),
        cmocka_unit_test(test_pool_cancel_silent_and_after_completion),
        cmocka_unit_test(test_pool_deadline_timeout),
        cmocka_unit_test(test_pool_deadline_not_reached),
        cmocka_unit_test(test_pool_cancel_owner),
        cmocka_unit_test(test_pool_abandoned_tasks_do_not_starve),
        cmocka_unit_test(test_pool_cancel_racing_the_body_keeps_the_thread),
        cmocka_unit_test(test_pool_stop_ends_everything),
        cmocka_unit_test(test_pool_deadline_many_lengths),
        cmocka_unit_test(test_pool_close_waits_for_no_thread),
        cmocka_unit_test(test_pool_task_running_after_cancel),
        cmocka_unit_test(test_pool_stats_counters),
        cmocka_unit_test(test_pool_threads_named_signals_blocked),
        cmocka_unit_test(test_pool_housekeeper_starts_on_first_need),
        cmocka_unit_test(test_pool_stats_never_go_back),
        cmocka_unit_test(test_pool_invalid_arguments),
        cmocka_unit_test(test_pool_run_here_outcomes),
        cmocka_unit_test(test_pool_run_here_stop_from_signal),
        cmocka_unit_test(test_pool_run_here_abandoned_by_close),
        cmocka_unit_test(test_pool_exactly_one_outcome_stress),
        cmocka_unit_test(test_pool_cancel_owner_races_submit),
    };
    return cmocka_run_group_tests_name("pool", tests, NULL, NULL);
}
