/* test_remote.c: remote tasks (moat_pool_accept), the C-node backend's
 * view of the core: admission, one outcome per task whichever side ends
 * it, remote_cancel exactly for outcomes decided here, late and repeated
 * reports dropped, a lost peer, close, and the table under load. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "core_util.h"

typedef struct {
    atomic_int n;
    uint64_t last_id;
    moat_term_t *last_reason;
} cancels_t;

static cancels_t cancels;

static void on_cancel(moat_task_t *t, moat_term_t *reason, void *data) {
    (void)data;
    if (atomic_fetch_add(&cancels.n, 1) == 0) {
        cancels.last_id = moat_task_id(t);
        cancels.last_reason = moat_term_ref(reason);
    }
}

static int t_never(moat_ctx_t *c, const char *a, int n, ei_x_buff *out) {
    (void)c;
    (void)a;
    (void)n;
    (void)out;
    return MOAT_OK;
}

static moat_pool_t *remote_pool(unsigned size, unsigned max_queue) {
    moat_pool_opts_t o = {0};
    moat_pool_t *pool = NULL;
    o.nthreads = size;
    o.max_queue = max_queue;
    o.name = "tremote";
    o.complete = t_record;
    o.remote = 1;
    o.remote_cancel = on_cancel;
    moat_term_unref(cancels.last_reason);
    cancels.last_reason = NULL;
    atomic_store(&cancels.n, 0);
    assert_int_equal(moat_pool_new(&o, &pool), 0);
    return pool;
}

static moat_task_t *accept1(moat_pool_t *pool, t_rec_t *r, uint64_t owner,
                            int64_t timeout_ms) {
    moat_job_t job = {NULL, "remote", NULL, NULL, owner, timeout_ms, r};
    moat_task_t *t = NULL;
    assert_int_equal(moat_pool_accept(pool, &job, 1, &t), 1);
    assert_non_null(t);
    return t;
}

static void test_remote_done_is_the_outcome(void **state) {
    moat_pool_t *pool = remote_pool(2, 4);
    t_rec_t r[2] = {0};
    moat_task_t *a = accept1(pool, &r[0], 0, -1);
    moat_task_t *b = accept1(pool, &r[1], 0, -1);
    moat_term_t *v = t_atom("value"), *why = t_atom("why");
    moat_pool_stats_t st;
    moat_job_t local = {t_never, "local", NULL, v, 0, -1, NULL};
    (void)state;
    /* A remote pool runs no bodies. */
    assert_int_equal(moat_pool_submit(pool, &local, NULL), MOAT_EINVAL);
    assert_int_equal(moat_task_running(a), 1);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.running, 2);
    assert_int_equal(st.threads, 0);

    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(a), MOAT_OK, v), 1);
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(b), MOAT_EXIT, why), 1);
    assert_int_equal(r[0].kind, MOAT_OK);
    assert_true(moat_term_equal(r[0].term, v));
    assert_int_equal(r[1].kind, MOAT_EXIT);
    assert_true(moat_term_equal(r[1].term, why));
    /* A report that comes twice finds nothing. */
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(a), MOAT_OK, v),
                     MOAT_ENOPROC);
    assert_int_equal(moat_task_running(a), 0);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.completed, 1);
    assert_int_equal(st.failed, 1);
    assert_int_equal(atomic_load(&cancels.n), 0);
    assert_int_equal(atomic_load(&r[0].outcomes), 1);
    assert_int_equal(atomic_load(&r[1].outcomes), 1);
    moat_task_release(a);
    moat_task_release(b);
    moat_term_unref(v);
    moat_term_unref(why);
    t_rec_clear(r, 2);
    moat_pool_free(pool);
}

static void test_remote_admission_is_size_plus_queue(void **state) {
    moat_pool_t *pool = remote_pool(2, 3);
    t_rec_t r[6] = {0};
    moat_job_t jobs[6];
    moat_task_t *ts[6];
    moat_term_t *v = t_atom("ok");
    (void)state;
    for (int i = 0; i < 6; i++)
        jobs[i] = (moat_job_t){NULL, "remote", NULL, NULL, 0, -1, &r[i]};
    assert_int_equal(moat_pool_accept(pool, jobs, 6, ts), 5);
    assert_int_equal(moat_pool_accept(pool, jobs + 5, 1, NULL),
                     MOAT_EOVERLOADED);
    /* A slot comes back when a body ends. */
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(ts[0]), MOAT_OK, v), 1);
    assert_int_equal(moat_pool_accept(pool, jobs + 5, 1, &ts[5]), 1);
    for (int i = 1; i < 6; i++)
        assert_int_equal(moat_pool_remote_done(pool, moat_task_id(ts[i]), MOAT_OK, v), 1);
    for (int i = 0; i < 6; i++) {
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
        moat_task_release(ts[i]);
    }
    moat_term_unref(v);
    t_rec_clear(r, 6);
    moat_pool_free(pool);
}

/* A cancel decides here: the transport is told, the body counts as
 * abandoned (holding no admission slot) until its report, which is
 * dropped. */
static void test_remote_cancel_tells_the_transport(void **state) {
    moat_pool_t *pool = remote_pool(1, 1);
    t_rec_t r[2] = {0};
    moat_task_t *a = accept1(pool, &r[0], 0, -1);
    moat_term_t *v = t_atom("late");
    moat_pool_stats_t st;
    (void)state;
    assert_int_equal(moat_task_cancel(a, MOAT_A_SHUTDOWN, MOAT_CANCEL_SILENT), 1);
    assert_int_equal(atomic_load(&r[0].outcomes), 0); /* silent */
    assert_int_equal(atomic_load(&cancels.n), 1);
    assert_int_equal(cancels.last_id, moat_task_id(a));
    assert_true(moat_term_is(cancels.last_reason, MOAT_A_SHUTDOWN));
    assert_int_equal(moat_task_running(a), 1);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.abandoned, 1);
    assert_int_equal(st.running, 0);
    /* Its slot is free already. */
    moat_task_t *b = accept1(pool, &r[1], 0, -1);
    /* The body's late result is dropped; then it no longer runs. */
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(a), MOAT_OK, v), 0);
    assert_int_equal(moat_task_running(a), 0);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.abandoned, 0);
    /* A second cancel of a decided task does nothing. */
    assert_int_equal(moat_task_cancel(a, MOAT_A_SHUTDOWN, 0), 0);
    assert_int_equal(atomic_load(&cancels.n), 1);
    /* A stopped report (no outcome) for a cancelled body. */
    assert_int_equal(moat_task_cancel(b, MOAT_A_KILLED, 0), 1);
    assert_int_equal(atomic_load(&r[1].outcomes), 1);
    assert_true(moat_term_is(r[1].term, MOAT_A_KILLED));
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(b), 0, NULL), 0);
    assert_int_equal(atomic_load(&cancels.n), 2);
    moat_task_release(a);
    moat_task_release(b);
    moat_term_unref(v);
    t_rec_clear(r, 2);
    moat_pool_free(pool);
}

/* A body that ends without an outcome while the outcome is open (a
 * transport that misbehaves) still gives the task exactly one. */
static void test_remote_stopped_without_cancel_is_killed(void **state) {
    moat_pool_t *pool = remote_pool(1, 1);
    t_rec_t r = {0};
    moat_task_t *a = accept1(pool, &r, 0, -1);
    (void)state;
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(a), 0, NULL), 1);
    assert_int_equal(r.kind, MOAT_EXIT);
    assert_true(moat_term_is(r.term, MOAT_A_KILLED));
    assert_int_equal(atomic_load(&cancels.n), 0);
    moat_task_release(a);
    t_rec_clear(&r, 1);
    moat_pool_free(pool);
}

static void test_remote_deadline_and_owner(void **state) {
    moat_pool_t *pool = remote_pool(2, 2);
    t_rec_t r[2] = {0};
    moat_task_t *a = accept1(pool, &r[0], 0, 10);
    moat_task_t *b = accept1(pool, &r[1], 77, -1);
    (void)state;
    t_wait(&r[0]);
    assert_true(moat_term_is(r[0].term, MOAT_A_TIMEOUT));
    assert_int_equal(moat_pool_cancel_owner(pool, 77, MOAT_A_SHUTDOWN, 0), 1);
    assert_true(moat_term_is(r[1].term, MOAT_A_SHUTDOWN));
    assert_int_equal(atomic_load(&cancels.n), 2);
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(a), 0, NULL), 0);
    assert_int_equal(moat_pool_remote_done(pool, moat_task_id(b), 0, NULL), 0);
    moat_task_release(a);
    moat_task_release(b);
    t_rec_clear(r, 2);
    moat_pool_free(pool);
}

static void test_remote_lost_ends_every_open_task(void **state) {
    moat_pool_t *pool = remote_pool(4, 4);
    t_rec_t r[3] = {0};
    moat_task_t *a = accept1(pool, &r[0], 0, -1);
    moat_task_t *b = accept1(pool, &r[1], 0, -1);
    moat_task_t *c = accept1(pool, &r[2], 0, -1);
    moat_term_t *down = t_pair("native_crash", "cnode_down");
    moat_pool_stats_t st;
    (void)state;
    assert_int_equal(moat_task_cancel(b, MOAT_A_SHUTDOWN, 0), 1);
    assert_int_equal(moat_pool_remote_lost(pool, down), 2);
    assert_true(moat_term_equal(r[0].term, down));
    assert_true(moat_term_is(r[1].term, MOAT_A_SHUTDOWN));
    assert_true(moat_term_equal(r[2].term, down));
    for (int i = 0; i < 3; i++)
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
    assert_int_equal(moat_task_running(b), 0);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.abandoned, 0);
    /* Nothing more goes to a peer that is gone. */
    moat_job_t job = {NULL, "remote", NULL, NULL, 0, -1, NULL};
    assert_int_equal(moat_pool_accept(pool, &job, 1, NULL), MOAT_ECLOSED);
    moat_task_release(a);
    moat_task_release(b);
    moat_task_release(c);
    moat_term_unref(down);
    t_rec_clear(r, 3);
    moat_pool_free(pool);
}

static void test_remote_close_ends_with_shutdown(void **state) {
    moat_pool_t *pool = remote_pool(2, 2);
    t_rec_t r[2] = {0};
    moat_task_t *a = accept1(pool, &r[0], 0, -1);
    moat_task_t *b = accept1(pool, &r[1], 0, 60000);
    moat_job_t job = {NULL, "remote", NULL, NULL, 0, -1, NULL};
    (void)state;
    moat_pool_close(pool);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
        assert_true(moat_term_is(r[i].term, MOAT_A_SHUTDOWN));
    }
    assert_int_equal(atomic_load(&cancels.n), 2);
    assert_int_equal(moat_pool_accept(pool, &job, 1, NULL), MOAT_ECLOSED);
    moat_task_release(a);
    moat_task_release(b);
    t_rec_clear(r, 2);
    moat_pool_free(pool);
}

/* The table under load: 20,000 tasks reported in a scrambled order, half
 * of them cancelled first, from two threads racing; each one outcome. */
#define LOAD 20000

typedef struct {
    moat_pool_t *pool;
    moat_task_t **ts;
    int from, step;
} racer_t;

static void *cancel_racer(void *arg) {
    racer_t *rc = arg;
    for (int i = rc->from; i < LOAD; i += rc->step)
        moat_task_cancel(rc->ts[i], MOAT_A_SHUTDOWN, 0);
    return NULL;
}

static void test_remote_table_under_load(void **state) {
    moat_pool_t *pool = remote_pool(8, LOAD);
    t_rec_t *r = calloc(LOAD, sizeof *r);
    moat_job_t *jobs = calloc(LOAD, sizeof *jobs);
    moat_task_t **ts = calloc(LOAD, sizeof *ts);
    int *order = malloc(LOAD * sizeof *order);
    moat_term_t *v = t_atom("v");
    racer_t racer;
    pthread_t tid;
    moat_pool_stats_t st;
    int decided = 0, shut = 0;
    (void)state;
    assert_non_null(r);
    assert_non_null(jobs);
    assert_non_null(ts);
    assert_non_null(order);
    for (int i = 0; i < LOAD; i++) {
        jobs[i] = (moat_job_t){NULL, "remote", NULL, NULL, 0, -1, &r[i]};
        order[i] = i;
    }
    assert_int_equal(moat_pool_accept(pool, jobs, LOAD, ts), LOAD);
    srand(7);
    for (int i = LOAD - 1; i > 0; i--) {
        int j = rand() % (i + 1), x = order[i];
        order[i] = order[j];
        order[j] = x;
    }
    racer = (racer_t){pool, ts, 0, 2};
    assert_int_equal(pthread_create(&tid, NULL, cancel_racer, &racer), 0);
    for (int i = 0; i < LOAD; i++) {
        int rc = moat_pool_remote_done(pool, moat_task_id(ts[order[i]]),
                                       MOAT_OK, v);
        assert_true(rc == 0 || rc == 1);
        decided += rc;
    }
    pthread_join(tid, NULL);
    for (int i = 0; i < LOAD; i++) {
        assert_int_equal(atomic_load(&r[i].outcomes), 1);
        assert_int_equal(moat_task_running(ts[i]), 0);
        shut += moat_term_is(r[i].term, MOAT_A_SHUTDOWN);
        moat_task_release(ts[i]);
    }
    /* Each outcome came from one side; the transport was told of the
     * cancels that found the body still out (not those that won the
     * claim just after its report took it from the table). */
    assert_int_equal(decided + shut, LOAD);
    assert_true(atomic_load(&cancels.n) <= shut);
    moat_pool_stats(pool, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.abandoned, 0);
    moat_term_unref(v);
    t_rec_clear(r, LOAD);
    free(r);
    free(jobs);
    free(ts);
    free(order);
    moat_pool_free(pool);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_remote_done_is_the_outcome),
        cmocka_unit_test(test_remote_admission_is_size_plus_queue),
        cmocka_unit_test(test_remote_cancel_tells_the_transport),
        cmocka_unit_test(test_remote_stopped_without_cancel_is_killed),
        cmocka_unit_test(test_remote_deadline_and_owner),
        cmocka_unit_test(test_remote_lost_ends_every_open_task),
        cmocka_unit_test(test_remote_close_ends_with_shutdown),
        cmocka_unit_test(test_remote_table_under_load),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    moat_term_unref(cancels.last_reason);
    return rc;
}
