/* test_server.c: native servers: state across calls, casts, one outcome
 * per call whatever ends it, stop requests run terminate, kill, calls to
 * dead servers, timeouts. */
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#include "core_util.h"
#include "tsrv.h"

typedef t_rec_t rec_t;

static void rec_done(rec_t *r) {
    assert_int_equal(atomic_load(&r->outcomes), 1);
    moat_term_unref(r->term);
    r->term = NULL;
}

static int setup(void **state) {
    *state = t_pool(2, 0, "tsrv", t_record);
    return 0;
}

static int before(void **state) {
    (void)state;
    tsrv_reset();
    return 0;
}

static moat_pid_t start(moat_pool_t *pool, int n) {
    moat_pid_t pid = 0;
    moat_term_t *reason = NULL, *args = tsrv_args(n);
    assert_int_equal(
        moat_server_start(pool, 0, &tsrv_def, NULL, args, 0, &pid, &reason),
        0);
    moat_term_unref(args);
    assert_null(reason);
    return pid;
}

/* A call with a fresh record; returns after its one outcome. */
static void call(moat_pool_t *pool, moat_pid_t srv, const char *req,
                 int64_t timeout, rec_t *r) {
    moat_term_t *q = t_atom(req);
    assert_int_equal(moat_server_call(pool, srv, q, 0, timeout, r, NULL), 0);
    moat_term_unref(q);
    t_wait(r);
}

static long call_long(moat_pool_t *pool, moat_pid_t srv, const char *req) {
    rec_t r = {0};
    long v;
    int i = 0, ver;
    size_t len;
    const char *d;
    call(pool, srv, req, -1, &r);
    assert_int_equal(r.kind, MOAT_OK);
    d = moat_term_data(r.term, &len);
    assert_int_equal(ei_decode_version(d, &i, &ver), 0);
    assert_int_equal(ei_decode_long(d, &i, &v), 0);
    rec_done(&r);
    return v;
}

static uint64_t watch(moat_pool_t *pool, moat_pid_t w, moat_pid_t target) {
    uint64_t ref = 0;
    assert_int_equal(moat_proc_monitor(pool, w, target, &ref), 0);
    return ref;
}

/* The server keeps its state across calls, and casts reach it in order. */
static void test_server_state_across_calls(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = start(pool, 1);
    moat_term_t *inc = t_atom("inc");
    assert_int_equal(call_long(pool, s, "inc"), 1);
    assert_int_equal(call_long(pool, s, "inc"), 2);
    for (int i = 0; i < 10; i++)
        assert_int_equal(moat_server_cast(pool, s, inc), 0);
    assert_int_equal(call_long(pool, s, "get"), 12);
    moat_term_unref(inc);
    moat_proc_exit(pool, 0, s, moat_atom(MOAT_A_SHUTDOWN));
    tsrv_wait('t', 1, 1);
}

/* A crash in handle_call gives that caller the reason, ends the server
 * with it (monitors see it), and terminate runs once. */
static void test_server_crash_in_call(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t w, s = start(pool, 2);
    rec_t r = {0};
    uint64_t ref;
    moat_term_t *crash = moat_term_tagged_binary("native_error", "crash", 5);
    assert_int_equal(moat_proc_open(pool, &w), 0);
    ref = watch(pool, w, s);
    call(pool, s, "crash", -1, &r);
    assert_int_equal(r.kind, MOAT_EXIT);
    assert_true(moat_term_equal(r.term, crash));
    /* Answered once the server is dead and its terminate has run, as a
     * DOWN follows a gen_server's end: a next call finds no server. */
    assert_int_equal(moat_proc_alive(pool, s), 0);
    assert_int_equal(tsrv_count('t', 2), 1);
    t_expect_down(pool, w, ref, s, crash);
    rec_done(&r);
    moat_term_unref(crash);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* The caller of a call that crashes the server hears of it only once
 * the server's terminate has run and it is dead, however long terminate
 * takes: no later call of that caller can reach the dying server. */
static void test_server_crash_answered_after_terminate(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = start(pool, 102); /* terminate waits for the gate */
    moat_term_t *q = t_atom("crash");
    struct timespec pause = {0, 50 * 1000 * 1000};
    rec_t r = {0};
    atomic_store(&tsrv_gate, 0);
    assert_int_equal(moat_server_call(pool, s, q, 0, -1, &r, NULL), 0);
    moat_term_unref(q);
    nanosleep(&pause, NULL);
    assert_int_equal(atomic_load(&r.outcomes), 0);
    assert_int_equal(moat_proc_alive(pool, s), 1);
    atomic_store(&tsrv_gate, 1);
    t_wait(&r);
    assert_int_equal(moat_proc_alive(pool, s), 0);
    assert_int_equal(tsrv_count('t', 102), 1);
    assert_int_equal(r.kind, MOAT_EXIT);
    rec_done(&r);
}

/* A server that ends itself with a reason it chose gives it to the
 * caller and to monitors, {shutdown, _} included. */
static void test_server_stop_with_chosen_reason(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t w, s = start(pool, 3);
    rec_t r = {0};
    uint64_t ref;
    moat_term_t *done = t_pair("shutdown", "done");
    assert_int_equal(moat_proc_open(pool, &w), 0);
    ref = watch(pool, w, s);
    call(pool, s, "exit", -1, &r);
    assert_true(moat_term_equal(r.term, done));
    t_expect_down(pool, w, ref, s, done);
    rec_done(&r);
    moat_term_unref(done);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* A call to a dead server is MOAT_ENOPROC and no callback; a cast to it
 * is dropped. */
static void test_server_call_dead_is_noproc(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = start(pool, 4);
    rec_t r = {0};
    moat_term_t *q = t_atom("get");
    moat_proc_exit(pool, 0, s, moat_atom(MOAT_A_KILL));
    assert_int_equal(moat_server_call(pool, s, q, 0, -1, &r, NULL),
                     MOAT_ENOPROC);
    assert_int_equal(moat_server_cast(pool, s, q), 0);
    tsrv_wait('t', 4, 1);
    assert_int_equal(atomic_load(&r.outcomes), 0);
    moat_term_unref(q);
}

/* An exit signal is a stop request: queued calls before it are answered,
 * terminate runs, then monitors see the reason; calls after it get the
 * reason. */
static void test_server_stop_request_in_order(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t w, s = start(pool, 5);
    rec_t block = {0}, before = {0}, after = {0};
    moat_term_t *qb = t_atom("block"), *qi = t_atom("inc");
    uint64_t ref;
    assert_int_equal(moat_proc_open(pool, &w), 0);
    ref = watch(pool, w, s);
    moat_server_call(pool, s, qb, 0, -1, &block, NULL);
    moat_server_call(pool, s, qi, 0, -1, &before, NULL);
    moat_proc_exit(pool, w, s, moat_atom(MOAT_A_SHUTDOWN));
    moat_server_call(pool, s, qi, 0, -1, &after, NULL);
    atomic_store(&tsrv_gate, 1);
    t_wait(&block);
    t_wait(&before);
    t_wait(&after);
    assert_int_equal(block.kind, MOAT_OK);
    assert_int_equal(before.kind, MOAT_OK);
    assert_int_equal(after.kind, MOAT_EXIT);
    assert_true(moat_term_is(after.term, MOAT_A_SHUTDOWN));
    t_expect_down(pool, w, ref, s, moat_atom(MOAT_A_SHUTDOWN));
    assert_int_equal(tsrv_count('t', 5), 1);
    rec_done(&block);
    rec_done(&before);
    rec_done(&after);
    moat_term_unref(qb);
    moat_term_unref(qi);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* `normal` from exit/2 is ignored by a server, as by a non-trapping
 * process. */
static void test_server_exit_normal_ignored(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t w, s = start(pool, 6);
    assert_int_equal(moat_proc_open(pool, &w), 0);
    moat_proc_exit(pool, w, s, moat_atom(MOAT_A_NORMAL));
    assert_int_equal(call_long(pool, s, "inc"), 1);
    assert_true(moat_proc_alive(pool, s));
    moat_proc_exit(pool, w, s, moat_atom(MOAT_A_KILL));
    tsrv_wait('t', 6, 1);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* A kill during a call ends the server at once: the caller and monitors
 * see `killed`, the late reply is dropped, terminate runs once after the
 * callback returns. */
static void test_server_kill_during_call(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t w, s = start(pool, 7);
    rec_t r = {0};
    moat_term_t *qb = t_atom("block");
    uint64_t ref;
    assert_int_equal(moat_proc_open(pool, &w), 0);
    ref = watch(pool, w, s);
    assert_int_equal(moat_server_call(pool, s, qb, 0, -1, &r, NULL), 0);
    /* Whether the kill lands before or inside handle_call, the call ends
     * with `killed`. */
    moat_proc_exit(pool, w, s, moat_atom(MOAT_A_KILL));
    t_expect_down(pool, w, ref, s, moat_atom(MOAT_A_KILLED));
    t_wait(&r);
    assert_true(moat_term_is(r.term, MOAT_A_KILLED));
    atomic_store(&tsrv_gate, 1);
    tsrv_wait('t', 7, 1);
    assert_int_equal(tsrv_count('t', 7), 1);
    rec_done(&r);
    moat_term_unref(qb);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* A call past its timeout ends with `timeout`, and its late reply never
 * arrives (exactly one outcome). */
static void test_server_call_timeout(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = start(pool, 8);
    rec_t r = {0}, late = {0};
    moat_term_t *qb = t_atom("block");
    assert_int_equal(moat_server_call(pool, s, qb, 0, -1, &late, NULL), 0);
    call(pool, s, "get", 20, &r);
    assert_true(moat_term_is(r.term, MOAT_A_TIMEOUT));
    atomic_store(&tsrv_gate, 1);
    t_wait(&late);
    assert_int_equal(call_long(pool, s, "get"), 0);
    assert_int_equal(atomic_load(&r.outcomes), 1);
    rec_done(&r);
    rec_done(&late);
    moat_term_unref(qb);
    moat_proc_exit(pool, 0, s, moat_atom(MOAT_A_SHUTDOWN));
    tsrv_wait('t', 8, 1);
}

/* A failed init is a value with its reason, and no process remains. */
static void test_server_init_failure(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t pid = 0;
    moat_term_t *reason = NULL, *args = tsrv_args(9),
                *want = moat_term_tagged_binary("native_error",
                                                "init failed", 11);
    atomic_store(&tsrv_fail_init, 9);
    assert_int_equal(moat_server_start(pool, 0, &tsrv_def, NULL, args, 0,
                                       &pid, &reason),
                     MOAT_ESTART);
    assert_true(moat_term_equal(reason, want));
    assert_int_equal(tsrv_count('t', 9), 0);
    moat_term_unref(reason);
    moat_term_unref(want);
    moat_term_unref(args);
}

/* A linked server started with MOAT_SPAWN_LINK takes its parent's exit
 * as a stop request: terminate runs before it is gone. */
static void test_server_linked_to_parent(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t parent, w, s = 0;
    moat_term_t *reason = NULL, *args = tsrv_args(10),
                *crash = t_atom("crash");
    uint64_t ref;
    assert_int_equal(moat_proc_open(pool, &parent), 0);
    assert_int_equal(moat_proc_open(pool, &w), 0);
    assert_int_equal(moat_server_start(pool, parent, &tsrv_def, NULL, args,
                                       MOAT_SPAWN_LINK, &s, &reason),
                     0);
    ref = watch(pool, w, s);
    moat_proc_close(pool, parent, crash);
    t_expect_down(pool, w, ref, s, crash);
    assert_int_equal(tsrv_count('t', 10), 1);
    moat_term_unref(crash);
    moat_term_unref(args);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* A kill turns moat_should_stop on for the callback in progress, so a
 * polite callback returns and frees its thread. */
static void test_server_kill_sets_should_stop(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = start(pool, 11);
    rec_t r = {0};
    moat_term_t *q = t_atom("poll");
    assert_int_equal(moat_server_call(pool, s, q, 0, -1, &r, NULL), 0);
    moat_proc_exit(pool, 0, s, moat_atom(MOAT_A_KILL));
    t_wait(&r);
    assert_true(moat_term_is(r.term, MOAT_A_KILLED));
    tsrv_wait('t', 11, 1); /* the callback returned: terminate ran */
    rec_done(&r);
    moat_term_unref(q);
}

/* Runs until asked to stop. */
static int t_until_stopped(moat_ctx_t *ctx, const char *args, int len,
                           ei_x_buff *out) {
    (void)args;
    (void)len;
    while (!moat_should_stop(ctx))
        sched_yield();
    return ei_x_encode_atom(out, "ok") == 0 ? MOAT_OK : MOAT_ERROR;
}

/* moat_pool_drain ends the tasks that hold every thread and refuses new
 * ones, while the servers go on answering: what a pool's close needs to
 * stop its servers in order. */
static void test_server_serves_through_drain(void **state) {
    moat_pool_t *pool = t_pool(2, 0, "tdrain", t_record);
    moat_pid_t s = start(pool, 1);
    moat_task_t *t[2];
    rec_t r[3] = {{0}};
    moat_job_t j = {0};
    (void)state;
    assert_int_equal(call_long(pool, s, "inc"), 1);
    for (int i = 0; i < 2; i++) {
        j.fn = t_until_stopped;
        j.name = "until_stopped";
        j.args = t_nil();
        j.timeout_ms = -1;
        j.data = &r[i];
        assert_int_equal(moat_pool_submit(pool, &j, &t[i]), 0);
    }
    for (int i = 0; i < 2; i++)
        while (!moat_task_running(t[i]))
            sched_yield();
    moat_pool_drain(pool, MOAT_A_SHUTDOWN);
    for (int i = 0; i < 2; i++) {
        t_wait(&r[i]);
        assert_int_equal(r[i].kind, MOAT_EXIT);
        assert_true(moat_term_is(r[i].term, MOAT_A_SHUTDOWN));
        rec_done(&r[i]);
        moat_task_release(t[i]);
    }
    j.args = t_nil();
    j.data = &r[2];
    assert_int_equal(moat_pool_submit(pool, &j, NULL), MOAT_ECLOSED);
    moat_term_unref(j.args);
    assert_int_equal(call_long(pool, s, "inc"), 2);
    assert_int_equal(atomic_load(&r[2].outcomes), 0);
    moat_pool_free(pool);
    tsrv_wait('t', 1, 1); /* the close ended the server, terminate ran */
}

/* Freeing a pool runs each server's terminate exactly once, also when the
 * worker that served it was spinning for work as the close came (and so
 * may leave before the close's exit signal makes the server runnable). */
static void test_server_terminate_runs_when_pool_freed(void **state) {
    (void)state;
    for (int i = 0; i < 300; i++) {
        moat_pool_t *pool = t_pool(1, 0, "tfree", t_record);
        moat_pid_t s;
        rec_t r = {0};
        tsrv_reset();
        s = start(pool, 7);
        call(pool, s, "inc", -1, &r); /* its worker then spins for more */
        rec_done(&r);
        moat_pool_free(pool);
        assert_int_equal(tsrv_count('t', 7), 1);
    }
}

/* Servers for the local-slot tests (pool.c's DESIGN, "Locality"): casts
 * `relay` (casts `seen` to lt_to, then waits in the callback until that
 * has run), `seen`, and `ping` (counts, and casts `ping` back to the
 * other of lt_a and lt_b until lt_stop). */
static moat_pool_t *lt_pool;
static moat_term_t *lt_seen, *lt_ping;
static _Atomic moat_pid_t lt_to, lt_a, lt_b;
static atomic_int lt_seen_ran, lt_relay_result, lt_stop;
static atomic_long lt_pings;

static int lt_init(moat_ctx_t *ctx, const char *args, int len, void **state,
                   ei_x_buff *out) {
    (void)ctx;
    (void)args;
    (void)len;
    (void)out;
    *state = NULL;
    return MOAT_OK;
}

static int lt_cast(moat_ctx_t *ctx, void *state, const char *req, int len,
                   ei_x_buff *out) {
    char atom[MAXATOMLEN];
    int i = 0, ver;
    (void)state;
    (void)len;
    (void)out;
    if (ei_decode_version(req, &i, &ver) || ei_decode_atom(req, &i, atom))
        return MOAT_OK;
    if (strcmp(atom, "relay") == 0) {
        /* Waits for `seen`, which went to this worker's slot: only
         * another worker can run it while this callback lasts. */
        struct timespec t0, t;
        moat_server_cast(lt_pool, atomic_load(&lt_to), lt_seen);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
            sched_yield();
            clock_gettime(CLOCK_MONOTONIC, &t);
        } while (!atomic_load(&lt_seen_ran) && t.tv_sec - t0.tv_sec < 10);
        atomic_store(&lt_relay_result, atomic_load(&lt_seen_ran));
    } else if (strcmp(atom, "seen") == 0) {
        atomic_store(&lt_seen_ran, 1);
    } else if (strcmp(atom, "ping") == 0) {
        moat_pid_t self = moat_self(ctx);
        atomic_fetch_add(&lt_pings, 1);
        if (!atomic_load(&lt_stop))
            moat_server_cast(lt_pool,
                             self == atomic_load(&lt_a) ? atomic_load(&lt_b)
                                                        : atomic_load(&lt_a),
                             lt_ping);
    }
    return MOAT_OK;
}

static const moat_server_def_t lt_def = {"lt", lt_init, tsrv_call_ok, lt_cast,
                                         NULL};

static moat_pid_t lt_start(moat_pool_t *pool) {
    moat_pid_t pid = 0;
    moat_term_t *reason = NULL, *args = t_nil();
    assert_int_equal(
        moat_server_start(pool, 0, &lt_def, NULL, args, 0, &pid, &reason), 0);
    moat_term_unref(args);
    return pid;
}

/* Ends a server and waits until it is gone. */
static void lt_end(moat_pool_t *pool, moat_pid_t s) {
    moat_pid_t w;
    uint64_t ref;
    assert_int_equal(moat_proc_open(pool, &w), 0);
    ref = watch(pool, w, s);
    moat_proc_exit(pool, 0, s, moat_atom(MOAT_A_SHUTDOWN));
    t_expect_down(pool, w, ref, s, moat_atom(MOAT_A_SHUTDOWN));
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* A server made runnable by a callback waits in that worker's local slot;
 * while the callback goes on, another worker steals it, whether that
 * worker was spinning or asleep. */
static void test_server_slot_stolen_from_long_callback(void **state) {
    moat_pool_t *pool = *state;
    moat_term_t *relay = t_atom("relay");
    moat_pid_t a, b;
    lt_pool = pool;
    lt_seen = t_atom("seen");
    a = lt_start(pool);
    b = lt_start(pool);
    atomic_store(&lt_to, b);
    for (int round = 0; round < 4; round++) {
        if (round % 2 == 1) {
            /* Long past the idle spin: both workers are asleep. */
            struct timespec ts = {0, 30 * 1000000};
            nanosleep(&ts, NULL);
        }
        atomic_store(&lt_seen_ran, 0);
        atomic_store(&lt_relay_result, -1);
        assert_int_equal(moat_server_cast(pool, a, relay), 0);
        for (long i = 0; atomic_load(&lt_relay_result) < 0; i++) {
            assert_true(i < 200000000L);
            sched_yield();
        }
        assert_int_equal(atomic_load(&lt_relay_result), 1);
    }
    lt_end(pool, a);
    lt_end(pool, b);
    moat_term_unref(relay);
    moat_term_unref(lt_seen);
}

/* Two servers messaging each other forever keep handing the one worker
 * its next item through the local slot; calls from outside, in the shared
 * queue, are still served.  (Tasks are not: the shared queue of native
 * processes comes before tasks, with or without the slot.) */
static void test_server_slot_does_not_starve_queue(void **state) {
    moat_pool_t *pool = t_pool(1, 0, "tslot", t_record);
    moat_pid_t s;
    rec_t r = {0};
    (void)state;
    lt_pool = pool;
    lt_ping = t_atom("ping");
    atomic_store(&lt_stop, 0);
    atomic_store(&lt_pings, 0);
    atomic_store(&lt_a, lt_start(pool));
    atomic_store(&lt_b, lt_start(pool));
    s = start(pool, 1);
    assert_int_equal(moat_server_cast(pool, atomic_load(&lt_a), lt_ping), 0);
    while (atomic_load(&lt_pings) < 1000)
        sched_yield();
    for (int i = 0; i < 20; i++) {
        assert_int_equal(call_long(pool, s, "inc"), i + 1);
        call(pool, atomic_load(&lt_a), "get", -1, &r);
        assert_int_equal(r.kind, MOAT_OK);
        rec_done(&r);
        r = (rec_t){0};
    }
    atomic_store(&lt_stop, 1);
    moat_pool_free(pool);
    moat_term_unref(lt_ping);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_server_state_across_calls, before),
        cmocka_unit_test_setup(test_server_crash_in_call, before),
        cmocka_unit_test_setup(test_server_crash_answered_after_terminate, before),
        cmocka_unit_test_setup(test_server_stop_with_chosen_reason, before),
        cmocka_unit_test_setup(test_server_call_dead_is_noproc, before),
        cmocka_unit_test_setup(test_server_stop_request_in_order, before),
        cmocka_unit_test_setup(test_server_exit_normal_ignored, before),
        cmocka_unit_test_setup(test_server_kill_during_call, before),
        cmocka_unit_test_setup(test_server_call_timeout, before),
        cmocka_unit_test_setup(test_server_init_failure, before),
        cmocka_unit_test_setup(test_server_linked_to_parent, before),
        cmocka_unit_test_setup(test_server_kill_sets_should_stop, before),
        cmocka_unit_test_setup(test_server_serves_through_drain, before),
        cmocka_unit_test_setup(test_server_terminate_runs_when_pool_freed, before),
        cmocka_unit_test_setup(test_server_slot_stolen_from_long_callback, before),
        cmocka_unit_test_setup(test_server_slot_does_not_starve_queue, before),
    };
    return cmocka_run_group_tests_name("server", tests, setup,
                                       t_pool_teardown);
}
