/*
 * test_nif.c: the NIF glue, c_src/nif/moat_nif.c, driven outside the VM.
 *
 * moat_nif.c is built into a shared object of its own (see the Makefile)
 * and called through the function table its ERL_NIF_INIT returns, over
 * the fake erl_nif of fake_erl_nif.c, with the demo library from
 * MOAT_DEMO_SO.  The test's thread acts as one fake process or another;
 * moat's pool threads, janitor and reaper call back as they would in the
 * VM, so ASan/UBSan, TSan and valgrind see the glue's concurrency.
 *
 * Every test ends (teardown) by exiting every process, waiting until no
 * resource is alive and the janitor and reaper are idle, and checking
 * that nothing misused the API and that only the janitor's and the
 * reaper's envs are left: so each test also asserts that its pools,
 * tasks and streams were destroyed and freed.
 */
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <valgrind/valgrind.h>

#include "fake_cnode.h"
#include "fake_erl_nif.h"

ErlNifEntry *nif_init(void);

/* Every moat thread makes a message env when it starts: with no pool
 * left, only the janitor's and the reaper's remain. */
#define JOBQ_ENVS 2
/* Generous bounds for the slowest runs (valgrind): the tests wait for
 * events, never for time. */
#define RECV_MS 10000
#define SETTLE_MS 30000

static const char *demo_path;

/* Iterations of the race loops, fewer under valgrind, which runs one
 * thread at a time: each stage should stay within seconds. */
static int iters(int n) {
    int div = 1;
    if (RUNNING_ON_VALGRIND)
        div = 2;
    return n / div > 4 ? n / div : 4;
}

/* ------------------------------------------------------------ helpers */

static ERL_NIF_TERM A(const char *name) { return fake_atom(name); }

static ERL_NIF_TERM I(fake_proc_t *p, long v) {
    return enif_make_long(fake_env(p), v);
}

static ERL_NIF_TERM bin(fake_proc_t *p, const char *s) {
    ERL_NIF_TERM t;
    memcpy(enif_make_new_binary(fake_env(p), strlen(s), &t), s, strlen(s));
    return t;
}

static ERL_NIF_TERM list1(fake_proc_t *p, ERL_NIF_TERM t) {
    return enif_make_list1(fake_env(p), t);
}

/* A term as text, for comparisons; a few rotating buffers. */
static const char *S(ERL_NIF_TERM t) {
    static char bufs[8][512];
    static int next;
    char *b = bufs[next++ % 8];
    fake_format(t, b, sizeof bufs[0]);
    return b;
}

#define assert_term(t, text) assert_string_equal(S(t), text)

static ERL_NIF_TERM el(ERL_NIF_TERM t, int i) { return fake_elem(t, i); }

static void assert_same(ERL_NIF_TERM a, ERL_NIF_TERM b) {
    if (!enif_is_identical(a, b))
        fail_msg("%s is not %s", S(a), S(b));
}

static ERL_NIF_TERM recv(fake_proc_t *p) {
    ERL_NIF_TERM m = fake_recv(p, RECV_MS);
    if (m == 0)
        fail_msg("no message within %d ms", RECV_MS);
    return m;
}

static void assert_no_message(fake_proc_t *p) {
    ERL_NIF_TERM m = fake_recv(p, 0);
    if (m != 0)
        fail_msg("unexpected message %s", S(m));
}

static ERL_NIF_TERM pool_new(fake_proc_t *p, const char *name, unsigned size,
                             unsigned max_queue, const char *lib) {
    return fake_call(p, "pool_new", 4, A(name), I(p, size), I(p, max_queue),
                     list1(p, bin(p, lib)));
}

/* Starts a pool of the demo library owned by p; returns its handle. */
static ERL_NIF_TERM start_pool(fake_proc_t *p, const char *name, unsigned size,
                               unsigned max_queue) {
    ERL_NIF_TERM r = pool_new(p, name, size, max_queue, demo_path);
    if (fake_arity(r) != 2 || !fake_is_atom(el(r, 0), "ok"))
        fail_msg("pool_new: %s", S(r));
    assert_true(fake_is_resource(el(r, 1), "moat_pool"));
    return el(r, 1);
}

static void close_pool(fake_proc_t *owner, ERL_NIF_TERM h) {
    assert_term(fake_call(owner, "pool_close", 1, h), "ok");
}

static ERL_NIF_TERM timeout_term(fake_proc_t *p, long ms) {
    return ms < 0 ? A("infinity") : I(p, ms);
}

/* async(Pool, Task, [Arg], Timeout, undefined); returns {Ref, Id}. */
static ERL_NIF_TERM async1(fake_proc_t *p, const char *pool, const char *task,
                           ERL_NIF_TERM arg, long timeout_ms) {
    ERL_NIF_TERM r = fake_call(p, "async", 5, A(pool), A(task), list1(p, arg),
                               timeout_term(p, timeout_ms), A("undefined"));
    assert_int_equal(fake_arity(r), 2);
    assert_true(fake_is_resource(el(r, 0), "moat_task"));
    return r;
}

static ERL_NIF_TERM run1(fake_proc_t *p, const char *pool, const char *task,
                         ERL_NIF_TERM arg, long timeout_ms) {
    return fake_call(p, "run", 4, A(pool), A(task), list1(p, arg),
                     timeout_term(p, timeout_ms));
}

/* The message about task {Ref, Id}: {Ref, Result} or {'DOWN', Ref,
 * process, Id, Reason}; asserts it is about that task and returns the
 * result, or {'DOWN', Reason} for a DOWN. */
static ERL_NIF_TERM outcome_of(fake_proc_t *p, ERL_NIF_TERM task,
                               ERL_NIF_TERM msg) {
    if (fake_arity(msg) == 2) {
        assert_same(el(msg, 0), el(task, 0));
        return el(msg, 1);
    }
    if (fake_arity(msg) != 5 || !fake_is_atom(el(msg, 0), "DOWN") ||
        !fake_is_atom(el(msg, 2), "process"))
        fail_msg("not a task message: %s", S(msg));
    assert_same(el(msg, 1), el(task, 0));
    assert_same(el(msg, 3), el(task, 1));
    return enif_make_tuple2(fake_env(p), A("DOWN"), el(msg, 4));
}

static ERL_NIF_TERM await(fake_proc_t *p, ERL_NIF_TERM task) {
    return outcome_of(p, task, recv(p));
}

/* A bystander that reads pool stats, so that polling them leaves the
 * test's processes alone.  Each test gets its own. */
static fake_proc_t *observer;

static long stat_of(const char *pool, const char *field) {
    ERL_NIF_TERM map, v;
    long n;
    if (observer == NULL)
        observer = fake_spawn();
    fake_gc(observer);
    map = fake_call(observer, "pool_stats", 1, A(pool));
    if (!enif_get_map_value(fake_env(observer), map, A(field), &v) ||
        !fake_get_long(v, &n))
        fail_msg("pool_stats(%s): %s", pool, S(map));
    return n;
}

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Polls until pool_stats(pool).field >= want. */
static void wait_stat(const char *pool, const char *field, long want) {
    for (long i = 0; stat_of(pool, field) < want; i++) {
        if (i > SETTLE_MS)
            fail_msg("%s.%s stays below %ld", pool, field, want);
        pause_ms(1);
    }
}

/* Polls until `type`'s destructor has run `want` times. */
static void wait_dtors(const char *type, long want) {
    for (long i = 0; fake_dtor_calls(type) < want; i++) {
        if (i > SETTLE_MS)
            fail_msg("%s destroyed %ld times, not %ld", type,
                     fake_dtor_calls(type), want);
        pause_ms(1);
    }
}

/* Receives one message per task of ts[0..n), in any order, and checks
 * each outcome is `want`. */
static void await_all(fake_proc_t *p, const ERL_NIF_TERM *ts, int n,
                      const char *want) {
    char *got = calloc((size_t)n, 1);
    for (int i = 0; i < n; i++) {
        ERL_NIF_TERM m = recv(p), ref = el(m, fake_arity(m) == 2 ? 0 : 1);
        int k;
        for (k = 0; k < n && !enif_is_identical(ref, el(ts[k], 0)); k++)
            ;
        if (k == n || got[k])
            fail_msg("a message about no task awaited: %s", S(m));
        got[k] = 1;
        assert_term(outcome_of(p, ts[k], m), want);
    }
    free(got);
}

/* Waits until no callback is in flight and every pool nobody holds is
 * freed, taking every message the given processes receive meanwhile;
 * returns how many.  Drops every term they hold on the way. */
static long settle(fake_proc_t **ps, int n) {
    long got = 0;
    for (int tries = 0;; tries++) {
        for (int i = 0; i < n; i++) {
            while (fake_recv(ps[i], 0) != 0)
                got++;
            fake_gc(ps[i]);
        }
        if (fake_quiesce(10))
            break;
        if (tries * 10 > SETTLE_MS)
            fail_msg("not quiet after %d ms (%ld resources alive)", SETTLE_MS,
                     fake_live_resources());
    }
    for (int i = 0; i < n; i++)
        while (fake_recv(ps[i], 0) != 0)
            got++;
    return got;
}

/* A short, varying pause, so that races meet at different points. */
static void jitter(unsigned i) {
    unsigned n = (i * 2654435761u) >> 27; /* 0..31 */
    for (volatile unsigned k = 0; k < n * 20; k++)
        ;
    if (n & 1)
        sched_yield();
}

/* ----------------------------------------------------------- fixtures */

static int group_setup(void **state) {
    (void)state;
    demo_path = getenv("MOAT_DEMO_SO");
    if (demo_path == NULL) {
        fprintf(stderr, "MOAT_DEMO_SO is not set\n");
        return -1;
    }
    return fake_load(nif_init()) == 0 ? 0 : -1;
}

static long violations_before, binaries_before;

static int setup(void **state) {
    (void)state;
    violations_before = fake_violations();
    binaries_before = fake_live_binaries();
    return 0;
}

static int teardown(void **state) {
    long v;
    (void)state;
    fake_exit_all();
    if (!fake_quiesce(SETTLE_MS))
        fail_msg("not quiet after the test: %ld resources alive",
                 fake_live_resources());
    fake_reset_procs();
    observer = NULL;
    for (int i = 0; fake_live_envs() != JOBQ_ENVS; i++) {
        if (i > SETTLE_MS)
            fail_msg("%ld envs alive, not just the janitor's and the reaper's",
                     fake_live_envs());
        pause_ms(1);
    }
    if (fake_live_binaries() != binaries_before)
        fail_msg("%ld binaries neither released nor made terms",
                 fake_live_binaries() - binaries_before);
    /* Each misuse was printed; a test fails for its own. */
    v = fake_violations();
    assert_int_equal(v - violations_before, 0);
    return 0;
}

/* ------------------------------------------------------------- loading */

static void test_nif_load_exports_the_table(void **state) {
    static const char *names[] = {
        "pool_new/4",       "pool_close/1",    "pool_stats/1",
        "pool_owner/1",     "pool_crashes/1",
        "cnode_pool_new/6", "cnode_deliver/2",
        "cnode_flush/1",    "cnode_lost/2",
        "async/5",
        "run/4",            "task_cancel/2",   "task_running/1",
        "task_kill/1",
        "task_spin/1",      "task_ignore/1",   "stream_new/4",
        "stream_submit/3",  "stream_take/3",   "stream_close/1",
        "sup_start/3",      "call/4",          "cast/3",
        "which_children/1", "count_children/1",
    };
    ErlNifEntry *e = nif_init();
    (void)state;
    assert_string_equal(e->name, "moat_nif");
    assert_int_equal(e->num_of_funcs, sizeof names / sizeof *names);
    for (int i = 0; i < e->num_of_funcs; i++) {
        char buf[64];
        snprintf(buf, sizeof buf, "%s/%u", e->funcs[i].name, e->funcs[i].arity);
        assert_string_equal(buf, names[i]);
    }
}

static void test_nif_upgrade_keeps_pools_working(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "up", 1, 8), t;
    (void)state;
    assert_int_equal(fake_upgrade(), 0);
    t = async1(c, "up", "echo", A("still_here"), -1);
    assert_term(await(c, t), "still_here");
    close_pool(o, h); /* the handle made before the upgrade */
}

/* --------------------------------------------------------------- pools */

static void test_nif_pool_new_registers_the_pool(void **state) {
    fake_proc_t *o = fake_spawn(), *q = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "reg", 2, 16);
    ErlNifPid op = fake_pid(o);
    (void)state;
    assert_same(fake_call(q, "pool_owner", 1, A("reg")),
                enif_make_pid(NULL, &op));
    assert_int_equal(stat_of("reg", "size"), 2);
    assert_int_equal(stat_of("reg", "queued"), 0);
    assert_term(fake_call(q, "pool_stats", 1, A("nope")), "{error,not_found}");
    assert_term(fake_call(q, "pool_owner", 1, A("nope")), "undefined");
    close_pool(o, h);
    assert_term(fake_call(q, "pool_owner", 1, A("reg")), "undefined");
    assert_term(fake_call(q, "pool_stats", 1, A("reg")), "{error,not_found}");
    close_pool(o, h); /* closing twice is harmless */
}

static void test_nif_pool_new_refuses(void **state) {
    fake_proc_t *o1 = fake_spawn(), *o2 = fake_spawn();
    ErlNifEnv *e = fake_env(o2);
    ERL_NIF_TERM h = start_pool(o1, "taken", 1, 4), r;
    ErlNifPid p1 = fake_pid(o1);
    (void)state;
    r = pool_new(o2, "taken", 1, 4, demo_path);
    assert_same(r, enif_make_tuple2(e, A("error"),
                                    enif_make_tuple2(e, A("already_started"),
                                                     enif_make_pid(e, &p1))));
    r = pool_new(o2, "badlib", 1, 4, "/nonexistent/lib.so");
    assert_int_equal(fake_arity(r), 2);
    assert_term(el(r, 0), "error");
    assert_term(el(el(r, 1), 0), "bad_library");
    assert_non_null(strstr(S(el(el(r, 1), 1)), "/nonexistent/lib.so"));
    /* Bad arguments raise badarg. */
    assert_int_equal(fake_call(o2, "pool_new", 4, A("z"), I(o2, 0), I(o2, 1),
                               list1(o2, bin(o2, demo_path))),
                     0);
    assert_true(fake_raised(o2, &r));
    assert_term(r, "badarg");
    assert_int_equal(fake_call(o2, "pool_new", 4, bin(o2, "z"), I(o2, 1),
                               I(o2, 1), list1(o2, bin(o2, demo_path))),
                     0);
    assert_int_equal(
        fake_call(o2, "pool_new", 4, A("z"), I(o2, 1), I(o2, 1), A("nolist")),
        0);
    assert_true(fake_raised(o2, NULL));
    assert_term(fake_call(o2, "pool_owner", 1, A("z")), "undefined");
    close_pool(o1, h);
}

/* A pool whose owner is dead but whose `down` has not run yet gives its
 * name to a new pool, and is closed. */
static void test_nif_pool_new_replaces_a_dead_owners_pool(void **state) {
    fake_proc_t *o1 = fake_spawn(), *o2 = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h, t;
    ErlNifPid p2 = fake_pid(o2);
    (void)state;
    start_pool(o1, "heir", 1, 4);
    t = async1(c, "heir", "sleep", I(c, 100000), -1);
    fake_die(o1);
    h = start_pool(o2, "heir", 1, 4);
    assert_same(fake_call(c, "pool_owner", 1, A("heir")),
                enif_make_pid(NULL, &p2));
    assert_term(await(c, t), "{DOWN,shutdown}"); /* the old pool closed */
    fake_reap(o1); /* its late `down` leaves the new pool alone */
    assert_same(fake_call(c, "pool_owner", 1, A("heir")),
                enif_make_pid(NULL, &p2));
    t = async1(c, "heir", "echo", A("new"), -1);
    assert_term(await(c, t), "new");
    close_pool(o2, h);
    fake_proc_t *all[] = {o2, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_pool_close_settles_every_task(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "closing", 1, 64), t[11], r;
    (void)state;
    for (int i = 0; i < 11; i++)
        t[i] = async1(c, "closing", "sleep", I(c, 100000), -1);
    close_pool(o, h);
    /* pool_close returns once every outcome is sent. */
    assert_int_equal(fake_mailbox_len(c), 11);
    await_all(c, t, 11, "{DOWN,shutdown}");
    r = async1(c, "closing", "echo", A("late"), -1);
    assert_term(await(c, r), "{DOWN,noproc}");
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* -------------------------------------------------------------- async */

/* A task that fails on a pool thread is linked here (its DOWN names the
 * proxy): an unlinked one meets a known bug, see
 * test_nif_down_names_the_task. */
static void test_nif_async_sends_one_message(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *px = fake_spawn();
    ErlNifEnv *e = fake_env(c);
    ErlNifPid pp = fake_pid(px);
    ERL_NIF_TERM h = start_pool(o, "one", 2, 16), t, v, pid;
    long n;
    /* Task, argument, the owner's outcome, what the proxy is told. */
    struct {
        const char *task;
        ERL_NIF_TERM arg;
        long timeout_ms;
        const char *owner, *proxy;
    } cases[] = {
        {"fail", bin(c, "boom"), -1, "{DOWN,{native_error,<<\"boom\">>}}",
         "{moat_task_done,{native_error,<<\"boom\">>}}"},
        {"exit", A("my_reason"), -1, "{DOWN,my_reason}",
         "{moat_task_done,my_reason}"},
        {"sleep", I(c, 100000), 20, "{DOWN,timeout}",
         "{moat_task_done,timeout}"},
        {"echo", 0, -1, "{DOWN,badarg}", "{moat_task_done,badarg}"},
    };
    (void)state;
    v = enif_make_tuple4(e, A("hello"), I(c, -42),
                         enif_make_list3(e, I(c, 1), bin(c, "two"), A("three")),
                         I(c, (long)1 << 62));
    t = async1(c, "one", "echo", v, -1);
    assert_int_equal(fake_arity(el(t, 1)), 2); /* Id: {Pool, N}, N > 0 */
    assert_term(el(el(t, 1), 0), "one");
    assert_true(fake_get_long(el(el(t, 1), 1), &n) && n > 0);
    assert_same(await(c, t), v);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        pid = enif_make_pid(NULL, &pp);
        t = fake_call(c, "async", 5, A("one"), A(cases[i].task),
                      cases[i].arg ? list1(c, cases[i].arg)
                                   : enif_make_list(e, 0),
                      timeout_term(c, cases[i].timeout_ms), pid);
        assert_term(await(c, t), cases[i].owner);
        assert_term(recv(px), cases[i].proxy);
    }
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, px};
    assert_int_equal(settle(all, 3), 0); /* one message each, no more */
}

static void test_nif_async_refusals_come_as_down(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "small", 1, 1), t, s1, s2;
    (void)state;
    /* Refused on the caller's process: the message is there at once. */
    t = async1(c, "no_such_pool", "echo", A("x"), -1);
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, t), "{DOWN,noproc}");
    assert_term(el(t, 1), "{no_such_pool,0}");
    t = async1(c, "small", "no_such_task", A("x"), -1);
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, t), "{DOWN,{unknown_task,no_such_task}}");
    s1 = async1(c, "small", "sleep", I(c, 100000), -1);
    s2 = async1(c, "small", "sleep", I(c, 100000), -1);
    t = async1(c, "small", "echo", A("x"), -1);
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, t), "{DOWN,overloaded}");
    assert_int_equal(stat_of("small", "rejected"), 1);
    /* Bad arguments raise badarg and send nothing. */
    assert_int_equal(fake_call(c, "async", 5, A("small"), A("echo"), A("x"),
                               A("infinity"), A("undefined")),
                     0);
    assert_int_equal(fake_call(c, "async", 5, A("small"), A("echo"),
                               list1(c, A("x")), I(c, -1), A("undefined")),
                     0);
    assert_int_equal(fake_call(c, "async", 5, A("small"), A("echo"),
                               list1(c, A("x")), A("infinity"), A("nopid")),
                     0);
    assert_true(fake_raised(c, NULL));
    close_pool(o, h);
    ERL_NIF_TERM ss[] = {s1, s2};
    await_all(c, ss, 2, "{DOWN,shutdown}");
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_async_tells_a_linked_proxy(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *px = fake_spawn();
    ErlNifPid pp = fake_pid(px);
    ERL_NIF_TERM h = start_pool(o, "linked", 1, 8), t;
    /* Pool, task, what the owner gets, what the proxy is told. */
    const char *cases[][4] = {
        {"linked", "echo", "my_reason", "{moat_task_done,normal}"},
        {"linked", "exit", "{DOWN,my_reason}", "{moat_task_done,my_reason}"},
        {"linked", "no_task", "{DOWN,{unknown_task,no_task}}",
         "{moat_task_done,{unknown_task,no_task}}"},
        {"nowhere", "echo", "{DOWN,noproc}", "{moat_task_done,noproc}"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        ERL_NIF_TERM pid = enif_make_pid(NULL, &pp);
        t = fake_call(c, "async", 5, A(cases[i][0]), A(cases[i][1]),
                      list1(c, A("my_reason")), A("infinity"), pid);
        assert_same(el(t, 1), pid); /* the proxy stands for the task */
        assert_term(await(c, t), cases[i][2]);
        assert_term(recv(px), cases[i][3]);
    }
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, px};
    assert_int_equal(settle(all, 3), 0);
}

/* A linked task dies with the process standing for it: killed by the
 * janitor once that process's monitor fires, or at once if it is dead
 * already. */
static void test_nif_linked_task_dies_with_its_proxy(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *px = fake_spawn(),
                *gone = fake_spawn(), *px2 = fake_spawn();
    ErlNifPid pp = fake_pid(px), pg = fake_pid(gone), pp2 = fake_pid(px2);
    ERL_NIF_TERM h = start_pool(o, "kin", 2, 8), t;
    long before = stat_of("kin", "cancelled");
    (void)state;
    t = fake_call(c, "async", 5, A("kin"), A("sleep"), list1(c, I(c, 100000)),
                  A("infinity"), enif_make_pid(NULL, &pp));
    fake_exit(px);
    assert_term(await(c, t), "{DOWN,killed}");
    fake_exit(gone);
    t = fake_call(c, "async", 5, A("kin"), A("sleep"), list1(c, I(c, 100000)),
                  A("infinity"), enif_make_pid(NULL, &pg));
    assert_term(await(c, t), "{DOWN,killed}");
    wait_stat("kin", "cancelled", before + 2);
    /* Ignored, the task runs on; its proxy still hears how it ended. */
    t = fake_call(c, "async", 5, A("kin"), A("sleep"), list1(c, I(c, 20)),
                  A("infinity"), enif_make_pid(NULL, &pp2));
    assert_term(fake_call(c, "task_ignore", 1, el(t, 0)), "ignored");
    assert_term(recv(px2), "{moat_task_done,normal}");
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, px2};
    assert_int_equal(settle(all, 3), 0);
}

/* The proxy's death races the task's outcome: the owner gets exactly
 * one message, the result or a DOWN `killed`. */
static void test_nif_proxy_death_races_completion(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "kin_race", 2, 65536);
    long results = 0, killed = 0;
    (void)state;
    for (int i = 0; i < iters(1000); i++) {
        fake_proc_t *px = fake_spawn();
        ErlNifPid pp = fake_pid(px);
        /* spin [Us]: a body of 0 to 15 us, so that both sides win. */
        ERL_NIF_TERM t = fake_call(c, "async", 5, A("kin_race"), A("spin"),
                                   list1(c, I(c, i % 16)), A("infinity"),
                                   enif_make_pid(NULL, &pp)),
                     r;
        jitter((unsigned)i);
        fake_exit(px);
        r = await(c, t);
        if (fake_is_atom(r, "ok")) {
            results++;
        } else {
            assert_term(r, "{DOWN,killed}");
            killed++;
        }
        fake_gc(c);
    }
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
    print_message("proxy death: %ld results, %ld killed\n", results, killed);
}

/* ---------------------------------------------------------------- run */

static void test_nif_run_answers_on_the_spot(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "spot", 2, 4);
    (void)state;
    /* With the clock held still, run/4 waits until the outcome is held
     * for it: the T_SPIN -> T_HELD path, every time. */
    fake_freeze_clock(1);
    for (int i = 0; i < iters(200); i++) {
        assert_term(run1(c, "spot", "echo", I(c, i), -1),
                    S(enif_make_tuple2(fake_env(c), A("ok"), I(c, i))));
        fake_gc(c);
    }
    assert_term(run1(c, "spot", "fail", bin(c, "bad"), -1),
                "{exit,{native_error,<<\"bad\">>}}");
    fake_freeze_clock(0);
    assert_term(run1(c, "nowhere", "echo", A("x"), -1), "{exit,noproc}");
    assert_term(run1(c, "spot", "nothing", A("x"), -1),
                "{exit,{unknown_task,nothing}}");
    assert_no_message(c);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_run_falls_back_to_a_message(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "later", 1, 4), r;
    (void)state;
    r = run1(c, "later", "sleep", I(c, 30), -1);
    assert_int_equal(fake_arity(r), 2);
    assert_term(el(r, 0), "wait");
    assert_term(
        outcome_of(c, enif_make_tuple2(fake_env(c), el(r, 1), A("x")), recv(c)),
        "ok");
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* The spin giving up races the outcome: either way exactly one. */
static void test_nif_run_races_its_own_wait(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "racing_run", 2, 64);
    long inline_n = 0, waited = 0;
    (void)state;
    for (int i = 0; i < iters(3000); i++) {
        ERL_NIF_TERM r = run1(c, "racing_run", i % 3 ? "echo" : "spin",
                              I(c, i % 3 ? i : 4), -1);
        if (fake_is_atom(el(r, 0), "wait")) {
            ERL_NIF_TERM m = recv(c);
            assert_same(el(m, 0), el(r, 1));
            assert_same(el(m, 1), i % 3 ? I(c, i) : A("ok"));
            waited++;
        } else {
            assert_term(el(r, 0), "ok");
            inline_n++;
        }
        assert_int_equal(fake_mailbox_len(c), 0);
        fake_gc(c);
    }
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
    print_message("run: %ld answered on the spot, %ld by message\n", inline_n,
                  waited);
}

/* ------------------------------------------------- cancel and ignore */

static void test_nif_cancel_races_completion(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *other = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "cancels", 2, 65536), r;
    long cancelled = 0, delivered = 0;
    int n = iters(4000);
    (void)state;
    for (int i = 0; i < n; i++) {
        ERL_NIF_TERM t = async1(c, "cancels", "echo", I(c, i), -1);
        jitter((unsigned)i);
        r = fake_call(c, "task_cancel", 2, el(t, 0),
                      A(i & 1 ? "shutdown" : "killed"));
        if (fake_is_atom(r, "cancelled")) {
            cancelled++;
            /* Nothing came and nothing will: checked by settle below. */
            assert_int_equal(fake_mailbox_len(c), 0);
            assert_term(fake_call(c, "task_cancel", 2, el(t, 0), A("shutdown")),
                        "delivered");
        } else {
            assert_term(r, "delivered");
            delivered++;
            /* Its message is in the mailbox already. */
            assert_int_equal(fake_mailbox_len(c), 1);
            assert_same(await(c, t), I(c, i));
        }
        fake_gc(c);
    }
    /* Owner only; the reason is shutdown or killed. */
    r = async1(c, "cancels", "sleep", I(c, 100000), -1);
    fake_call(other, "task_cancel", 2,
              enif_make_copy(fake_env(other), el(r, 0)), A("shutdown"));
    assert_true(fake_raised(other, NULL));
    fake_call(c, "task_cancel", 2, el(r, 0), A("normal"));
    assert_true(fake_raised(c, NULL));
    assert_term(fake_call(c, "task_cancel", 2, el(r, 0), A("killed")),
                "cancelled");
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, other};
    assert_int_equal(settle(all, 3), 0);
    print_message("cancel: %ld cancelled, %ld delivered\n", cancelled,
                  delivered);
}

static void test_nif_ignore_races_completion(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "ignores", 2, 65536), r;
    long ignored = 0, delivered = 0;
    int n = iters(4000);
    (void)state;
    for (int i = 0; i < n; i++) {
        ERL_NIF_TERM t = async1(c, "ignores", "echo", I(c, i), -1);
        jitter((unsigned)i);
        r = fake_call(c, "task_ignore", 1, el(t, 0));
        if (fake_is_atom(r, "ignored")) {
            ignored++;
            assert_int_equal(fake_mailbox_len(c), 0);
        } else {
            assert_term(r, "delivered");
            delivered++;
            assert_int_equal(fake_mailbox_len(c), 1);
            assert_same(await(c, t), I(c, i));
        }
        fake_gc(c);
    }
    /* An ignored task runs on, silently. */
    r = async1(c, "ignores", "sleep", I(c, 20), -1);
    assert_term(fake_call(c, "task_ignore", 1, el(r, 0)), "ignored");
    wait_stat("ignores", "completed", n + 1);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
    print_message("ignore: %ld ignored, %ld delivered\n", ignored, delivered);
}

static void test_nif_task_spin_and_running(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "spins", 1, 8), t;
    (void)state;
    fake_freeze_clock(1);
    for (int i = 0; i < iters(100); i++) {
        t = async1(c, "spins", "echo", I(c, i), -1);
        assert_term(fake_call(c, "task_spin", 1, el(t, 0)), "true");
        assert_int_equal(fake_mailbox_len(c), 1);
        assert_same(await(c, t), I(c, i));
        fake_gc(c);
    }
    fake_freeze_clock(0);
    t = async1(c, "spins", "sleep", I(c, 100000), -1);
    assert_term(fake_call(c, "task_spin", 1, el(t, 0)), "false");
    while (!fake_is_atom(fake_call(c, "task_running", 1, el(t, 0)), "true"))
        sched_yield();
    assert_term(fake_call(c, "task_cancel", 2, el(t, 0), A("shutdown")),
                "cancelled");
    /* sleep heeds the stop flag within a millisecond. */
    while (!fake_is_atom(fake_call(c, "task_running", 1, el(t, 0)), "false"))
        sched_yield();
    assert_term(fake_call(c, "task_spin", 1, el(t, 0)), "false");
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* ------------------------------------------------------------- owners */

static void test_nif_owner_death_cancels_its_tasks(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *d = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "orphans", 2, 64), t;
    long before = fake_dtor_calls("moat_task");
    (void)state;
    for (int i = 0; i < 10; i++)
        async1(c, "orphans", "sleep", I(c, 100000), -1);
    t = async1(d, "orphans", "sleep", I(d, 100000), -1);
    fake_exit(c); /* `down`: the janitor cancels c's tasks */
    wait_stat("orphans", "cancelled", 10);
    assert_int_equal(stat_of("orphans", "cancelled"), 10);
    assert_no_message(d);
    close_pool(o, h);
    assert_term(await(d, t), "{DOWN,shutdown}");
    fake_proc_t *all[] = {o, d};
    assert_int_equal(settle(all, 2), 0);
    assert_int_equal(fake_dtor_calls("moat_task") - before, 11);
}

static void test_nif_pool_owner_death_closes_the_pool(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *o2 = fake_spawn();
    ERL_NIF_TERM t[3], h;
    long pools = fake_dtor_calls("moat_pool");
    (void)state;
    start_pool(o, "bereft", 1, 8);
    for (int i = 0; i < 3; i++)
        t[i] = async1(c, "bereft", "sleep", I(c, 100000), -1);
    fake_exit(o);
    assert_term(fake_call(c, "pool_owner", 1, A("bereft")), "undefined");
    await_all(c, t, 3, "{DOWN,shutdown}");
    h = start_pool(o2, "bereft", 1, 8); /* the name is free again */
    close_pool(o2, h);
    fake_proc_t *all[] = {c, o2};
    assert_int_equal(settle(all, 2), 0);
    assert_int_equal(fake_dtor_calls("moat_pool") - pools, 2);
}

/* Tasks whose terms the owner dropped are freed by whichever thread
 * releases them last (a pool thread, in the callback), and their
 * messages still come. */
static void test_nif_dropped_refs_free_tasks(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "dropped", 2, 512);
    long before = fake_dtor_calls("moat_task");
    int n = iters(400);
    (void)state;
    for (int i = 0; i < n; i++) {
        async1(c, "dropped", i & 1 ? "echo" : "sleep", I(c, i & 1 ? i : 1), -1);
        fake_gc(c);
    }
    wait_stat("dropped", "completed", n);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), n);
    assert_int_equal(fake_dtor_calls("moat_task") - before, n);
}

/* Several processes submit while the owner closes the pool: each task
 * gets exactly one message, whichever side of the close it fell on. */
typedef struct {
    fake_proc_t *p, *proxy;
    pthread_t tid;
    atomic_long *done;
    long ok, shutdown, noproc;
} submitter_t;

/* Linked tasks: a DOWN decided on another thread than the submitter's
 * names the proxy (an unlinked one meets the known bug of
 * test_nif_down_names_the_task). */
static void *submit_until_closed(void *arg) {
    submitter_t *s = arg;
    ErlNifPid proxy = fake_pid(s->proxy);
    for (long i = 0;; i++) {
        ERL_NIF_TERM t = fake_call(s->p, "async", 5, A("crowded"),
                                   A(i % 4 ? "echo" : "sleep"),
                                   list1(s->p, I(s->p, i % 4 ? i : 1)),
                                   A("infinity"), enif_make_pid(NULL, &proxy));
        ERL_NIF_TERM m = fake_recv(s->p, RECV_MS), r;
        if (m == 0 || fake_arity(t) != 2)
            break;
        r = fake_arity(m) == 2 ? m : el(m, 4);
        if (!enif_is_identical(el(m, fake_arity(m) == 2 ? 0 : 1), el(t, 0)))
            break;
        if (fake_arity(m) == 2)
            s->ok++;
        else if (fake_is_atom(r, "shutdown"))
            s->shutdown++;
        else if (fake_is_atom(r, "noproc"))
            s->noproc++;
        else
            break;
        atomic_fetch_add(s->done, 1);
        fake_gc(s->p);
        if (s->noproc > 0)
            return NULL;
    }
    s->noproc = -1; /* a failure, reported by the main thread */
    return NULL;
}

static void test_nif_submitters_race_pool_close(void **state) {
    fake_proc_t *o = fake_spawn(), *ps[9];
    submitter_t s[4];
    atomic_long done = 0;
    ERL_NIF_TERM h = start_pool(o, "crowded", 2, 1024);
    long tasks = 0;
    (void)state;
    ps[0] = o;
    for (int i = 0; i < 4; i++) {
        memset(&s[i], 0, sizeof s[i]);
        s[i].p = ps[1 + i] = fake_spawn();
        s[i].proxy = ps[5 + i] = fake_spawn();
        s[i].done = &done;
        assert_int_equal(
            pthread_create(&s[i].tid, NULL, submit_until_closed, &s[i]), 0);
    }
    while (atomic_load(&done) < iters(2000))
        sched_yield();
    close_pool(o, h);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(s[i].tid, NULL), 0);
        assert_int_equal(s[i].noproc, 1);
        tasks += s[i].ok + s[i].shutdown + s[i].noproc;
    }
    /* Nothing more for the owners; one word to a proxy per task. */
    assert_int_equal(settle(ps, 9), tasks);
}

/* Processes that submit and die at once, on several threads: their
 * `down` callbacks run concurrently with other submits, with pool
 * threads completing their tasks and with the janitor cancelling them. */
typedef struct {
    pthread_t tid;
    int rounds;
    long submitted;
} mortal_t;

static void *submit_and_die(void *arg) {
    mortal_t *m = arg;
    for (int r = 0; r < m->rounds; r++) {
        fake_proc_t *p = fake_spawn();
        if (r % 3 == 2) {
            ERL_NIF_TERM s = fake_call(p, "stream_new", 4, A("mortal"),
                                       A("sleep"), A("infinity"), I(p, 8)),
                         l;
            l = enif_make_list4(fake_env(p), I(p, 0), I(p, 1), I(p, 100000),
                                I(p, 0));
            fake_call(p, "stream_submit", 3, s, l, I(p, 0));
            m->submitted += 4;
        } else {
            for (int i = 0; i < 4; i++)
                fake_call(p, "async", 5, A("mortal"),
                          A(i & 1 ? "echo" : "sleep"),
                          list1(p, I(p, i & 1 ? i : 1 + r % 2)), A("infinity"),
                          A("undefined"));
            m->submitted += 4;
        }
        jitter((unsigned)r);
        fake_exit(p);
    }
    return NULL;
}

static void test_nif_owner_deaths_race_completions(void **state) {
    fake_proc_t *o = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "mortal", 2, 65536);
    mortal_t m[3];
    long submitted = 0;
    (void)state;
    for (int i = 0; i < 3; i++) {
        memset(&m[i], 0, sizeof m[i]);
        m[i].rounds = iters(300);
        assert_int_equal(pthread_create(&m[i].tid, NULL, submit_and_die, &m[i]),
                         0);
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pthread_join(m[i].tid, NULL), 0);
        submitted += m[i].submitted;
    }
    /* Every task ends, by its body or by its owner's death. */
    wait_stat("mortal", "cancelled", 1); /* at least the long sleeps */
    for (long i = 0;
         stat_of("mortal", "completed") + stat_of("mortal", "cancelled") <
         submitted;
         i++) {
        if (i > SETTLE_MS)
            fail_msg("tasks lost: %ld submitted", submitted);
        pause_ms(1);
    }
    assert_int_equal(stat_of("mortal", "completed") +
                         stat_of("mortal", "cancelled"),
                     submitted);
    close_pool(o, h);
    fake_proc_t *all[] = {o};
    assert_int_equal(settle(all, 1), 0);
}

/* ------------------------------------------------------------ streams */

typedef struct {
    fake_proc_t *p;
    ERL_NIF_TERM s;
    int max, inflight;
    long next, total;
} consumer_t;

/* Submits up to max in flight; returns the refused entries. */
static ERL_NIF_TERM top_up(consumer_t *k) {
    int n = k->max - k->inflight;
    ERL_NIF_TERM l = enif_make_list(fake_env(k->p), 0), r;
    if (k->next + n > k->total)
        n = (int)(k->total - k->next);
    for (int i = n; i-- > 0;)
        l = enif_make_list_cell(fake_env(k->p), I(k->p, k->next + i), l);
    r = fake_call(k->p, "stream_submit", 3, k->s, l, I(k->p, k->next));
    k->next += n;
    k->inflight += n;
    return r;
}

/* moat.erl's stream_next: entries ready now, or the next batch (as
 * [{Index, ok | exit, V} | {Index, timeout}]). */
static ERL_NIF_TERM take(consumer_t *k) {
    ERL_NIF_TERM l = fake_call(k->p, "stream_take", 3, k->s, A("false"),
                               A("false")),
                 m;
    unsigned n;
    assert_true(enif_get_list_length(fake_env(k->p), l, &n));
    if (n > 0)
        return l;
    m = recv(k->p);
    assert_term(el(m, 0), "moat_stream");
    assert_same(el(m, 1), k->s);
    return fake_call(k->p, "stream_take", 3, k->s, A("true"), A("false"));
}

/* Closes the stream and checks its promise: Flush is true exactly when
 * one {moat_stream, S} is in the mailbox, and nothing follows. */
static void close_stream(consumer_t *k) {
    ERL_NIF_TERM f = fake_call(k->p, "stream_close", 1, k->s);
    size_t n = fake_mailbox_len(k->p);
    if (fake_is_atom(f, "true")) {
        assert_int_equal(n, 1);
        assert_same(el(recv(k->p), 1), k->s);
    } else {
        assert_term(f, "false");
        assert_int_equal(n, 0);
    }
}

static void test_nif_stream_delivers_every_outcome(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "streams", 2, 64);
    consumer_t k = {c, 0, 8, 0, 0, iters(3000)};
    char *seen = calloc((size_t)k.total, 1);
    (void)state;
    k.s = fake_call(c, "stream_new", 4, A("streams"), A("echo"), A("infinity"),
                    I(c, k.max));
    assert_true(fake_is_resource(k.s, "moat_stream"));
    while (k.next < k.total || k.inflight > 0) {
        ERL_NIF_TERM l, e;
        assert_term(top_up(&k), "[]");
        for (l = take(&k); enif_get_list_cell(fake_env(c), l, &e, &l);) {
            long idx, v;
            assert_int_equal(fake_arity(e), 3);
            assert_true(fake_get_long(el(e, 0), &idx));
            assert_term(el(e, 1), "ok");
            assert_true(fake_get_long(el(e, 2), &v));
            assert_int_equal(v, idx);
            assert_true(idx >= 0 && idx < k.total && !seen[idx]);
            seen[idx] = 1;
            k.inflight--;
        }
    }
    close_stream(&k);
    free(seen);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_stream_outcome_kinds(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "kinds", 4, 16), l, e;
    consumer_t k = {c, 0, 4, 0, 0, 4};
    int got = 0;
    (void)state;
    /* sleep [I]: under 20 ms it is ok, past it a timeout entry. */
    k.s = fake_call(c, "stream_new", 4, A("kinds"), A("sleep"), I(c, 20),
                    I(c, 4));
    l = enif_make_list4(fake_env(c), I(c, 0), I(c, 100000), I(c, 100000),
                        A("bad"));
    assert_term(fake_call(c, "stream_submit", 3, k.s, l, I(c, 0)), "[]");
    k.inflight = 4;
    while (got < 4) {
        for (l = take(&k); enif_get_list_cell(fake_env(c), l, &e, &l); got++) {
            long idx;
            assert_true(fake_get_long(el(e, 0), &idx));
            if (idx == 0)
                assert_term(e, "{0,ok,ok}");
            else if (idx == 3)
                assert_term(e, "{3,exit,badarg}");
            else
                assert_term(e, S(enif_make_tuple2(fake_env(c), I(c, idx),
                                                  A("timeout"))));
        }
    }
    close_stream(&k);
    /* As async_stream's elements: {Elements, N, Deadline}. */
    k.s = fake_call(c, "stream_new", 4, A("kinds"), A("sleep"), I(c, 20),
                    I(c, 4));
    l = enif_make_list2(fake_env(c), I(c, 0), I(c, 100000));
    assert_term(fake_call(c, "stream_submit", 3, k.s, l, I(c, 0)), "[]");
    got = 0;
    for (int ack = 0; got < 2;) {
        ERL_NIF_TERM r = fake_call(c, "stream_take", 3, k.s,
                                   A(ack ? "true" : "false"), A("true"));
        long n;
        assert_int_equal(fake_arity(r), 3);
        assert_true(fake_get_long(el(r, 1), &n));
        ack = n == 0;
        if (n == 0) {
            assert_term(r, "{[],0,false}");
            assert_same(el(recv(c), 1), k.s);
            continue;
        }
        if (got == 0 && n == 2)
            assert_term(r, "{[{ok,ok},{exit,timeout}],2,true}");
        else if (got == 0)
            assert_term(r, "{[{ok,ok}],1,false}");
        else
            assert_term(r, "{[{exit,timeout}],1,true}");
        got += (int)n;
    }
    close_stream(&k);
    /* A task that chose the reason `timeout` is no deadline. */
    k.s = fake_call(c, "stream_new", 4, A("kinds"), A("exit"), I(c, 10000),
                    I(c, 4));
    assert_term(
        fake_call(c, "stream_submit", 3, k.s, list1(c, A("timeout")), I(c, 7)),
        "[]");
    k.inflight = 1;
    assert_term(take(&k), "[{7,exit,timeout}]");
    close_stream(&k);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_stream_refusals(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *x = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "narrow", 1, 1), s, l, xs;
    ErlNifEnv *e = fake_env(c);
    (void)state;
    s = fake_call(c, "stream_new", 4, A("nowhere"), A("echo"), A("infinity"),
                  I(c, 4));
    l = enif_make_list3(e, I(c, 1), I(c, 2), I(c, 3));
    assert_term(fake_call(c, "stream_submit", 3, s, l, I(c, 10)),
                "[{12,exit,noproc},{11,exit,noproc},{10,exit,noproc}]");
    assert_term(fake_call(c, "stream_close", 1, s), "false");
    s = fake_call(c, "stream_new", 4, A("narrow"), A("nothing"), A("infinity"),
                  I(c, 4));
    assert_term(fake_call(c, "stream_submit", 3, s, list1(c, I(c, 1)), I(c, 0)),
                "[{0,exit,{unknown_task,nothing}}]");
    /* One thread, a queue of one: two of four are admitted. */
    s = fake_call(c, "stream_new", 4, A("narrow"), A("sleep"), A("infinity"),
                  I(c, 4));
    l = enif_make_list4(e, I(c, 100000), I(c, 100000), I(c, 100000),
                        I(c, 100000));
    assert_term(fake_call(c, "stream_submit", 3, s, l, I(c, 0)),
                "[{3,exit,overloaded},{2,exit,overloaded}]");
    /* More than the free slots, or someone else's stream: badarg. */
    l = enif_make_list3(e, I(c, 1), I(c, 2), I(c, 3));
    assert_int_equal(fake_call(c, "stream_submit", 3, s, l, I(c, 4)), 0);
    assert_true(fake_raised(c, NULL));
    xs = enif_make_copy(fake_env(x), s); /* as if sent to x */
    assert_int_equal(fake_call(x, "stream_take", 3, xs, A("false"), A("false")),
                     0);
    assert_int_equal(fake_call(x, "stream_close", 1, xs), 0);
    assert_int_equal(fake_call(x, "task_ignore", 1, xs), 0);
    assert_true(fake_raised(x, NULL));
    assert_term(fake_call(c, "stream_close", 1, s), "false");
    assert_term(fake_call(c, "stream_take", 3, s, A("true"), A("false")), "[]");
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, x};
    assert_int_equal(settle(all, 3), 0);
}

/* Closing a stream while outcomes arrive leaves at most the one
 * notification message, and Flush says whether it is there. */
static void test_nif_stream_close_races_completions(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "closer", 2, 64);
    int n = iters(1500);
    long before = fake_dtor_calls("moat_stream");
    (void)state;
    for (int i = 0; i < n; i++) {
        consumer_t k = {c, 0, 1 + i % 16, 0, 0, 64};
        k.s = fake_call(c, "stream_new", 4, A("closer"), A("echo"),
                        A("infinity"), I(c, k.max));
        assert_term(top_up(&k), "[]");
        for (int steps = i % 3; steps > 0; steps--) {
            ERL_NIF_TERM l = take(&k), e;
            while (enif_get_list_cell(fake_env(c), l, &e, &l))
                k.inflight--;
            assert_term(top_up(&k), "[]");
        }
        jitter((unsigned)i);
        close_stream(&k);
        fake_gc(c);
    }
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
    assert_int_equal(fake_dtor_calls("moat_stream") - before, n);
}

static void test_nif_stream_owner_death_frees_it(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "abandoned", 2, 16), s, l;
    ErlNifEnv *e = fake_env(c);
    long before = fake_dtor_calls("moat_stream");
    (void)state;
    s = fake_call(c, "stream_new", 4, A("abandoned"), A("sleep"), A("infinity"),
                  I(c, 8));
    l = enif_make_list4(e, I(c, 100000), I(c, 100000), I(c, 100000),
                        I(c, 100000));
    assert_term(fake_call(c, "stream_submit", 3, s, l, I(c, 0)), "[]");
    fake_exit(c);
    /* The janitor cancels the stream's tasks; the last callback's
     * release destroys the stream, while the pool lives on. */
    wait_stat("abandoned", "cancelled", 4);
    wait_dtors("moat_stream", before + 1);
    assert_int_equal(stat_of("abandoned", "size"), 2);
    close_pool(o, h);
    fake_proc_t *all[] = {o};
    assert_int_equal(settle(all, 1), 0);
}

/* A task or stream that cannot be allocated raises enomem and leaves
 * nothing behind (the teardown checks); the pool carries on. */
static void test_nif_out_of_memory_raises(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "lean", 1, 4), r, t;
    (void)state;
    fake_fail_next_alloc("moat_task");
    assert_int_equal(fake_call(c, "async", 5, A("lean"), A("echo"),
                               list1(c, A("x")), A("infinity"), A("undefined")),
                     0);
    assert_true(fake_raised(c, &r));
    assert_term(r, "enomem");
    fake_fail_next_alloc("moat_task");
    assert_int_equal(run1(c, "lean", "echo", A("x"), -1), 0);
    assert_true(fake_raised(c, NULL));
    fake_fail_next_alloc("moat_stream");
    assert_int_equal(fake_call(c, "stream_new", 4, A("lean"), A("echo"),
                               A("infinity"), I(c, 4)),
                     0);
    assert_true(fake_raised(c, &r));
    assert_term(r, "enomem");
    assert_no_message(c);
    t = async1(c, "lean", "echo", A("fine"), -1);
    assert_term(await(c, t), "fine");
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* ------------------------------------------------------------ servers */

static ERL_NIF_TERM tup2(fake_proc_t *p, ERL_NIF_TERM a, ERL_NIF_TERM b) {
    return enif_make_tuple2(fake_env(p), a, b);
}

static ERL_NIF_TERM tup3(fake_proc_t *p, ERL_NIF_TERM a, ERL_NIF_TERM b,
                         ERL_NIF_TERM c) {
    return enif_make_tuple3(fake_env(p), a, b, c);
}

static ERL_NIF_TERM nil(fake_proc_t *p) { return enif_make_list(fake_env(p), 0); }

/* {native_crash, cnode_down}, what the owner ends a lost port C-node's
 * tasks with. */
static ERL_NIF_TERM cnode_down(fake_proc_t *p) {
    return enif_make_tuple2(fake_env(p), A("native_crash"), A("cnode_down"));
}

static ERL_NIF_TERM ints2(fake_proc_t *p, long a, long b) {
    return enif_make_list2(fake_env(p), I(p, a), I(p, b));
}

/* A child spec {Id, 0, Server, Args, Restart, Shutdown} of the demo
 * library (index 0 of a pool made by start_pool). */
static ERL_NIF_TERM child(fake_proc_t *p, ERL_NIF_TERM id, const char *server,
                          ERL_NIF_TERM args, const char *restart,
                          ERL_NIF_TERM shutdown) {
    return enif_make_tuple6(fake_env(p), id, I(p, 0), A(server), args,
                            A(restart), shutdown);
}

/* A permanent counter [Initial] stopped within a second. */
static ERL_NIF_TERM counter(fake_proc_t *p, ERL_NIF_TERM id, long initial) {
    return child(p, id, "counter", list1(p, I(p, initial)), "permanent",
                 I(p, 1000));
}

static ERL_NIF_TERM sup_flags(fake_proc_t *p, const char *strategy,
                              long intensity, long period) {
    return tup3(p, A(strategy), I(p, intensity), I(p, period));
}

static ERL_NIF_TERM sup_start(fake_proc_t *owner, ERL_NIF_TERM h,
                              ERL_NIF_TERM flags, ERL_NIF_TERM children) {
    return fake_call(owner, "sup_start", 3, h, flags, children);
}

/* Asserts that the last call of p raised badarg. */
static void assert_badarg(fake_proc_t *p, ERL_NIF_TERM r) {
    ERL_NIF_TERM reason;
    if (r != 0)
        fail_msg("returned %s, not raised badarg", S(r));
    assert_true(fake_raised(p, &reason));
    assert_term(reason, "badarg");
}

/* A duration that must outlast some work of moat's: longer under
 * valgrind, which runs one thread at a time. */
static long slow_ms(long ms) { return RUNNING_ON_VALGRIND ? 4 * ms : ms; }

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* How call/4 answered so far: on the spot or with {wait, Ref}. */
static long calls_inline, calls_waited;

/* The outcome of a call/4 result: {ok, R} | {exit, R}, receiving its one
 * message when the result is {wait, Ref}.  A DOWN must name the call's
 * Ref and a task {Pool, N}. */
static ERL_NIF_TERM call_outcome(fake_proc_t *p, const char *pool,
                                 ERL_NIF_TERM r) {
    ERL_NIF_TERM m;
    long n;
    if (r == 0)
        fail_msg("call raised");
    if (fake_arity(r) != 2)
        fail_msg("not a call result: %s", S(r));
    if (fake_is_atom(el(r, 0), "ok") || fake_is_atom(el(r, 0), "exit")) {
        calls_inline++;
        return r;
    }
    if (!fake_is_atom(el(r, 0), "wait"))
        fail_msg("not a call result: %s", S(r));
    assert_true(fake_is_resource(el(r, 1), "moat_task"));
    calls_waited++;
    m = recv(p);
    if (fake_arity(m) == 2) {
        assert_same(el(m, 0), el(r, 1));
        return tup2(p, A("ok"), el(m, 1));
    }
    if (fake_arity(m) != 5 || !fake_is_atom(el(m, 0), "DOWN") ||
        !fake_is_atom(el(m, 2), "process"))
        fail_msg("not a call message: %s", S(m));
    assert_same(el(m, 1), el(r, 1));
    if (fake_arity(el(m, 3)) != 2 || !fake_is_atom(el(el(m, 3), 0), pool) ||
        !fake_get_long(el(el(m, 3), 1), &n) || n <= 0)
        fail_msg("the DOWN names no call of %s: %s", pool, S(m));
    return tup2(p, A("exit"), el(m, 4));
}

static ERL_NIF_TERM call_raw(fake_proc_t *p, const char *pool, ERL_NIF_TERM id,
                             ERL_NIF_TERM req, long timeout_ms) {
    return fake_call(p, "call", 4, A(pool), id, req, timeout_term(p, timeout_ms));
}

/* call/4 and its outcome. */
static ERL_NIF_TERM srv_call(fake_proc_t *p, const char *pool, ERL_NIF_TERM id,
                             ERL_NIF_TERM req, long timeout_ms) {
    return call_outcome(p, pool, call_raw(p, pool, id, req, timeout_ms));
}

static ERL_NIF_TERM add_req(fake_proc_t *p, long n) {
    return tup2(p, A("add"), I(p, n));
}

static ERL_NIF_TERM sleep_req(fake_proc_t *p, long ms) {
    return tup2(p, A("sleep"), I(p, ms));
}

/* Calls get on the server until it answers `want`, accepting noproc
 * while it restarts.  Keeps p's terms (no collection). */
static void wait_get(fake_proc_t *p, const char *pool, const char *id,
                     const char *want) {
    for (long i = 0;; i++) {
        ERL_NIF_TERM r = srv_call(p, pool, A(id), A("get"), -1);
        if (strcmp(S(r), want) == 0)
            return;
        if (strcmp(S(r), "{exit,noproc}") != 0 || i > SETTLE_MS)
            fail_msg("%s's get: %s, not %s", id, S(r), want);
        pause_ms(1);
    }
}

/* Polls which_children(pool) until it prints as `want`; keeps p's
 * terms. */
static void wait_children(fake_proc_t *p, const char *pool, const char *want) {
    for (long i = 0;; i++) {
        ERL_NIF_TERM r = fake_call(p, "which_children", 1, A(pool));
        if (strcmp(S(r), want) == 0)
            return;
        if (i > SETTLE_MS)
            fail_msg("which_children(%s) stays %s, not %s", pool, S(r), want);
        pause_ms(1);
    }
}

static long start_seq(fake_proc_t *p, const char *pool, const char *id) {
    ERL_NIF_TERM r = srv_call(p, pool, A(id), A("start_seq"), -1);
    long n;
    if (!fake_is_atom(el(r, 0), "ok") || !fake_get_long(el(r, 1), &n))
        fail_msg("start_seq: %s", S(r));
    return n;
}

static void test_nif_sup_start_and_children(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ErlNifEnv *e = fake_env(o);
    ERL_NIF_TERM h = start_pool(o, "kids", 2, 8), h2 = start_pool(o, "bare", 1, 4),
                 kids, bid;
    (void)state;
    /* Before sup_start: no servers, nothing to call. */
    assert_term(fake_call(c, "which_children", 1, A("kids")), "[]");
    assert_term(fake_call(c, "count_children", 1, A("kids")),
                "#{specs=>0,active=>0,supervisors=>0,workers=>0}");
    assert_term(srv_call(c, "kids", A("a"), A("get"), -1), "{exit,noproc}");
    /* Any term is an id; every restart kind and shutdown form. */
    kids = enif_make_list3(
        e, counter(o, A("a"), 1),
        child(o, tup2(o, A("b"), I(o, 2)), "counter", ints2(o, 2, 0),
              "transient", A("brutal_kill")),
        child(o, A("c"), "counter", list1(o, I(o, 3)), "temporary",
              A("infinity")));
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5), kids), "ok");
    assert_term(fake_call(c, "which_children", 1, A("kids")),
                "[{a,running,worker},{{b,2},running,worker},{c,running,worker}]");
    assert_term(fake_call(c, "count_children", 1, A("kids")),
                "#{specs=>3,active=>3,supervisors=>0,workers=>3}");
    /* A supervisor with no children answers too. */
    assert_term(sup_start(o, h2, sup_flags(o, "one_for_all", 0, 1), nil(o)),
                "ok");
    assert_term(fake_call(c, "which_children", 1, A("bare")), "[]");
    assert_term(fake_call(c, "count_children", 1, A("bare")),
                "#{specs=>0,active=>0,supervisors=>0,workers=>0}");
    assert_term(fake_call(c, "which_children", 1, A("nope")),
                "{error,not_found}");
    assert_term(fake_call(c, "count_children", 1, A("nope")),
                "{error,not_found}");
    assert_badarg(c, fake_call(c, "which_children", 1, bin(c, "kids")));
    assert_badarg(c, fake_call(c, "count_children", 1, I(c, 1)));
    /* Each server by its id: an equal term found by value. */
    bid = tup2(c, A("b"), I(c, 2));
    assert_term(srv_call(c, "kids", A("a"), A("get"), -1), "{ok,1}");
    assert_term(srv_call(c, "kids", bid, A("get"), -1), "{ok,2}");
    assert_term(srv_call(c, "kids", A("c"), A("get"), -1), "{ok,3}");
    assert_term(srv_call(c, "kids", tup2(c, A("b"), I(c, 3)), A("get"), -1),
                "{exit,noproc}");
    /* Ended normally: the permanent one restarts, the transient one is
     * `undefined`, the temporary one is gone. */
    assert_term(srv_call(c, "kids", A("a"), A("stop"), -1), "{exit,normal}");
    assert_term(srv_call(c, "kids", bid, A("stop"), -1), "{exit,normal}");
    assert_term(srv_call(c, "kids", A("c"), A("stop"), -1), "{exit,normal}");
    wait_get(c, "kids", "a", "{ok,1}");
    wait_children(c, "kids", "[{a,running,worker},{{b,2},undefined,worker}]");
    assert_term(fake_call(c, "count_children", 1, A("kids")),
                "#{specs=>2,active=>1,supervisors=>0,workers=>2}");
    assert_term(srv_call(c, "kids", bid, A("get"), -1), "{exit,noproc}");
    assert_term(srv_call(c, "kids", A("c"), A("get"), -1), "{exit,noproc}");
    close_pool(o, h);
    close_pool(o, h); /* closing twice is harmless, servers or not */
    close_pool(o, h2);
    assert_term(fake_call(c, "which_children", 1, A("kids")),
                "{error,not_found}");
    assert_term(fake_call(c, "count_children", 1, A("kids")),
                "{error,not_found}");
    assert_term(srv_call(c, "kids", A("a"), A("get"), -1), "{exit,noproc}");
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* With the clock held still, call/4 waits until the reply is held for
 * it: answered on the spot every time, replies and failures alike. */
static void test_nif_call_answers_on_the_spot(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "spot_srv", 2, 4);
    long waited = calls_waited;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, counter(o, A("ctr"), 100))),
                "ok");
    fake_freeze_clock(1);
    for (int i = 0; i < iters(200); i++) {
        ERL_NIF_TERM r = call_raw(c, "spot_srv", A("ctr"), add_req(c, 1), -1);
        assert_term(r, S(tup2(c, A("ok"), I(c, 101 + i))));
        fake_gc(c);
    }
    /* A request the server refuses is a reply; a crash an exit. */
    assert_term(call_raw(c, "spot_srv", A("ctr"), A("bogus"), -1),
                "{ok,{error,badarg}}");
    assert_term(call_raw(c, "spot_srv", A("ctr"), tup2(c, A("stop"), A("bye")),
                         -1),
                "{exit,bye}");
    fake_freeze_clock(0);
    assert_int_equal(calls_waited, waited);
    assert_no_message(c);
    wait_get(c, "spot_srv", "ctr", "{ok,100}"); /* restarted afresh */
    assert_term(recv(o), "{moat_child_crashed,spot_srv}"); /* for its log */
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A reply that takes longer comes as {Ref, Reply}; racing calls get
 * exactly one outcome either way. */
static void test_nif_call_falls_back_to_a_message(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "later_srv", 2, 4), r;
    long inline0 = calls_inline, waited0 = calls_waited, n = iters(2000);
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, counter(o, A("ctr"), 7))),
                "ok");
    r = call_raw(c, "later_srv", A("ctr"), sleep_req(c, 20), -1);
    assert_term(el(r, 0), "wait");
    assert_term(call_outcome(c, "later_srv", r), "{ok,7}");
    assert_no_message(c);
    fake_gc(c);
    for (long i = 0; i < n; i++) {
        r = srv_call(c, "later_srv", A("ctr"), i & 1 ? A("get") : add_req(c, 1),
                     -1);
        assert_term(r, S(tup2(c, A("ok"), I(c, 8 + i / 2))));
        assert_int_equal(fake_mailbox_len(c), 0);
        fake_gc(c);
    }
    assert_int_equal(calls_inline - inline0 + calls_waited - waited0, n + 1);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
    print_message("call: %ld answered on the spot, %ld by message\n",
                  calls_inline - inline0, calls_waited - waited0);
}

/* Past its timeout a call ends with `timeout`, once: the server still
 * handles the request, but its late reply is dropped. */
static void test_nif_call_timeout(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *d = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "slow_srv", 2, 4), r, busy;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, counter(o, A("ctr"), 5))),
                "ok");
    r = call_raw(c, "slow_srv", A("ctr"), sleep_req(c, 300), 20);
    assert_term(el(r, 0), "wait");
    assert_term(call_outcome(c, "slow_srv", r), "{exit,timeout}");
    /* Queued behind the sleep: its reply is sent after the sleep's would
     * have been. */
    assert_term(srv_call(c, "slow_srv", A("ctr"), A("get"), -1), "{ok,5}");
    assert_no_message(c);
    /* Timeout 0 on a busy server: one timeout, on the spot or not. */
    busy = call_raw(d, "slow_srv", A("ctr"), sleep_req(d, 300), -1);
    assert_term(el(busy, 0), "wait");
    assert_term(srv_call(c, "slow_srv", A("ctr"), add_req(c, 1), 0),
                "{exit,timeout}");
    assert_term(call_outcome(d, "slow_srv", busy), "{ok,5}");
    /* The timed-out add was handled all the same. */
    assert_term(srv_call(d, "slow_srv", A("ctr"), A("get"), -1), "{ok,6}");
    assert_no_message(c);
    assert_no_message(d);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, d};
    assert_int_equal(settle(all, 3), 0);
}

/* No pool, no servers, no such id: {exit, noproc} at once, nothing sent;
 * casts are dropped; bad arguments raise badarg. */
static void test_nif_call_and_cast_refusals(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "refusing", 1, 4),
                 h2 = start_pool(o, "serverless", 1, 4);
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, counter(o, A("ctr"), 0))),
                "ok");
    assert_term(call_raw(c, "nowhere", A("ctr"), A("get"), -1), "{exit,noproc}");
    assert_term(call_raw(c, "refusing", A("other"), A("get"), -1),
                "{exit,noproc}");
    assert_term(call_raw(c, "serverless", A("ctr"), A("get"), 100),
                "{exit,noproc}");
    assert_term(fake_call(c, "cast", 3, A("nowhere"), A("ctr"), add_req(c, 1)),
                "ok");
    assert_term(fake_call(c, "cast", 3, A("refusing"), A("other"),
                          add_req(c, 1)),
                "ok");
    assert_term(fake_call(c, "cast", 3, A("serverless"), A("ctr"),
                          add_req(c, 1)),
                "ok");
    assert_badarg(c, fake_call(c, "call", 4, bin(c, "refusing"), A("ctr"),
                               A("get"), A("infinity")));
    assert_badarg(c, fake_call(c, "call", 4, A("refusing"), A("ctr"), A("get"),
                               I(c, -1)));
    assert_badarg(c, fake_call(c, "call", 4, A("refusing"), A("ctr"), A("get"),
                               A("forever")));
    assert_badarg(c, fake_call(c, "cast", 3, I(c, 1), A("ctr"), A("get")));
    /* A call that cannot be allocated raises enomem. */
    fake_fail_next_alloc("moat_task");
    assert_int_equal(call_raw(c, "refusing", A("ctr"), A("get"), -1), 0);
    {
        ERL_NIF_TERM reason;
        assert_true(fake_raised(c, &reason));
        assert_term(reason, "enomem");
    }
    assert_no_message(c);
    /* None of it reached the server. */
    assert_term(srv_call(c, "refusing", A("ctr"), A("get"), -1), "{ok,0}");
    close_pool(o, h);
    close_pool(o, h2);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_cast(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "casts", 2, 4);
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          enif_make_list2(fake_env(o), counter(o, A("x"), 10),
                                          counter(o, A("y"), 20))),
                "ok");
    for (int i = 0; i < 50; i++)
        assert_term(fake_call(c, "cast", 3, A("casts"), A("x"), add_req(c, 2)),
                    "ok");
    /* Others are dropped, the server carries on. */
    assert_term(fake_call(c, "cast", 3, A("casts"), A("x"), A("bogus")), "ok");
    assert_term(fake_call(c, "cast", 3, A("casts"), A("y"), add_req(c, -5)),
                "ok");
    /* Ordered before a later call from the same process. */
    assert_term(srv_call(c, "casts", A("x"), A("get"), -1), "{ok,110}");
    assert_term(srv_call(c, "casts", A("y"), A("get"), -1), "{ok,15}");
    assert_no_message(c);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A crash ends the call that caused it and those queued behind it with
 * the server's reason; the supervisor restarts the server afresh. */
static void test_nif_call_crash_restarts_the_server(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "crashy", 2, 4), ra, rb, rc;
    long seq;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 5, 10),
                          enif_make_list2(fake_env(o), counter(o, A("ctr"), 10),
                                          counter(o, A("other"), 1))),
                "ok");
    /* Starts are numbered across the library: `other` started last. */
    seq = start_seq(c, "crashy", "other");
    assert_true(start_seq(c, "crashy", "ctr") < seq);
    assert_term(srv_call(c, "crashy", A("ctr"), add_req(c, 5), -1), "{ok,15}");
    /* Answered on the spot. */
    fake_freeze_clock(1);
    assert_term(call_raw(c, "crashy", A("ctr"), A("crash"), -1),
                "{exit,{native_error,<<\"crash\">>}}");
    fake_freeze_clock(0);
    wait_get(c, "crashy", "ctr", "{ok,10}");
    assert_int_equal(start_seq(c, "crashy", "ctr"), seq + 1);
    /* The owner hears of the crash, and reads it (to log and report). */
    assert_term(recv(o), "{moat_child_crashed,crashy}");
    assert_term(fake_call(o, "pool_crashes", 1, h),
                "{1,ctr,{native_error,<<\"crash\">>}}");
    assert_term(fake_call(o, "pool_crashes", 1, h), "{0,undefined,undefined}");
    /* By message, with calls queued behind the crash. */
    assert_term(srv_call(c, "crashy", A("ctr"), add_req(c, 5), -1), "{ok,15}");
    ra = call_raw(c, "crashy", A("ctr"), sleep_req(c, 200), -1);
    rb = call_raw(c, "crashy", A("ctr"), A("crash"), -1);
    rc = call_raw(c, "crashy", A("ctr"), A("get"), -1);
    assert_term(el(ra, 0), "wait");
    assert_term(el(rb, 0), "wait");
    assert_term(el(rc, 0), "wait");
    assert_term(call_outcome(c, "crashy", ra), "{ok,15}");
    assert_term(call_outcome(c, "crashy", rb),
                "{exit,{native_error,<<\"crash\">>}}");
    assert_term(call_outcome(c, "crashy", rc),
                "{exit,{native_error,<<\"crash\">>}}");
    assert_no_message(c);
    wait_get(c, "crashy", "ctr", "{ok,10}");
    assert_int_equal(start_seq(c, "crashy", "ctr"), seq + 2);
    wait_children(c, "crashy", "[{ctr,running,worker},{other,running,worker}]");
    /* one_for_one: the other server was not restarted. */
    assert_int_equal(start_seq(c, "crashy", "other"), seq);
    assert_term(srv_call(c, "crashy", A("other"), A("get"), -1), "{ok,1}");
    /* Crashes before the owner reads: one notice, every crash counted. */
    assert_term(srv_call(c, "crashy", A("other"), A("crash"), -1),
                "{exit,{native_error,<<\"crash\">>}}");
    wait_get(c, "crashy", "other", "{ok,1}");
    assert_term(recv(o), "{moat_child_crashed,crashy}");
    assert_no_message(o);
    assert_term(fake_call(o, "pool_crashes", 1, h),
                "{2,other,{native_error,<<\"crash\">>}}");
    assert_no_message(o);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

static void test_nif_sup_start_refuses(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ErlNifEnv *e = fake_env(o);
    ERL_NIF_TERM h = start_pool(o, "picky", 2, 4), ok1 = counter(o, A("a"), 1),
                 ok_flags = sup_flags(o, "one_for_one", 3, 5);
    long t0;
    ERL_NIF_TERM bad_flags[] = {
        A("one_for_one"),
        tup2(o, A("one_for_one"), I(o, 3)),
        sup_flags(o, "simple_one_for_one", 3, 5),
        sup_flags(o, "one_for_one", -1, 5),
        sup_flags(o, "one_for_one", 3, 0),
        tup3(o, A("one_for_one"), A("three"), I(o, 5)),
    };
    ERL_NIF_TERM bad_children[] = {
        A("none"),
        list1(o, tup2(o, A("a"), I(o, 0))),
        list1(o, enif_make_tuple6(e, A("a"), I(o, 1), A("counter"),
                                  list1(o, I(o, 0)), A("permanent"),
                                  I(o, 1000))), /* no library 1 */
        list1(o, enif_make_tuple6(e, A("a"), I(o, -1), A("counter"),
                                  list1(o, I(o, 0)), A("permanent"),
                                  I(o, 1000))),
        list1(o, enif_make_tuple6(e, A("a"), I(o, 0), bin(o, "counter"),
                                  list1(o, I(o, 0)), A("permanent"),
                                  I(o, 1000))),
        list1(o, child(o, A("a"), "counter", I(o, 0), "permanent", I(o, 1000))),
        list1(o, child(o, A("a"), "counter", list1(o, I(o, 0)), "forever",
                       I(o, 1000))),
        list1(o, child(o, A("a"), "counter", list1(o, I(o, 0)), "permanent",
                       I(o, -1))),
        list1(o, child(o, A("a"), "counter", list1(o, I(o, 0)), "permanent",
                       A("soon"))),
        /* A bad spec after a good one. */
        enif_make_list2(e, ok1, A("junk")),
        /* Two children, one id. */
        enif_make_list3(e, ok1, counter(o, A("b"), 2), counter(o, A("a"), 3)),
    };
    (void)state;
    for (size_t i = 0; i < sizeof bad_flags / sizeof *bad_flags; i++)
        assert_badarg(o, sup_start(o, h, bad_flags[i], list1(o, ok1)));
    for (size_t i = 0; i < sizeof bad_children / sizeof *bad_children; i++)
        assert_badarg(o, sup_start(o, h, ok_flags, bad_children[i]));
    assert_badarg(o, sup_start(o, A("picky"), ok_flags, list1(o, ok1)));
    assert_term(fake_call(c, "which_children", 1, A("picky")), "[]");
    /* A server the library lacks; an init that fails (after a child
     * that started): nothing stays. */
    assert_term(
        sup_start(o, h, ok_flags,
                  enif_make_list2(e, ok1,
                                  child(o, tup2(o, A("x"), I(o, 1)), "nope",
                                        nil(o), "permanent", I(o, 1000)))),
        "{error,{shutdown,{failed_to_start_child,{x,1},{unknown_server,nope}}}}");
    /* The failed start returns once the child started before it has
     * stopped (its terminate takes 200 ms). */
    t0 = now_ms();
    assert_term(sup_start(o, h, ok_flags,
                          enif_make_list2(e,
                                          child(o, A("a"), "counter",
                                                ints2(o, 1, 200), "permanent",
                                                I(o, 5000)),
                                          child(o, A("bad"), "counter",
                                                list1(o, A("a")), "permanent",
                                                I(o, 1000)))),
                "{error,{shutdown,{failed_to_start_child,bad,badarg}}}");
    if (now_ms() - t0 < 200)
        fail_msg("sup_start failed after %ld ms, before its started child "
                 "stopped",
                 now_ms() - t0);
    assert_term(fake_call(c, "which_children", 1, A("picky")), "[]");
    assert_term(fake_call(c, "count_children", 1, A("picky")),
                "#{specs=>0,active=>0,supervisors=>0,workers=>0}");
    assert_term(srv_call(c, "picky", A("a"), A("get"), -1), "{exit,noproc}");
    /* None of that counts as the pool's one supervisor. */
    assert_term(sup_start(o, h, ok_flags, list1(o, counter(o, A("z"), 26))),
                "ok");
    assert_badarg(o, sup_start(o, h, ok_flags, list1(o, counter(o, A("y"), 1))));
    assert_badarg(o, sup_start(o, h, ok_flags, nil(o)));
    assert_term(fake_call(c, "which_children", 1, A("picky")),
                "[{z,running,worker}]");
    assert_term(srv_call(c, "picky", A("z"), A("get"), -1), "{ok,26}");
    assert_no_message(o);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* Past its intensity the native supervisor stops every server and tells
 * the pool's owner, once; until the pool restarts every server is
 * `restarting` and calls find none. */
static void test_nif_sup_gives_up(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "fragile", 2, 4), r;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 0, 5),
                          enif_make_list2(fake_env(o), counter(o, A("a"), 1),
                                          counter(o, A("b"), 2))),
                "ok");
    assert_term(srv_call(c, "fragile", A("a"), A("crash"), -1),
                "{exit,{native_error,<<\"crash\">>}}");
    /* The crash is told first: the supervisor acts on it afterwards. */
    assert_term(recv(o), "{moat_child_crashed,fragile}");
    assert_term(recv(o), "{moat_gave_up,fragile,shutdown}");
    /* At once, though the supervisor may not have exited yet. */
    assert_term(fake_call(c, "which_children", 1, A("fragile")),
                "[{a,restarting,worker},{b,restarting,worker}]");
    assert_term(fake_call(c, "count_children", 1, A("fragile")),
                "#{specs=>2,active=>0,supervisors=>0,workers=>2}");
    assert_term(srv_call(c, "fragile", A("a"), A("get"), -1), "{exit,noproc}");
    assert_term(srv_call(c, "fragile", A("b"), A("get"), -1), "{exit,noproc}");
    assert_term(fake_call(c, "cast", 3, A("fragile"), A("b"), add_req(c, 1)),
                "ok");
    assert_no_message(c);
    /* The pool itself carries on until its owner closes it. */
    r = async1(c, "fragile", "echo", A("alive"), -1);
    assert_term(await(c, r), "alive");
    close_pool(o, h);
    /* The owner hears of it while the supervisor stops its servers and
     * exits: which_children says `restarting` all along. */
    for (int i = 0; i < iters(100); i++) {
        h = start_pool(o, "fragile", 2, 4);
        assert_term(sup_start(o, h, sup_flags(o, "one_for_all", 0, 5),
                              enif_make_list2(fake_env(o),
                                              counter(o, A("a"), 1),
                                              counter(o, A("b"), 2))),
                    "ok");
        assert_term(srv_call(c, "fragile", A(i & 1 ? "b" : "a"), A("crash"),
                             -1),
                    "{exit,{native_error,<<\"crash\">>}}");
        assert_term(recv(o), "{moat_child_crashed,fragile}");
        assert_term(recv(o), "{moat_gave_up,fragile,shutdown}");
        assert_term(fake_call(c, "which_children", 1, A("fragile")),
                    "[{a,restarting,worker},{b,restarting,worker}]");
        close_pool(o, h);
        fake_gc(o);
        fake_gc(c);
    }
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0); /* one of each, no more */
}

/* pool_close stops the servers gracefully: it waits for a slow
 * terminate within the child's shutdown, and no longer. */
static void test_nif_pool_close_stops_slow_servers(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h, r;
    long t0, took;
    (void)state;
    /* Waited for: terminate takes 300 ms, shutdown allows 5 s. */
    h = start_pool(o, "patient", 1, 4);
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, child(o, A("s"), "counter", ints2(o, 0, 300),
                                         "permanent", I(o, 5000)))),
                "ok");
    t0 = now_ms();
    close_pool(o, h);
    took = now_ms() - t0;
    if (took < 300)
        fail_msg("pool_close took %ld ms: it did not wait for terminate", took);
    /* Cut short, with a shutdown of 50 ms or brutal_kill: a terminate
     * that takes stop_ms, or a call in flight for 60 s, which ends once,
     * killed.  Two threads: the supervisor needs one while the server's
     * body holds the other (on a pool of one thread pool_close waits for
     * the body: see the report of this harness's author). */
    for (int i = 0; i < 3; i++) {
        long stop_ms = i == 0 ? slow_ms(3000) : 0,
             limit = i == 0 ? stop_ms - 500 : 30000;
        h = start_pool(o, "hasty", 2, 4);
        assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                              list1(o, child(o, A("s"), "counter",
                                             ints2(o, 0, stop_ms), "permanent",
                                             i == 2 ? A("brutal_kill")
                                                    : I(o, 50)))),
                    "ok");
        r = 0;
        if (i > 0) {
            r = call_raw(c, "hasty", A("s"), sleep_req(c, 60000), -1);
            assert_term(el(r, 0), "wait");
        }
        t0 = now_ms();
        close_pool(o, h);
        took = now_ms() - t0;
        print_message("hasty %d: pool_close took %ld ms\n", i, took);
        if (took >= limit)
            fail_msg("pool_close took %ld ms past a shutdown of %s%s", took,
                     i == 2 ? "brutal_kill" : "50 ms",
                     i > 0 ? ", a call in flight" : "");
        /* Settled by whoever killed the server, maybe just after. */
        if (r != 0)
            assert_term(call_outcome(c, "hasty", r), "{exit,killed}");
        assert_no_message(c);
        fake_gc(o);
        fake_gc(c);
    }
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* Receives one message about each of refs[0..n) (task or call
 * references), in any order, and prints each outcome into outs[i]: the
 * value of {Ref, V}, or {DOWN,Reason}. */
static void recv_each(fake_proc_t *p, const ERL_NIF_TERM *refs, int n,
                      char (*outs)[128]) {
    for (int i = 0; i < n; i++)
        outs[i][0] = 0;
    for (int i = 0; i < n; i++) {
        ERL_NIF_TERM m = recv(p), ref = 0, out = 0;
        int k;
        if (fake_arity(m) == 2) {
            ref = el(m, 0);
            out = el(m, 1);
        } else if (fake_arity(m) == 5 && fake_is_atom(el(m, 0), "DOWN")) {
            ref = el(m, 1);
            out = tup2(p, A("DOWN"), el(m, 4));
        } else {
            fail_msg("not a task message: %s", S(m));
        }
        for (k = 0; k < n && !enif_is_identical(ref, refs[k]); k++)
            ;
        if (k == n || outs[k][0] != 0)
            fail_msg("a second message, or one about nothing awaited: %s",
                     S(m));
        snprintf(outs[k], sizeof outs[k], "%s", S(out));
    }
}

/* Tasks hold every thread: pool_close ends them (each gets one
 * `shutdown`), which frees the threads the servers need to stop in
 * order, each running terminate.  Tasks that ignore cancellation are
 * abandoned to threads of their own. */
static void test_nif_pool_close_with_busy_threads(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    (void)state;
    for (int round = 0; round < 2; round++) {
        const char *pool = round ? "busy2" : "busy1";
        unsigned size = round ? 2 : 1;
        ERL_NIF_TERM h, refs[8], r;
        char outs[8][128];
        int n = 0;
        long t0, took;
        h = start_pool(o, pool, size, 8);
        assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                              enif_make_list2(
                                  fake_env(o),
                                  child(o, A("s1"), "counter", ints2(o, 0, 150),
                                        "permanent", I(o, 10000)),
                                  child(o, A("s2"), "counter", ints2(o, 0, 150),
                                        "permanent", I(o, 10000)))),
                    "ok");
        /* Round 0: sleeps, which stop when told; round 1: spins, which
         * do not (long enough to outlast pool_close under valgrind, whose
         * threads take turns with the spinning ones).  Sleeps queued
         * behind them. */
        for (unsigned i = 0; i < size; i++)
            refs[n++] = el(round ? async1(c, pool, "spin",
                                          I(c, slow_ms(3000) * 1000), -1)
                                 : async1(c, pool, "sleep", I(c, 60000), -1),
                           0);
        wait_stat(pool, "running", size);
        for (int i = 0; i < 3; i++)
            refs[n++] = el(async1(c, pool, "sleep", I(c, 60000), -1), 0);
        /* No thread for the servers now. */
        r = call_raw(c, pool, A("s1"), A("get"), -1);
        assert_term(el(r, 0), "wait");
        refs[n++] = el(r, 1);
        t0 = now_ms();
        close_pool(o, h);
        took = now_ms() - t0;
        /* Every outcome was sent before pool_close returned. */
        assert_int_equal(fake_mailbox_len(c), n);
        recv_each(c, refs, n, outs);
        for (int i = 0; i < n - 1; i++)
            assert_string_equal(outs[i], "{DOWN,shutdown}");
        /* The call was queued to s1 before its stop request: answered
         * first, once a thread was free. */
        assert_string_equal(outs[n - 1], "0");
        /* Both servers ran terminate, 150 ms each, one after the other. */
        if (took < 300)
            fail_msg("%s: pool_close took %ld ms: it did not stop the servers "
                     "in turn",
                     pool, took);
        /* pool_close did not wait for the spins: they still run. */
        for (unsigned i = 0; round == 1 && i < size; i++)
            assert_term(fake_call(c, "task_running", 1, refs[i]), "true");
        print_message("%s: pool_close took %ld ms\n", pool, took);
        assert_no_message(c);
        fake_gc(o);
        fake_gc(c);
    }
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* The caller of pool_close killed while it waits for the servers to
 * stop: it gives up waiting, and closing the pool ends the rest. */
static void *close_as(void *arg) {
    void **a = arg;
    a[2] = (void *)(uintptr_t)fake_call(a[0], "pool_close", 1,
                                        (ERL_NIF_TERM)(uintptr_t)a[1]);
    return NULL;
}

static void test_nif_pool_close_gives_up_when_its_caller_dies(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "orphaned", 1, 4);
    void *arg[3];
    pthread_t tid;
    long t0, took;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, child(o, A("s"), "counter",
                                         ints2(o, 0, slow_ms(3000)),
                                         "permanent", A("infinity")))),
                "ok");
    assert_term(srv_call(c, "orphaned", A("s"), A("get"), -1), "{ok,0}");
    arg[0] = o;
    arg[1] = (void *)(uintptr_t)h;
    arg[2] = NULL;
    t0 = now_ms();
    assert_int_equal(pthread_create(&tid, NULL, close_as, arg), 0);
    pause_ms(100); /* in sup_stop by now, most likely; either way */
    fake_die(o);
    assert_int_equal(pthread_join(tid, NULL), 0);
    took = now_ms() - t0;
    assert_term((ERL_NIF_TERM)(uintptr_t)arg[2], "ok");
    print_message("pool_close took %ld ms\n", took);
    if (took >= slow_ms(3000) - 500)
        fail_msg("pool_close took %ld ms: it waited for a dead caller", took);
    assert_term(fake_call(c, "pool_owner", 1, A("orphaned")), "undefined");
    assert_term(srv_call(c, "orphaned", A("s"), A("get"), -1), "{exit,noproc}");
    fake_reap(o);
    fake_proc_t *all[] = {c};
    assert_int_equal(settle(all, 1), 0);
}

/* A caller that dies with a call in flight: its call is cancelled and
 * freed, no message is left, and the server carries on. */
static void test_nif_call_caller_dies(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn(), *d = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "bereaved", 2, 4), r;
    long before = fake_dtor_calls("moat_task"), died = 0;
    int n = iters(300);
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          enif_make_list2(
                              fake_env(o),
                              child(o, A("long"), "counter", list1(o, I(o, 0)),
                                    "permanent", I(o, 50)),
                              counter(o, A("short"), 0))),
                "ok");
    /* A reply 60 s away: only the cancel frees the call now. */
    r = call_raw(c, "bereaved", A("long"), sleep_req(c, 60000), -1);
    assert_term(el(r, 0), "wait");
    fake_exit(c);
    wait_dtors("moat_task", before + 1);
    /* Callers dying as their calls complete, on the spot or not. */
    for (int i = 0; i < n; i++) {
        fake_proc_t *p = fake_spawn();
        r = call_raw(p, "bereaved", A("short"),
                     i % 3 == 0 ? sleep_req(p, i % 2) : add_req(p, 1), -1);
        if (fake_is_atom(el(r, 0), "wait"))
            died++;
        jitter((unsigned)i);
        fake_exit(p);
    }
    assert_term(srv_call(d, "bereaved", A("short"), A("get"), -1),
                S(tup2(d, A("ok"), I(d, n - (n + 2) / 3))));
    close_pool(o, h);
    fake_proc_t *all[] = {o, d};
    assert_int_equal(settle(all, 2), 0);
    print_message("callers died with %ld of %d calls in flight\n", died, n);
}

/* The pool's owner dies: the pool closes (its supervisor with it) and a
 * call in flight ends once. */
static void test_nif_pool_owner_death_stops_the_servers(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "headless", 2, 4), r;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, counter(o, A("s"), 0))),
                "ok");
    r = call_raw(c, "headless", A("s"), sleep_req(c, 60000), -1);
    assert_term(el(r, 0), "wait");
    fake_exit(o);
    r = call_outcome(c, "headless", r);
    print_message("a call in flight as the owner died: %s\n", S(r));
    assert_term(el(r, 0), "exit");
    assert_term(fake_call(c, "which_children", 1, A("headless")),
                "{error,not_found}");
    assert_term(srv_call(c, "headless", A("s"), A("get"), -1), "{exit,noproc}");
    fake_proc_t *all[] = {c};
    assert_int_equal(settle(all, 1), 0);
}

typedef struct {
    fake_proc_t *p;
    pthread_t tid;
    int n;
    long bad;
} caller_t;

static void *call_many(void *arg) {
    caller_t *k = arg;
    for (int i = 0; i < k->n; i++) {
        ERL_NIF_TERM r =
            fake_call(k->p, "call", 4, A("shared"), A("ctr"),
                      enif_make_tuple2(fake_env(k->p), A("add"), I(k->p, 1)),
                      A("infinity"));
        if (fake_arity(r) == 2 && fake_is_atom(el(r, 0), "wait")) {
            ERL_NIF_TERM m = fake_recv(k->p, RECV_MS);
            if (m == 0 || fake_arity(m) != 2 ||
                !enif_is_identical(el(m, 0), el(r, 1)))
                k->bad++;
        } else if (fake_arity(r) != 2 || !fake_is_atom(el(r, 0), "ok")) {
            k->bad++;
        }
        if (fake_mailbox_len(k->p) != 0)
            k->bad++;
        fake_gc(k->p);
    }
    return NULL;
}

/* Callers on several threads share one server: each call one reply, no
 * add lost. */
static void test_nif_calls_from_many_threads(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h = start_pool(o, "shared", 2, 4);
    caller_t k[4];
    long total = 0;
    (void)state;
    assert_term(sup_start(o, h, sup_flags(o, "one_for_one", 3, 5),
                          list1(o, counter(o, A("ctr"), 0))),
                "ok");
    for (int i = 0; i < 4; i++) {
        memset(&k[i], 0, sizeof k[i]);
        k[i].p = fake_spawn();
        k[i].n = iters(1000);
        total += k[i].n;
        assert_int_equal(pthread_create(&k[i].tid, NULL, call_many, &k[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(k[i].tid, NULL), 0);
        assert_int_equal(k[i].bad, 0);
    }
    assert_term(srv_call(c, "shared", A("ctr"), A("get"), -1),
                S(tup2(c, A("ok"), I(c, total))));
    close_pool(o, h);
    fake_proc_t *all[] = {o, c, k[0].p, k[1].p, k[2].p, k[3].p};
    assert_int_equal(settle(all, 6), 0);
}

/* ------------------------------------------------------- C-node pools */

/* The test plays a C-node pool's owner, process `o`, and the C-node
 * behind its port: it reads the frames the NIF sends to the port with ei
 * and answers with frames it encodes with ei, passed to cnode_deliver as
 * the owner would pass the port's packets (doc/cnode.md). */
typedef struct {
    fake_proc_t *o;
    int port;
    ERL_NIF_TERM h; /* on o's heap: o is never collected while it is used */
    const char *name;
} cnode_t;

/* The tasks the C-node lists: `fail`, of the demo library, is not one. */
static ERL_NIF_TERM cnode_pool_new(fake_proc_t *o, ERL_NIF_TERM port,
                                   const char *name, unsigned size,
                                   unsigned max_queue) {
    return fake_call(o, "cnode_pool_new", 6, A(name), I(o, size),
                     I(o, max_queue), port,
                     enif_make_list2(fake_env(o), A("echo"), A("sleep")),
                     nil(o));
}

/* A C-node pool owned by a new process, over a port connected to it. */
static cnode_t cnode_start(const char *name, unsigned size,
                           unsigned max_queue) {
    cnode_t k = {fake_spawn(), 0, 0, name};
    ERL_NIF_TERM port = fake_port(k.o, &k.port),
                 r = cnode_pool_new(k.o, port, name, size, max_queue);
    if (fake_arity(r) != 2 || !fake_is_atom(el(r, 0), "ok"))
        fail_msg("cnode_pool_new: %s", S(r));
    assert_true(fake_is_resource(el(r, 1), "moat_pool"));
    k.h = el(r, 1);
    return k;
}

/* The tag of task {Ref, {Pool, N}}: N, the core's id. */
static uint64_t tag_of(ERL_NIF_TERM task) {
    long n;
    assert_true(fake_get_long(el(el(task, 1), 1), &n));
    return (uint64_t)n;
}

/* Takes the next frame sent to the C-node, waiting for it. */
static void take_frame(cnode_t *k, fake_frame_t *f) {
    size_t len;
    unsigned char *pkt = fake_port_take(k->port, &len, RECV_MS);
    int rc;
    if (pkt == NULL)
        fail_msg("no frame within %d ms", RECV_MS);
    rc = fake_frame_parse(pkt, len, f);
    free(pkt);
    if (rc != 0)
        fail_msg("a packet of %zu bytes that is no frame: %s", len, f->text);
}

/* Takes the next frame and checks its text (printf's format). */
static void assert_frame(cnode_t *k, const char *fmt, ...) {
    static fake_frame_t f;
    char want[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(want, sizeof want, fmt, ap);
    va_end(ap);
    take_frame(k, &f);
    assert_string_equal(f.text, want);
}

static void assert_no_frame(cnode_t *k) {
    static fake_frame_t f;
    size_t len;
    unsigned char *pkt = fake_port_take(k->port, &len, 0);
    if (pkt != NULL) {
        fake_frame_parse(pkt, len, &f);
        free(pkt);
        fail_msg("unexpected frame %s", f.text);
    }
}

/* cnode_deliver(Handle, Frame), on behalf of the owner. */
static ERL_NIF_TERM deliver_bytes(cnode_t *k, const void *frame, size_t len) {
    ERL_NIF_TERM b;
    memcpy(enif_make_new_binary(fake_env(k->o), len, &b), frame, len);
    return fake_call(k->o, "cnode_deliver", 2, k->h, b);
}

/* deliver_bytes of a frame fake_cnode.c made, which it frees. */
static ERL_NIF_TERM deliver_made(cnode_t *k, unsigned char *frame,
                                 size_t len) {
    ERL_NIF_TERM r = deliver_bytes(k, frame, len);
    free(frame);
    return r;
}

/* Delivers the frame written in ei_x_format's syntax (after printf's). */
static ERL_NIF_TERM deliver(cnode_t *k, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static ERL_NIF_TERM deliver(cnode_t *k, const char *fmt, ...) {
    char text[4096];
    unsigned char *frame;
    size_t len;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if ((frame = fake_frame_format(&len, "%s", text)) == NULL)
        fail_msg("ei cannot encode %s", text);
    return deliver_made(k, frame, len);
}

/* The C-node's answer to a run or runs frame whose tasks all echo their
 * first argument: one done frame. */
static ERL_NIF_TERM answer_echo(cnode_t *k, const fake_frame_t *f) {
    size_t len;
    unsigned char *frame = fake_frame_echo(f, &len);
    return deliver_made(k, frame, len);
}

/* The owner's side of the outbox, as moat_pool does it: on each
 * {moat_cnode_out, Pool}, cnode_flush; until n cancel frames came, each
 * with `reason` for one of tags[0..n), once.  However the notices fall,
 * the port is empty until each flush: those cancels waited. */
static void flush_cancels(cnode_t *k, const uint64_t *tags, int n,
                          const char *reason) {
    char *seen = calloc((size_t)n, 1), want[64];
    fake_frame_t *f = malloc(sizeof *f);
    snprintf(want, sizeof want, "{moat_cnode_out,%s}", k->name);
    for (int got = 0; got < n;) {
        assert_term(recv(k->o), want);
        assert_int_equal(fake_port_len(k->port), 0); /* they waited */
        assert_term(fake_call(k->o, "cnode_flush", 1, k->h), "ok");
        assert_true(fake_port_len(k->port) > 0);
        while (fake_port_len(k->port) > 0) {
            int i;
            take_frame(k, f);
            assert_string_equal(f->what, "cancel");
            assert_string_equal(f->reason, reason);
            for (i = 0; i < n && tags[i] != f->tag[0]; i++)
                ;
            if (i == n || seen[i])
                fail_msg("a cancel for no task awaited: %s", f->text);
            seen[i] = 1;
            got++;
        }
    }
    free(f);
    free(seen);
}

static void close_cnode(cnode_t *k) {
    assert_term(fake_call(k->o, "pool_close", 1, k->h), "ok");
}

static void test_nif_cnode_pool_new_and_refusals(void **state) {
    cnode_t k = cnode_start("cn_new", 2, 4);
    fake_proc_t *o2 = fake_spawn(), *q = fake_spawn(), *n = fake_spawn();
    ErlNifEnv *e = fake_env(o2);
    ErlNifPid op = fake_pid(k.o);
    ERL_NIF_TERM port, nh;
    int id;
    (void)state;
    assert_same(fake_call(q, "pool_owner", 1, A("cn_new")),
                enif_make_pid(NULL, &op));
    assert_int_equal(stat_of("cn_new", "size"), 2);
    assert_int_equal(stat_of("cn_new", "threads"), 0); /* bodies run away */
    port = fake_port(o2, &id);
    assert_same(cnode_pool_new(o2, port, "cn_new", 1, 1),
                enif_make_tuple2(e, A("error"),
                                 enif_make_tuple2(e, A("already_started"),
                                                  enif_make_pid(e, &op))));
    /* Bad arguments raise badarg: no port, a zero size, a task that is
     * no atom. */
    assert_badarg(o2, cnode_pool_new(o2, A("port"), "cn_bad", 1, 1));
    assert_badarg(o2, cnode_pool_new(o2, port, "cn_bad", 0, 1));
    assert_badarg(o2, fake_call(o2, "cnode_pool_new", 6, A("cn_bad"),
                                I(o2, 1), I(o2, 1), port,
                                enif_make_list2(e, A("echo"), I(o2, 7)),
                                nil(o2)));
    assert_term(fake_call(o2, "pool_owner", 1, A("cn_bad")), "undefined");
    /* The cnode_* calls take a C-node pool's handle, and a binary. */
    nh = start_pool(n, "cn_nif", 1, 1);
    assert_badarg(n, fake_call(n, "cnode_deliver", 2, nh, bin(n, "x")));
    assert_badarg(n, fake_call(n, "cnode_flush", 1, nh));
    assert_badarg(n, fake_call(n, "cnode_lost", 2, nh, cnode_down(n)));
    assert_badarg(k.o, fake_call(k.o, "cnode_deliver", 2, k.h, A("frame")));
    close_pool(n, nh);
    close_cnode(&k);
    assert_term(fake_call(q, "pool_owner", 1, A("cn_new")), "undefined");
    assert_no_frame(&k);
    assert_int_equal(fake_port_len(id), 0);
    fake_proc_t *all[] = {k.o, o2, q, n};
    assert_int_equal(settle(all, 4), 0);
}

/* A task's run frame goes to the port from the caller's own call; its
 * outcome comes when the owner hands the NIF the C-node's done frame. */
static void test_nif_cnode_run_frame_and_outcome(void **state) {
    cnode_t k = cnode_start("cn_run", 2, 4);
    fake_proc_t *c = fake_spawn();
    ErlNifEnv *e = fake_env(c);
    ERL_NIF_TERM t, v;
    fake_frame_t *f = malloc(sizeof *f);
    (void)state;
    t = async1(c, "cn_run", "echo", A("x"), -1);
    assert_term(el(el(t, 1), 0), "cn_run");
    assert_frame(&k, "{run, %llu, echo, [x]}", (unsigned long long)tag_of(t));
    assert_no_frame(&k);
    assert_no_message(c);
    assert_term(deliver(&k, "{done,[{%llu,ok,x}]}",
                        (unsigned long long)tag_of(t)),
                "ok");
    /* Sent in the owner's call: in the caller's mailbox on return. */
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, t), "x");
    /* Any term goes there and back. */
    v = enif_make_tuple3(e, A("hello"), I(c, -42),
                         enif_make_list2(e, bin(c, "two"),
                                         I(c, (long)1 << 62)));
    t = async1(c, "cn_run", "echo", v, -1);
    take_frame(&k, f);
    assert_string_equal(f->what, "run");
    assert_int_equal(f->n, 1);
    assert_true(f->tag[0] == tag_of(t));
    assert_string_equal(f->task[0], "echo");
    assert_term(answer_echo(&k, f), "ok");
    assert_same(await(c, t), v);
    assert_int_equal(stat_of("cn_run", "completed"), 2);
    close_cnode(&k);
    assert_no_frame(&k);
    free(f);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* An exit in the C-node is the caller's DOWN with that reason, and its
 * proxy's. */
static void test_nif_cnode_exit_outcome_is_down(void **state) {
    cnode_t k = cnode_start("cn_exit", 2, 4);
    fake_proc_t *c = fake_spawn(), *px = fake_spawn();
    ErlNifPid pp = fake_pid(px);
    ERL_NIF_TERM t;
    fake_frame_t *f = malloc(sizeof *f);
    (void)state;
    t = async1(c, "cn_exit", "sleep", I(c, 5), -1);
    assert_frame(&k, "{run, %llu, sleep, [5]}", (unsigned long long)tag_of(t));
    assert_term(deliver(&k, "{done,[{%llu,exit,{my,reason}}]}",
                        (unsigned long long)tag_of(t)),
                "ok");
    assert_term(await(c, t), "{DOWN,{my,reason}}");
    t = fake_call(c, "async", 5, A("cn_exit"), A("echo"), list1(c, A("y")),
                  A("infinity"), enif_make_pid(NULL, &pp));
    assert_same(el(t, 1), enif_make_pid(NULL, &pp));
    take_frame(&k, f);
    assert_term(deliver(&k, "{done,[{%llu,exit,badarg}]}",
                        (unsigned long long)f->tag[0]),
                "ok");
    free(f);
    assert_term(await(c, t), "{DOWN,badarg}");
    assert_term(recv(px), "{moat_task_done,badarg}");
    assert_int_equal(stat_of("cn_exit", "failed"), 2);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c, px};
    assert_int_equal(settle(all, 3), 0);
}

/* run/4 cannot be answered on the spot: {wait, Ref}, then the message. */
static void test_nif_cnode_run_waits_for_the_message(void **state) {
    cnode_t k = cnode_start("cn_wait", 1, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM r, m;
    fake_frame_t *f = malloc(sizeof *f);
    (void)state;
    r = run1(c, "cn_wait", "echo", A("x"), -1);
    assert_int_equal(fake_arity(r), 2);
    assert_term(el(r, 0), "wait");
    take_frame(&k, f);
    assert_string_equal(f->what, "run");
    assert_string_equal(f->task[0], "echo");
    assert_no_message(c);
    assert_term(answer_echo(&k, f), "ok");
    m = recv(c);
    assert_same(el(m, 0), el(r, 1));
    assert_term(el(m, 1), "x");
    /* A failure is a DOWN naming the task {Pool, Tag}. */
    r = run1(c, "cn_wait", "sleep", I(c, 1), -1);
    assert_term(el(r, 0), "wait");
    take_frame(&k, f);
    assert_term(deliver(&k, "{done,[{%llu,exit,oops}]}",
                        (unsigned long long)f->tag[0]),
                "ok");
    m = recv(c);
    assert_int_equal(fake_arity(m), 5);
    assert_term(el(m, 0), "DOWN");
    assert_same(el(m, 1), el(r, 1));
    assert_same(el(m, 3), enif_make_tuple2(fake_env(c), A("cn_wait"),
                                           I(c, (long)f->tag[0])));
    assert_term(el(m, 4), "oops");
    free(f);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A task the C-node did not list is refused in the caller's call, and
 * nothing goes to the port. */
static void test_nif_cnode_unknown_task_is_refused(void **state) {
    cnode_t k = cnode_start("cn_unknown", 1, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t, s;
    (void)state;
    t = async1(c, "cn_unknown", "fail", A("x"), -1);
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, t), "{DOWN,{unknown_task,fail}}");
    assert_term(run1(c, "cn_unknown", "fail", A("x"), -1),
                "{exit,{unknown_task,fail}}");
    s = fake_call(c, "stream_new", 4, A("cn_unknown"), A("fail"),
                  A("infinity"), I(c, 4));
    assert_term(fake_call(c, "stream_submit", 3, s, list1(c, I(c, 1)), I(c, 0)),
                "[{0,exit,{unknown_task,fail}}]");
    assert_term(fake_call(c, "stream_close", 1, s), "false");
    assert_no_frame(&k);
    assert_int_equal(stat_of("cn_unknown", "rejected"), 0);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* Admission is the VM's: size + max_queue tasks in flight, then
 * overloaded, with no frame sent. */
static void test_nif_cnode_overloaded(void **state) {
    cnode_t k = cnode_start("cn_full", 1, 2);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t[3], r;
    uint64_t tags[2];
    (void)state;
    for (int i = 0; i < 3; i++) {
        t[i] = async1(c, "cn_full", "sleep", I(c, 100000), -1);
        assert_frame(&k, "{run, %llu, sleep, [100000]}",
                     (unsigned long long)tag_of(t[i]));
    }
    r = async1(c, "cn_full", "echo", A("x"), -1);
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, r), "{DOWN,overloaded}");
    assert_term(run1(c, "cn_full", "echo", A("x"), -1), "{exit,overloaded}");
    assert_no_frame(&k);
    assert_int_equal(stat_of("cn_full", "rejected"), 2);
    /* An outcome frees a place. */
    assert_term(deliver(&k, "{done,[{%llu,ok,ok}]}",
                        (unsigned long long)tag_of(t[0])),
                "ok");
    assert_term(await(c, t[0]), "ok");
    r = async1(c, "cn_full", "echo", A("x"), -1);
    assert_frame(&k, "{run, %llu, echo, [x]}", (unsigned long long)tag_of(r));
    assert_term(deliver(&k, "{done,[{%llu,ok,x}]}",
                        (unsigned long long)tag_of(r)),
                "ok");
    assert_term(await(c, r), "x");
    /* Closing settles the rest; their cancels wait for the owner. */
    close_cnode(&k);
    ERL_NIF_TERM rest[] = {t[1], t[2]};
    await_all(c, rest, 2, "{DOWN,shutdown}");
    tags[0] = tag_of(t[1]);
    tags[1] = tag_of(t[2]);
    flush_cancels(&k, tags, 2, "shutdown");
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A report for a tag the VM no longer holds (settled, or never sent) is
 * dropped: no message, no crash, the pool carries on. */
static void test_nif_cnode_stale_reports_are_dropped(void **state) {
    cnode_t k = cnode_start("cn_stale", 1, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t;
    unsigned long long tag;
    (void)state;
    t = async1(c, "cn_stale", "echo", A("x"), -1);
    tag = tag_of(t);
    assert_frame(&k, "{run, %llu, echo, [x]}", tag);
    assert_term(deliver(&k, "{done,[{%llu,ok,x}]}", tag), "ok");
    assert_term(await(c, t), "x");
    assert_term(deliver(&k, "{done,[{%llu,ok,x}]}", tag), "ok");
    assert_term(deliver(&k, "{done,[{%llu,exit,late}]}", tag), "ok");
    assert_term(deliver(&k, "{stopped,[%llu]}", tag), "ok");
    assert_term(deliver(&k, "{done,[{999999,ok,x},{0,exit,y}]}"), "ok");
    assert_term(deliver(&k, "{stopped,[999999,0]}"), "ok");
    assert_term(deliver(&k, "{done,[]}"), "ok");
    assert_term(deliver(&k, "{stopped,[]}"), "ok");
    assert_no_message(c);
    assert_no_message(k.o);
    assert_int_equal(stat_of("cn_stale", "completed"), 1);
    assert_int_equal(stat_of("cn_stale", "failed"), 0);
    assert_int_equal(stat_of("cn_stale", "running"), 0);
    t = async1(c, "cn_stale", "echo", A("again"), -1);
    assert_frame(&k, "{run, %llu, echo, [again]}",
                 (unsigned long long)tag_of(t));
    assert_term(deliver(&k, "{done,[{%llu,ok,again}]}",
                        (unsigned long long)tag_of(t)),
                "ok");
    assert_term(await(c, t), "again");
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A cancel decided in the caller's own call goes to the port at once;
 * the body counts as running (abandoned) until the C-node reports it
 * ended, and whatever it reports is dropped. */
static void test_nif_cnode_cancel_goes_to_the_port(void **state) {
    cnode_t k = cnode_start("cn_cancel", 2, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM a, b;
    unsigned long long ta, tb;
    uint64_t tags[1];
    unsigned char *frame;
    size_t len;
    (void)state;
    a = async1(c, "cn_cancel", "sleep", I(c, 100000), -1);
    b = async1(c, "cn_cancel", "sleep", I(c, 100000), -1);
    ta = tag_of(a);
    tb = tag_of(b);
    assert_frame(&k, "{run, %llu, sleep, [100000]}", ta);
    assert_frame(&k, "{run, %llu, sleep, [100000]}", tb);
    assert_term(fake_call(c, "task_cancel", 2, el(a, 0), A("shutdown")),
                "cancelled");
    assert_int_equal(fake_port_len(k.port), 1);
    assert_frame(&k, "{cancel, %llu, shutdown}", ta);
    assert_term(fake_call(c, "task_running", 1, el(a, 0)), "true");
    assert_int_equal(stat_of("cn_cancel", "abandoned"), 1);
    /* The body finished before the cancel reached it: dropped. */
    assert_term(deliver(&k, "{done,[{%llu,ok,ok}]}", ta), "ok");
    assert_term(fake_call(c, "task_running", 1, el(a, 0)), "false");
    assert_term(fake_call(c, "task_cancel", 2, el(a, 0), A("shutdown")),
                "delivered");
    /* task_kill on a task whose body has stopped: nothing to tell. */
    assert_term(fake_call(c, "task_kill", 1, el(a, 0)), "ok");
    assert_no_frame(&k);
    assert_term(fake_call(c, "task_cancel", 2, el(b, 0), A("shutdown")),
                "cancelled");
    assert_frame(&k, "{cancel, %llu, shutdown}", tb);
    /* shutdown/2's timeout passed with the body still on: `killed`
     * follows (a real kill in process isolation). */
    assert_term(fake_call(c, "task_kill", 1, el(b, 0)), "ok");
    assert_frame(&k, "{cancel, %llu, killed}", tb);
    assert_term(fake_call(c, "task_running", 1, el(b, 0)), "true");
    /* The C-node stops it; ei writes a list of bytes as a string. */
    assert_true(tb < 256);
    tags[0] = tb;
    frame = fake_frame_stopped_bytes(tags, 1, &len);
    assert_term(deliver_made(&k, frame, len), "ok");
    assert_term(fake_call(c, "task_running", 1, el(b, 0)), "false");
    assert_int_equal(stat_of("cn_cancel", "abandoned"), 0);
    assert_int_equal(stat_of("cn_cancel", "cancelled"), 2);
    assert_int_equal(stat_of("cn_cancel", "running"), 0);
    assert_no_message(c);
    assert_no_message(k.o); /* nothing waited in the outbox */
    assert_no_frame(&k);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A deadline is decided on the pool's timer thread: the caller gets its
 * DOWN at once, and the cancel waits in the outbox until the owner,
 * told with {moat_cnode_out, Pool}, flushes it. */
static void test_nif_cnode_deadline_goes_through_the_outbox(void **state) {
    cnode_t k = cnode_start("cn_deadline", 2, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t[2];
    uint64_t tags[2];
    (void)state;
    t[0] = async1(c, "cn_deadline", "sleep", I(c, 100000), 5);
    t[1] = async1(c, "cn_deadline", "sleep", I(c, 100000), 10);
    for (int i = 0; i < 2; i++) {
        tags[i] = tag_of(t[i]);
        assert_frame(&k, "{run, %llu, sleep, [100000]}",
                     (unsigned long long)tags[i]);
    }
    await_all(c, t, 2, "{DOWN,timeout}");
    flush_cancels(&k, tags, 2, "timeout");
    assert_int_equal(stat_of("cn_deadline", "abandoned"), 2);
    assert_term(deliver(&k, "{stopped,[%llu,%llu]}",
                        (unsigned long long)tags[0],
                        (unsigned long long)tags[1]),
                "ok");
    assert_int_equal(stat_of("cn_deadline", "abandoned"), 0);
    assert_int_equal(stat_of("cn_deadline", "timeouts"), 2);
    assert_no_message(k.o);
    assert_no_frame(&k);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A caller's death cancels its tasks on the janitor, and a linked
 * proxy's death kills its task there: both through the outbox. */
static void
test_nif_cnode_dead_callers_cancel_through_the_outbox(void **state) {
    cnode_t k = cnode_start("cn_dead", 4, 4);
    fake_proc_t *c = fake_spawn(), *d = fake_spawn(), *px = fake_spawn();
    ErlNifPid pp = fake_pid(px);
    ERL_NIF_TERM t[2], l;
    uint64_t tags[2];
    fake_frame_t *f = malloc(sizeof *f);
    (void)state;
    for (int i = 0; i < 2; i++) {
        t[i] = async1(c, "cn_dead", "sleep", I(c, 100000), -1);
        tags[i] = tag_of(t[i]);
        assert_frame(&k, "{run, %llu, sleep, [100000]}",
                     (unsigned long long)tags[i]);
    }
    fake_exit(c);
    flush_cancels(&k, tags, 2, "shutdown");
    assert_int_equal(stat_of("cn_dead", "cancelled"), 2);
    assert_term(deliver(&k, "{stopped,[%llu,%llu]}",
                        (unsigned long long)tags[0],
                        (unsigned long long)tags[1]),
                "ok");
    l = fake_call(d, "async", 5, A("cn_dead"), A("sleep"),
                  list1(d, I(d, 100000)), A("infinity"),
                  enif_make_pid(NULL, &pp));
    take_frame(&k, f);
    tags[0] = f->tag[0];
    fake_exit(px);
    assert_term(await(d, l), "{DOWN,killed}");
    flush_cancels(&k, tags, 1, "killed");
    assert_term(deliver(&k, "{stopped,[%llu]}", (unsigned long long)tags[0]),
                "ok");
    assert_int_equal(stat_of("cn_dead", "abandoned"), 0);
    assert_int_equal(stat_of("cn_dead", "running"), 0);
    free(f);
    close_cnode(&k);
    assert_no_frame(&k);
    fake_proc_t *all[] = {k.o, d};
    assert_int_equal(settle(all, 2), 0);
}

/* When the C-node is lost every task in flight ends with
 * {native_crash, cnode_down}, and the pool takes no more. */
static void test_nif_cnode_lost_ends_every_task(void **state) {
    cnode_t k = cnode_start("cn_lost", 2, 8);
    fake_proc_t *c = fake_spawn();
    ErlNifEnv *e = fake_env(c);
    consumer_t s = {c, 0, 4, 0, 0, 2};
    ERL_NIF_TERM t, r, l, x;
    int downs = 0, noticed = 0;
    unsigned n;
    fake_frame_t *f = malloc(sizeof *f);
    (void)state;
    t = async1(c, "cn_lost", "sleep", I(c, 100000), -1);
    r = run1(c, "cn_lost", "sleep", I(c, 100000), -1);
    assert_term(el(r, 0), "wait");
    s.s = fake_call(c, "stream_new", 4, A("cn_lost"), A("sleep"),
                    A("infinity"), I(c, 4));
    assert_term(top_up(&s), "[]");
    for (int i = 0; i < 3; i++)
        take_frame(&k, f);
    assert_string_equal(f->what, "runs");
    assert_term(fake_call(k.o, "cnode_lost", 2, k.h, cnode_down(k.o)), "ok");
    assert_no_frame(&k); /* nothing to cancel: the C-node is gone */
    /* Decided in the owner's call, in no particular order: two DOWNs and
     * the stream's notice are in the caller's mailbox. */
    assert_int_equal(fake_mailbox_len(c), 3);
    for (int i = 0; i < 3; i++) {
        ERL_NIF_TERM m = recv(c);
        if (fake_arity(m) == 2) {
            assert_term(el(m, 0), "moat_stream");
            assert_same(el(m, 1), s.s);
            noticed++;
            continue;
        }
        assert_int_equal(fake_arity(m), 5);
        assert_term(el(m, 4), "{native_crash,cnode_down}");
        if (enif_is_identical(el(m, 1), el(t, 0)))
            assert_same(el(m, 3), el(t, 1));
        else
            assert_same(el(m, 1), el(r, 1));
        downs++;
    }
    assert_int_equal(downs, 2);
    assert_int_equal(noticed, 1);
    l = fake_call(c, "stream_take", 3, s.s, A("true"), A("false"));
    assert_true(enif_get_list_length(e, l, &n));
    assert_int_equal(n, 2);
    for (int i = 0; enif_get_list_cell(e, l, &x, &l); i++) {
        long idx;
        assert_true(fake_get_long(el(x, 0), &idx) && (idx == 0 || idx == 1));
        assert_term(el(x, 1), "exit");
        assert_term(el(x, 2), "{native_crash,cnode_down}");
    }
    assert_term(fake_call(c, "stream_close", 1, s.s), "false");
    /* Unregistered: noproc from now on. */
    t = async1(c, "cn_lost", "echo", A("x"), -1);
    assert_term(await(c, t), "{DOWN,noproc}");
    assert_term(fake_call(c, "pool_owner", 1, A("cn_lost")), "undefined");
    assert_term(fake_call(c, "pool_stats", 1, A("cn_lost")),
                "{error,not_found}");
    /* A report from the dead C-node's last words is dropped. */
    assert_term(deliver(&k, "{done,[{%llu,ok,x}]}",
                        (unsigned long long)f->tag[0]),
                "ok");
    assert_term(fake_call(k.o, "cnode_lost", 2, k.h, cnode_down(k.o)), "ok"); /* again */
    free(f);
    close_cnode(&k);
    assert_no_frame(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* Nothing in a packet is trusted: garbage, a cut term or a bad entry is
 * {error, bad_frame} (the entries before the fault are handled), and a
 * well-formed frame that is not done or stopped comes back decoded. */
static void test_nif_cnode_malformed_frames(void **state) {
    cnode_t k = cnode_start("cn_garbage", 4, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t[3];
    unsigned long long g[3];
    unsigned char *frame, *longer;
    size_t len;
    (void)state;
    for (int i = 0; i < 3; i++) {
        t[i] = async1(c, "cn_garbage", "echo", I(c, i), -1);
        g[i] = tag_of(t[i]);
        assert_frame(&k, "{run, %llu, echo, [%d]}", g[i], i);
    }
    assert_term(deliver_bytes(&k, "hello", 5), "{error,bad_frame}");
    assert_term(deliver_bytes(&k, "", 0), "{error,bad_frame}");
    assert_term(deliver_bytes(&k, "\x83", 1), "{error,bad_frame}");
    /* A done frame cut short: nothing of it is read. */
    frame = fake_frame_format(&len, "{done,[{%llu,ok,0}]}", g[0]);
    assert_non_null(frame);
    assert_term(deliver_bytes(&k, frame, len - 1), "{error,bad_frame}");
    /* ... and with a byte too many. */
    longer = malloc(len + 1);
    memcpy(longer, frame, len);
    longer[len] = 'j';
    assert_term(deliver_made(&k, longer, len + 1), "{error,bad_frame}");
    free(frame);
    assert_no_message(c);
    /* The first entry is handled, the second is bad: the third waits. */
    assert_term(deliver(&k, "{done,[{%llu,ok,0},{%llu,maybe,1},{%llu,ok,2}]}",
                        g[0], g[1], g[2]),
                "{error,bad_frame}");
    assert_int_equal(fake_mailbox_len(c), 1);
    assert_term(await(c, t[0]), "0");
    assert_term(deliver(&k, "{done,[{%llu,ok}]}", g[1]), "{error,bad_frame}");
    assert_term(deliver(&k, "{done,[{-1,ok,x}]}"), "{error,bad_frame}");
    assert_term(deliver(&k, "{done,[{%llu,ok,1}]}", g[1]), "ok");
    assert_term(await(c, t[1]), "1");
    assert_term(deliver(&k, "{done,[x]}"), "{error,bad_frame}");
    assert_term(deliver(&k, "{done,x}"), "{error,bad_frame}");
    assert_term(deliver(&k, "{done,[{x,ok,1}]}"), "{error,bad_frame}");
    assert_term(deliver(&k, "{stopped,[x]}"), "{error,bad_frame}");
    assert_term(deliver(&k, "{stopped,[-1]}"), "{error,bad_frame}");
    assert_term(deliver(&k, "{stopped,x}"), "{error,bad_frame}");
    assert_no_message(c);
    assert_int_equal(stat_of("cn_garbage", "running"), 1);
    /* Other frames are the owner's. */
    assert_term(deliver(&k, "{log,info,\"hi\"}"),
                "{other,{log,info,[104,105]}}");
    assert_term(deliver(&k, "{ready,4242,[echo,sleep]}"),
                "{other,{ready,4242,[echo,sleep]}}");
    assert_term(deliver(&k, "{done,[],extra}"), "{other,{done,[],extra}}");
    assert_term(deliver(&k, "hello"), "{other,hello}");
    assert_term(deliver(&k, "{error,{bad_hello,x}}"),
                "{other,{error,{bad_hello,x}}}");
    assert_no_message(c);
    assert_no_message(k.o);
    assert_term(deliver(&k, "{done,[{%llu,ok,2}]}", g[2]), "ok");
    assert_term(await(c, t[2]), "2");
    assert_no_frame(&k);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A stream's batch goes out as one runs frame (one task: a run frame),
 * and its outcomes reach stream_take; closing it cancels at once what is
 * in flight. */
static void test_nif_cnode_stream(void **state) {
    cnode_t k = cnode_start("cn_stream", 2, 16);
    fake_proc_t *c = fake_spawn();
    ErlNifEnv *e = fake_env(c);
    consumer_t s = {c, 0, 8, 0, 0, 8};
    fake_frame_t *f = malloc(sizeof *f);
    ERL_NIF_TERM l, x;
    char want[256], seen[3] = {0};
    (void)state;
    s.s = fake_call(c, "stream_new", 4, A("cn_stream"), A("echo"),
                    A("infinity"), I(c, s.max));
    l = enif_make_list3(e, A("a"), A("b"), A("c"));
    assert_term(fake_call(c, "stream_submit", 3, s.s, l, I(c, 0)), "[]");
    s.inflight = 3;
    take_frame(&k, f);
    assert_no_frame(&k);
    assert_int_equal(f->n, 3);
    snprintf(want, sizeof want,
             "{runs, [{%llu, echo, [a]}, {%llu, echo, [b]}, "
             "{%llu, echo, [c]}]}",
             (unsigned long long)f->tag[0], (unsigned long long)f->tag[1],
             (unsigned long long)f->tag[2]);
    assert_string_equal(f->text, want);
    assert_true(f->tag[0] != f->tag[1] && f->tag[1] != f->tag[2] &&
                f->tag[0] != f->tag[2]);
    /* Outcomes in any order, over two frames. */
    assert_term(deliver(&k, "{done,[{%llu,ok,c},{%llu,exit,oops}]}",
                        (unsigned long long)f->tag[2],
                        (unsigned long long)f->tag[0]),
                "ok");
    assert_term(deliver(&k, "{done,[{%llu,ok,b}]}",
                        (unsigned long long)f->tag[1]),
                "ok");
    while (s.inflight > 0) {
        for (l = take(&s); enif_get_list_cell(e, l, &x, &l); s.inflight--) {
            long idx;
            assert_true(fake_get_long(el(x, 0), &idx) && idx >= 0 && idx < 3);
            assert_false(seen[idx]);
            seen[idx] = 1;
            assert_term(x, idx == 0   ? "{0,exit,oops}"
                           : idx == 1 ? "{1,ok,b}"
                                      : "{2,ok,c}");
        }
    }
    assert_term(fake_call(c, "stream_submit", 3, s.s, list1(c, A("d")),
                          I(c, 3)),
                "[]");
    take_frame(&k, f);
    snprintf(want, sizeof want, "{run, %llu, echo, [d]}",
             (unsigned long long)f->tag[0]);
    assert_string_equal(f->text, want);
    close_stream(&s);
    assert_frame(&k, "{cancel, %llu, shutdown}", (unsigned long long)f->tag[0]);
    assert_term(deliver(&k, "{stopped,[%llu]}", (unsigned long long)f->tag[0]),
                "ok");
    assert_int_equal(stat_of("cn_stream", "abandoned"), 0);
    assert_no_message(k.o);
    free(f);
    close_cnode(&k);
    assert_no_frame(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* pool_close settles every task in flight with shutdown, in its call;
 * the C-node hears of them through the outbox. */
static void test_nif_cnode_pool_close_settles_with_shutdown(void **state) {
    cnode_t k = cnode_start("cn_close", 2, 8);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t[3], r;
    uint64_t tags[3];
    (void)state;
    for (int i = 0; i < 3; i++) {
        t[i] = async1(c, "cn_close", "sleep", I(c, 100000), -1);
        tags[i] = tag_of(t[i]);
        assert_frame(&k, "{run, %llu, sleep, [100000]}",
                     (unsigned long long)tags[i]);
    }
    close_cnode(&k);
    assert_int_equal(fake_mailbox_len(c), 3);
    await_all(c, t, 3, "{DOWN,shutdown}");
    flush_cancels(&k, tags, 3, "shutdown");
    r = async1(c, "cn_close", "echo", A("late"), -1);
    assert_term(await(c, r), "{DOWN,noproc}");
    assert_term(deliver(&k, "{done,[{%llu,ok,ok}]}",
                        (unsigned long long)tags[0]),
                "ok");
    assert_term(deliver(&k, "{stopped,[%llu,%llu]}",
                        (unsigned long long)tags[1],
                        (unsigned long long)tags[2]),
                "ok");
    assert_no_frame(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* The C-node runs `size` at a time: pool_stats shows the rest as queued. */
static void test_nif_cnode_pool_stats_split(void **state) {
    cnode_t k = cnode_start("cn_stats", 2, 8);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t[5];
    (void)state;
    assert_int_equal(stat_of("cn_stats", "running"), 0);
    assert_int_equal(stat_of("cn_stats", "queued"), 0);
    t[0] = async1(c, "cn_stats", "sleep", I(c, 100000), -1);
    assert_int_equal(stat_of("cn_stats", "running"), 1);
    assert_int_equal(stat_of("cn_stats", "queued"), 0);
    for (int i = 1; i < 5; i++)
        t[i] = async1(c, "cn_stats", "sleep", I(c, 100000), -1);
    assert_int_equal(stat_of("cn_stats", "running"), 2);
    assert_int_equal(stat_of("cn_stats", "queued"), 3);
    for (int i = 0; i < 5; i++) {
        assert_frame(&k, "{run, %llu, sleep, [100000]}",
                     (unsigned long long)tag_of(t[i]));
        assert_term(deliver(&k, "{done,[{%llu,ok,ok}]}",
                            (unsigned long long)tag_of(t[i])),
                    "ok");
        assert_term(await(c, t[i]), "ok");
        assert_int_equal(stat_of("cn_stats", "running"), i < 3 ? 2 : 4 - i);
        assert_int_equal(stat_of("cn_stats", "queued"), i < 3 ? 2 - i : 0);
    }
    assert_int_equal(stat_of("cn_stats", "completed"), 5);
    assert_int_equal(stat_of("cn_stats", "size"), 2);
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* The owner's death closes the pool (its port closing with it): every
 * task in flight ends with shutdown. */
static void test_nif_cnode_owner_death_closes_the_pool(void **state) {
    cnode_t k = cnode_start("cn_orphan", 2, 8);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t[3];
    (void)state;
    for (int i = 0; i < 3; i++) {
        t[i] = async1(c, "cn_orphan", "sleep", I(c, 100000), -1);
        assert_frame(&k, "{run, %llu, sleep, [100000]}",
                     (unsigned long long)tag_of(t[i]));
    }
    fake_exit(k.o);
    assert_term(fake_call(c, "pool_owner", 1, A("cn_orphan")), "undefined");
    await_all(c, t, 3, "{DOWN,shutdown}");
    t[0] = async1(c, "cn_orphan", "echo", A("x"), -1);
    assert_term(await(c, t[0]), "{DOWN,noproc}");
    assert_no_frame(&k);
    fake_proc_t *all[] = {c};
    assert_int_equal(settle(all, 1), 0);
}


/* A port that closed under the pool (the C-node died, its exit not yet
 * seen by the owner) takes no frame: the task waits, and cnode_lost
 * ends it. */
static void test_nif_cnode_closed_port_waits_for_lost(void **state) {
    cnode_t k = cnode_start("cn_closed", 2, 4);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM t;
    (void)state;
    fake_port_close(k.port);
    t = async1(c, "cn_closed", "echo", A("x"), -1);
    assert_no_frame(&k);
    assert_no_message(c);
    assert_int_equal(stat_of("cn_closed", "running"), 1);
    assert_term(fake_call(k.o, "cnode_lost", 2, k.h, cnode_down(k.o)), "ok");
    assert_term(await(c, t), "{DOWN,{native_crash,cnode_down}}");
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* Callers on several threads submit to one C-node pool, some with
 * deadlines, some cancelling at once, while this thread plays the owner
 * and a C-node that answers in batches, honours cancels with stopped,
 * and flushes the outbox when told: every task has exactly one outcome,
 * and every tag the C-node held is reported once. */
typedef struct {
    pthread_t tid;
    fake_proc_t *p;
    int n;
    long ok, timeouts, cancelled, bad;
    atomic_int *finished;
} cn_caller_t;

static void *cn_call_many(void *arg) {
    cn_caller_t *s = arg;
    ErlNifEnv *e = fake_env(s->p);
    for (int i = 0; i < s->n; i++) {
        /* A third with a deadline of 0 or 1 ms. */
        ERL_NIF_TERM tmo = i % 3 ? A("infinity") : enif_make_long(e, i % 2),
                     t, m, r;
        t = fake_call(s->p, "async", 5, A("cn_race"), A("echo"),
                      enif_make_list1(e, enif_make_long(e, i)), tmo,
                      A("undefined"));
        if (fake_arity(t) != 2) {
            s->bad++;
            break;
        }
        if (i % 5 == 1) {
            jitter((unsigned)i);
            r = fake_call(s->p, "task_cancel", 2, el(t, 0), A("shutdown"));
            if (fake_is_atom(r, "cancelled")) {
                s->cancelled++;
                fake_gc(s->p);
                continue;
            }
        }
        if ((m = fake_recv(s->p, RECV_MS)) == 0) {
            s->bad++;
            break;
        }
        if (fake_arity(m) == 2 && enif_is_identical(el(m, 0), el(t, 0)) &&
            enif_is_identical(el(m, 1), enif_make_long(e, i)))
            s->ok++;
        else if (fake_arity(m) == 5 && enif_is_identical(el(m, 1), el(t, 0)) &&
                 fake_is_atom(el(m, 4), "timeout"))
            s->timeouts++;
        else
            s->bad++;
        fake_gc(s->p);
    }
    atomic_fetch_add(s->finished, 1);
    return NULL;
}

static void test_nif_cnode_callers_race_the_owner(void **state) {
    cnode_t k = cnode_start("cn_race", 4, 1024);
    cn_caller_t s[3];
    atomic_int finished = 0;
    fake_frame_t *f = malloc(sizeof *f), *held = malloc(sizeof *held);
    long frames = 0, cancels = 0, early = 0, total = 0;
    /* Tags are the pool's task ids, 1, 2, ...: which ones had their run
     * frame, to tell a cancel that came first (see
     * test_nif_cnode_cancel_follows_its_run_frame). */
    char *ran = calloc(3 * (size_t)iters(600) + 1, 1);
    (void)state;
    held->n = 0;
    for (int i = 0; i < 3; i++) {
        memset(&s[i], 0, sizeof s[i]);
        s[i].p = fake_spawn();
        s[i].n = iters(600);
        s[i].finished = &finished;
        assert_int_equal(pthread_create(&s[i].tid, NULL, cn_call_many, &s[i]),
                         0);
    }
    for (unsigned round = 0;; round++) {
        size_t len;
        unsigned char *pkt = fake_port_take(k.port, &len, 1);
        ERL_NIF_TERM m;
        if (pkt != NULL) {
            int rc = fake_frame_parse(pkt, len, f);
            free(pkt);
            if (rc != 0)
                fail_msg("no frame: %s", f->text);
            frames++;
            if (strcmp(f->what, "cancel") == 0) {
                /* Held: stop it.  Reported already: ignore it. */
                cancels++;
                if (f->tag[0] > 3 * (uint64_t)iters(600))
                    fail_msg("a cancel for tag %llu, never used",
                             (unsigned long long)f->tag[0]);
                early += !ran[f->tag[0]];
                for (int j = 0; j < held->n; j++) {
                    if (held->tag[j] == f->tag[0]) {
                        assert_term(deliver(&k, "{stopped,[%llu]}",
                                            (unsigned long long)f->tag[0]),
                                    "ok");
                        held->n--;
                        held->tag[j] = held->tag[held->n];
                        held->arg_len[j] = held->arg_len[held->n];
                        memcpy(held->arg[j], held->arg[held->n],
                               (size_t)held->arg_len[j]);
                        break;
                    }
                }
            } else {
                for (int j = 0; j < f->n; j++) {
                    if (held->n == FAKE_FRAME_TASKS ||
                        f->tag[j] > 3 * (uint64_t)iters(600) || ran[f->tag[j]])
                        fail_msg("run frame %s: a tag unexpected or sent "
                                 "twice, or too many held",
                                 f->text);
                    ran[f->tag[j]] = 1;
                    held->tag[held->n] = f->tag[j];
                    held->arg_len[held->n] = f->arg_len[j];
                    memcpy(held->arg[held->n], f->arg[j],
                           (size_t)f->arg_len[j]);
                    held->n++;
                }
            }
        }
        while ((m = fake_recv(k.o, 0)) != 0) {
            assert_term(m, "{moat_cnode_out,cn_race}");
            assert_term(fake_call(k.o, "cnode_flush", 1, k.h), "ok");
        }
        /* Answer in batches of 1 to 4, or all when nothing came. */
        if (held->n > (int)(round % 4) || (pkt == NULL && held->n > 0)) {
            total += held->n;
            assert_term(answer_echo(&k, held), "ok");
            held->n = 0;
        }
        if (atomic_load(&finished) == 3 && held->n == 0 && pkt == NULL &&
            fake_mailbox_len(k.o) == 0)
            break;
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pthread_join(s[i].tid, NULL), 0);
        assert_int_equal(s[i].bad, 0);
        assert_int_equal(s[i].ok + s[i].timeouts + s[i].cancelled, s[i].n);
    }
    assert_int_equal(stat_of("cn_race", "running"), 0);
    assert_int_equal(stat_of("cn_race", "queued"), 0);
    assert_int_equal(stat_of("cn_race", "abandoned"), 0);
    close_cnode(&k);
    /* A cancel decided last may still tell the owner: once the pool is
     * freed (its timer thread joined), at most that notice is left. */
    fake_gc(k.o);
    for (int i = 0; i < 3; i++)
        fake_gc(s[i].p);
    assert_true(fake_quiesce(SETTLE_MS));
    if (fake_mailbox_len(k.o) > 0)
        assert_term(recv(k.o), "{moat_cnode_out,cn_race}");
    assert_no_frame(&k);
    free(f);
    free(held);
    free(ran);
    fake_proc_t *all[] = {k.o, s[0].p, s[1].p, s[2].p};
    assert_int_equal(settle(all, 4), 0);
    print_message("C-node race: %ld frames, %ld cancels (%ld before their "
                  "run), %ld answered, %ld/%ld/%ld ok, %ld/%ld/%ld timeouts, "
                  "%ld/%ld/%ld cancelled\n",
                  frames, cancels, early, total, s[0].ok, s[1].ok, s[2].ok,
                  s[0].timeouts, s[1].timeouts, s[2].timeouts,
                  s[0].cancelled, s[1].cancelled, s[2].cancelled);
}

/* --------------------------- C-node races the harness found (fixed) */

/* The owner flushing the outbox while a caller is about to send its run
 * frame (fake_port_hook stages it). */
typedef struct {
    cnode_t *k;
    int flushed;
} flush_job_t;

static void *owner_flushes(void *arg) {
    flush_job_t *j = arg;
    /* The 0 ms deadline has fired well within this, had it told. */
    ERL_NIF_TERM m = fake_recv(j->k->o, 200);
    if (m != 0 && fake_arity(m) == 2 &&
        fake_is_atom(el(m, 0), "moat_cnode_out") &&
        fake_is_atom(fake_call(j->k->o, "cnode_flush", 1, j->k->h), "ok"))
        j->flushed = 1;
    return NULL;
}

static void flush_meanwhile(void *arg) {
    pthread_t tid;
    if (pthread_create(&tid, NULL, owner_flushes, arg) == 0)
        pthread_join(tid, NULL);
}

/* A cancel must reach the C-node after the run frame of its task: one
 * that comes first is ignored ("a cancel for a tag the C-node no longer
 * holds"), and the body then runs to its end in vain.  A deadline that
 * fires between moat_pool_accept and the caller's port_command puts the
 * cancel in the outbox, and the owner may flush it before the run frame
 * is sent: here the 0 ms deadline fires and the owner tries to flush
 * while the caller's async is about to send.  The cancel is the caller's
 * to send then, after its run frame (the owner is not even told). */
static void test_nif_cnode_cancel_follows_its_run_frame(void **state) {
    cnode_t k = cnode_start("cn_order", 1, 4);
    fake_proc_t *c = fake_spawn();
    flush_job_t j = {&k, 0};
    ERL_NIF_TERM t;
    (void)state;

    fake_port_hook(k.port, flush_meanwhile, &j);
    t = async1(c, "cn_order", "sleep", I(c, 100000), 0);
    assert_false(j.flushed);
    assert_term(await(c, t), "{DOWN,timeout}");
    assert_frame(&k, "{run, %llu, sleep, [100000]}",
                 (unsigned long long)tag_of(t));
    assert_frame(&k, "{cancel, %llu, timeout}", (unsigned long long)tag_of(t));
    assert_term(deliver(&k, "{stopped,[%llu]}", (unsigned long long)tag_of(t)),
                "ok");
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* The frame a distribution pool's owner was given to relay:
 * {moat_cnode_send, Frame}.  A cancel decided off the caller's process
 * (a deadline after the run frame went) comes as {moat_cnode_out, Name}
 * first: the owner flushes, which gives it the frame to relay. */
static void take_relayed(cnode_t *k, fake_frame_t *f) {
    ERL_NIF_TERM m = recv(k->o);
    ErlNifBinary b;
    assert_int_equal(fake_arity(m), 2);
    if (fake_is_atom(el(m, 0), "moat_cnode_out")) {
        assert_term(fake_call(k->o, "cnode_flush", 1, k->h), "ok");
        m = recv(k->o);
        assert_int_equal(fake_arity(m), 2);
    }
    assert_term(el(m, 0), "moat_cnode_send");
    assert_true(enif_inspect_binary(fake_env(k->o), el(m, 1), &b));
    if (fake_frame_parse(b.data, b.size, f) != 0)
        fail_msg("a relayed binary that is no frame: %s", f->text);
}

/* Over distribution the NIF cannot reach the C-node: every frame goes to
 * the owner to relay, in the order its sender made them, a cancel after
 * its run frame; outcomes come back the same way, and a lost C-node ends
 * the tasks with the reason the owner gives (noconnection). */
static void test_nif_cnode_dist_relays_through_the_owner(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM r, t, t2;
    fake_frame_t *f = malloc(sizeof *f);
    cnode_t k;
    (void)state;
    r = cnode_pool_new(o, A("distribution"), "cn_dist", 2, 8);
    assert_term(el(r, 0), "ok");
    k = (cnode_t){o, 0, el(r, 1), "cn_dist"};
    t = async1(c, "cn_dist", "echo", A("x"), -1);
    take_relayed(&k, f);
    assert_string_equal(f->what, "run");
    assert_true(f->tag[0] == tag_of(t));
    assert_no_message(o);
    assert_term(answer_echo(&k, f), "ok");
    assert_term(await(c, t), "x");
    /* A deadline decided in the caller's process: run, then cancel. */
    t = async1(c, "cn_dist", "sleep", I(c, 100000), 0);
    assert_term(await(c, t), "{DOWN,timeout}");
    take_relayed(&k, f);
    assert_string_equal(f->what, "run");
    take_relayed(&k, f);
    assert_string_equal(f->what, "cancel");
    assert_true(f->tag[0] == tag_of(t));
    assert_term(deliver(&k, "{stopped,[%llu]}", (unsigned long long)tag_of(t)),
                "ok");
    /* The connection is lost with two tasks in flight. */
    t = async1(c, "cn_dist", "sleep", I(c, 100000), -1);
    t2 = async1(c, "cn_dist", "sleep", I(c, 100000), -1);
    take_relayed(&k, f);
    take_relayed(&k, f);
    assert_term(fake_call(o, "cnode_lost", 2, k.h, A("noconnection")), "ok");
    /* Both DOWNs, in no particular order. */
    assert_int_equal(fake_mailbox_len(c), 2);
    for (int i = 0; i < 2; i++) {
        ERL_NIF_TERM m = recv(c);
        assert_int_equal(fake_arity(m), 5);
        assert_true(enif_is_identical(el(m, 1), el(t, 0)) ||
                    enif_is_identical(el(m, 1), el(t2, 0)));
        assert_term(el(m, 4), "noconnection");
    }
    assert_no_message(o); /* nothing to cancel: the C-node is gone */
    t = async1(c, "cn_dist", "echo", A("x"), -1);
    assert_term(await(c, t), "{DOWN,noproc}");
    assert_badarg(o, cnode_pool_new(o, A("elsewhere"), "cn_bad", 1, 1));
    free(f);
    close_cnode(&k);
    assert_no_message(o);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* Once the C-node is lost the pool takes no more tasks (doc/cnode.md:
 * "tasks submitted in between get noproc"), but a stream made before
 * still submits into the core pool: its tasks are accepted, their frame
 * goes to the dead C-node, and they wait until the owner closes the
 * pool, to end with shutdown. */
static void test_nif_cnode_lost_refuses_stream_tasks(void **state) {
    cnode_t k = cnode_start("cn_lost_stream", 2, 8);
    fake_proc_t *c = fake_spawn();
    ERL_NIF_TERM s;
    (void)state;

    s = fake_call(c, "stream_new", 4, A("cn_lost_stream"), A("echo"),
                  A("infinity"), I(c, 4));
    assert_term(fake_call(k.o, "cnode_lost", 2, k.h, cnode_down(k.o)), "ok");
    assert_term(fake_call(c, "stream_submit", 3, s, list1(c, A("x")), I(c, 0)),
                "[{0,exit,noproc}]");
    assert_no_frame(&k);
    assert_term(fake_call(c, "stream_close", 1, s), "false");
    close_cnode(&k);
    fake_proc_t *all[] = {k.o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* ------------------------------------------- bugs the harness found */

/* The DOWN of an unlinked task names it {Pool, N} with the N async gave,
 * whichever thread decided the outcome. */
static void test_nif_down_names_the_task(void **state) {
    fake_proc_t *o = fake_spawn(), *c = fake_spawn();
    ERL_NIF_TERM h, r, m;
    long id;
    (void)state;
    h = start_pool(o, "named", 2, 64);
    for (int i = 0; i < iters(1000); i++) {
        ERL_NIF_TERM t = async1(c, "named", i & 1 ? "exit" : "fail",
                                i & 1 ? A("gone") : bin(c, "x"), -1);
        m = recv(c);
        assert_term(el(m, 0), "DOWN");
        assert_same(el(m, 1), el(t, 0));
        assert_same(el(m, 3), el(t, 1));
        fake_gc(c);
    }
    /* run/4's message fallback, its deadline decided by the housekeeper. */
    r = run1(c, "named", "sleep", I(c, 100000), 1);
    assert_term(el(r, 0), "wait");
    m = recv(c);
    assert_term(el(m, 4), "timeout");
    assert_true(fake_get_long(el(el(m, 3), 1), &id));
    assert_true(id > 0);
    close_pool(o, h);
    fake_proc_t *all[] = {o, c};
    assert_int_equal(settle(all, 2), 0);
}

/* A pool_new that fails for want of memory leaves nothing behind. */
static void test_nif_pool_new_out_of_memory_frees_the_pool(void **state) {
    fake_proc_t *o = fake_spawn();
    (void)state;
    fake_fail_next_alloc("moat_pool");
    assert_term(pool_new(o, "starved", 2, 4, demo_path), "{error,enomem}");
    assert_term(fake_call(o, "pool_owner", 1, A("starved")), "undefined");
    /* Every thread of the pool gone: only the janitor's and reaper's envs. */
    for (int i = 0; fake_live_envs() != JOBQ_ENVS; i++) {
        if (i > 2000)
            fail_msg("the failed pool's threads still run (%ld envs)",
                     fake_live_envs());
        pause_ms(1);
    }
}

/* ------------------------------------------- C-node pools' native servers */

/* The next frame sent to the C-node as ei prints it, and the tag it
 * carries (0 for a cast).  fake_frame_parse knows only run, runs and
 * cancel frames, but prints every frame first. */
static const char *take_text(cnode_t *k, uint64_t *tag) {
    static fake_frame_t f;
    const char *text = f.text;
    size_t len;
    unsigned char *pkt = fake_port_take(k->port, &len, RECV_MS);
    unsigned long long t = 0;
    if (pkt == NULL)
        fail_msg("no frame within %d ms", RECV_MS);
    (void)fake_frame_parse(pkt, len, &f);
    free(pkt);
    if (f.text[0] == '\0')
        fail_msg("a packet of %zu bytes that is no term", len);
    if (strncmp(text, "{cast", 5) != 0 &&
        sscanf(strchr(text, ',') != NULL ? strchr(text, ',') + 1 : "", "%llu",
               &t) != 1)
        t = 0;
    *tag = t;
    return text;
}

/* A C-node pool's native servers (doc/cnode.md, "Native servers"): a
 * call is a remote task whose frame names its server by index; a cast
 * is a frame; which_children and count_children ask the C-node, their
 * fallback beside; {restarts, N} is stats' restarts; past its deadline a
 * call is timeout, its cancel goes through the outbox and its late reply
 * is dropped; the C-node lost ends a call in flight. */
static void test_nif_cnode_servers(void **state) {
    cnode_t k = {fake_spawn(), 0, 0, "cn_srv"}, k0;
    fake_proc_t *c = fake_spawn();
    ErlNifEnv *e = fake_env(k.o);
    ERL_NIF_TERM port = fake_port(k.o, &k.port), r, v;
    char want[128];
    const char *text;
    uint64_t tag;
    long n;
    (void)state;
    r = fake_call(k.o, "cnode_pool_new", 6, A("cn_srv"), I(k.o, 2),
                  I(k.o, 4), port, list1(k.o, A("echo")),
                  enif_make_list2(e, A("a"),
                                  enif_make_tuple2(e, A("b"), I(k.o, 1))));
    assert_term(el(r, 0), "ok");
    k.h = el(r, 1);
    /* calls, by index */
    r = call_raw(c, "cn_srv", A("a"), A("get"), -1);
    assert_term(el(r, 0), "wait");
    text = take_text(&k, &tag);
    snprintf(want, sizeof want, "{call, %llu, 0, get}", (unsigned long long)tag);
    assert_string_equal(text, want);
    assert_term(deliver(&k, "{done,[{%llu,ok,7}]}", (unsigned long long)tag),
                "ok");
    assert_term(call_outcome(c, "cn_srv", r), "{ok,7}");
    r = call_raw(c, "cn_srv", tup2(c, A("b"), I(c, 1)), add_req(c, 2), -1);
    text = take_text(&k, &tag);
    snprintf(want, sizeof want, "{call, %llu, 1, {add, 2}}", (unsigned long long)tag);
    assert_string_equal(text, want);
    assert_term(deliver(&k, "{done,[{%llu,exit,noproc}]}",
                        (unsigned long long)tag),
                "ok");
    assert_term(call_outcome(c, "cn_srv", r), "{exit,noproc}");
    assert_term(call_raw(c, "cn_srv", A("nobody"), A("get"), -1),
                "{exit,noproc}");
    assert_no_frame(&k);
    /* casts */
    assert_term(fake_call(c, "cast", 3, A("cn_srv"), tup2(c, A("b"), I(c, 1)),
                          add_req(c, 1)),
                "ok");
    text = take_text(&k, &tag);
    assert_string_equal(text, "{cast, 1, {add, 1}}");
    assert_term(fake_call(c, "cast", 3, A("cn_srv"), A("nobody"), A("x")),
                "ok");
    assert_no_frame(&k);
    /* which_children and count_children */
    r = fake_call(c, "which_children", 1, A("cn_srv"));
    assert_term(el(r, 0), "remote");
    assert_term(el(r, 2), "[{a,restarting,worker},{{b,1},restarting,worker}]");
    text = take_text(&k, &tag);
    snprintf(want, sizeof want, "{which_children, %llu}", (unsigned long long)tag);
    assert_string_equal(text, want);
    assert_term(deliver(&k, "{done,[{%llu,ok,[{a,running,worker}]}]}",
                        (unsigned long long)tag),
                "ok");
    assert_term(call_outcome(c, "cn_srv", el(r, 1)),
                "{ok,[{a,running,worker}]}");
    r = fake_call(c, "count_children", 1, A("cn_srv"));
    assert_term(el(r, 0), "remote");
    assert_true(enif_get_map_value(fake_env(c), el(r, 2), A("specs"), &v) &&
                fake_get_long(v, &n) && n == 2);
    assert_true(enif_get_map_value(fake_env(c), el(r, 2), A("active"), &v) &&
                fake_get_long(v, &n) && n == 0);
    text = take_text(&k, &tag);
    assert_term(deliver(&k, "{done,[{%llu,exit,noproc}]}",
                        (unsigned long long)tag),
                "ok");
    assert_term(call_outcome(c, "cn_srv", el(r, 1)), "{exit,noproc}");
    /* restarts */
    assert_int_equal(stat_of("cn_srv", "restarts"), 0);
    assert_term(deliver(&k, "{restarts,3}"), "ok");
    assert_int_equal(stat_of("cn_srv", "restarts"), 3);
    assert_term(el(deliver(&k, "{restarts,-1}"), 1), "bad_frame");
    assert_term(deliver(&k, "{crashed,1,a,boom}"), "{other,{crashed,1,a,boom}}");
    /* a deadline: timeout, a cancel through the outbox, no late reply */
    r = call_raw(c, "cn_srv", A("a"), sleep_req(c, 1000), 5);
    assert_term(el(r, 0), "wait");
    text = take_text(&k, &tag);
    assert_term(call_outcome(c, "cn_srv", r), "{exit,timeout}");
    flush_cancels(&k, &tag, 1, "timeout");
    assert_term(deliver(&k, "{done,[{%llu,ok,late}]}",
                        (unsigned long long)tag),
                "ok");
    assert_no_message(c);
    /* the C-node lost with a call in it */
    r = call_raw(c, "cn_srv", A("a"), A("get"), -1);
    text = take_text(&k, &tag);
    assert_term(fake_call(k.o, "cnode_lost", 2, k.h, cnode_down(k.o)), "ok");
    assert_term(call_outcome(c, "cn_srv", r),
                "{exit,{native_crash,cnode_down}}");
    assert_term(fake_call(c, "which_children", 1, A("cn_srv")),
                "{error,not_found}");
    close_cnode(&k);
    /* a C-node pool without servers answers for itself */
    k0 = cnode_start("cn_srv0", 1, 1);
    assert_term(fake_call(c, "which_children", 1, A("cn_srv0")), "[]");
    r = fake_call(c, "count_children", 1, A("cn_srv0"));
    assert_true(enif_get_map_value(fake_env(c), r, A("specs"), &v) &&
                fake_get_long(v, &n) && n == 0);
    assert_term(call_raw(c, "cn_srv0", A("a"), A("get"), -1), "{exit,noproc}");
    assert_no_frame(&k0);
    close_cnode(&k0);
    fake_proc_t *all[] = {k.o, k0.o, c};
    assert_int_equal(settle(all, 3), 0);
}

int main(void) {
#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_nif_load_exports_the_table),
        T(test_nif_upgrade_keeps_pools_working),
        T(test_nif_pool_new_registers_the_pool),
        T(test_nif_pool_new_refuses),
        T(test_nif_pool_new_replaces_a_dead_owners_pool),
        T(test_nif_pool_close_settles_every_task),
        T(test_nif_async_sends_one_message),
        T(test_nif_async_refusals_come_as_down),
        T(test_nif_async_tells_a_linked_proxy),
        T(test_nif_linked_task_dies_with_its_proxy),
        T(test_nif_proxy_death_races_completion),
        T(test_nif_run_answers_on_the_spot),
        T(test_nif_run_falls_back_to_a_message),
        T(test_nif_run_races_its_own_wait),
        T(test_nif_cancel_races_completion),
        T(test_nif_ignore_races_completion),
        T(test_nif_task_spin_and_running),
        T(test_nif_owner_death_cancels_its_tasks),
        T(test_nif_pool_owner_death_closes_the_pool),
        T(test_nif_dropped_refs_free_tasks),
        T(test_nif_submitters_race_pool_close),
        T(test_nif_owner_deaths_race_completions),
        T(test_nif_stream_delivers_every_outcome),
        T(test_nif_stream_outcome_kinds),
        T(test_nif_stream_refusals),
        T(test_nif_stream_close_races_completions),
        T(test_nif_stream_owner_death_frees_it),
        T(test_nif_out_of_memory_raises),
        T(test_nif_down_names_the_task),
        T(test_nif_pool_new_out_of_memory_frees_the_pool),
        T(test_nif_sup_start_and_children),
        T(test_nif_call_answers_on_the_spot),
        T(test_nif_call_falls_back_to_a_message),
        T(test_nif_call_timeout),
        T(test_nif_call_and_cast_refusals),
        T(test_nif_cast),
        T(test_nif_call_crash_restarts_the_server),
        T(test_nif_sup_start_refuses),
        T(test_nif_sup_gives_up),
        T(test_nif_pool_close_stops_slow_servers),
        T(test_nif_pool_close_with_busy_threads),
        T(test_nif_pool_close_gives_up_when_its_caller_dies),
        T(test_nif_call_caller_dies),
        T(test_nif_pool_owner_death_stops_the_servers),
        T(test_nif_calls_from_many_threads),
        T(test_nif_cnode_pool_new_and_refusals),
        T(test_nif_cnode_run_frame_and_outcome),
        T(test_nif_cnode_exit_outcome_is_down),
        T(test_nif_cnode_run_waits_for_the_message),
        T(test_nif_cnode_unknown_task_is_refused),
        T(test_nif_cnode_overloaded),
        T(test_nif_cnode_stale_reports_are_dropped),
        T(test_nif_cnode_cancel_goes_to_the_port),
        T(test_nif_cnode_deadline_goes_through_the_outbox),
        T(test_nif_cnode_dead_callers_cancel_through_the_outbox),
        T(test_nif_cnode_lost_ends_every_task),
        T(test_nif_cnode_malformed_frames),
        T(test_nif_cnode_stream),
        T(test_nif_cnode_pool_close_settles_with_shutdown),
        T(test_nif_cnode_pool_stats_split),
        T(test_nif_cnode_owner_death_closes_the_pool),
        T(test_nif_cnode_closed_port_waits_for_lost),
        T(test_nif_cnode_callers_race_the_owner),
        T(test_nif_cnode_cancel_follows_its_run_frame),
        T(test_nif_cnode_lost_refuses_stream_tasks),
        T(test_nif_cnode_servers),
        T(test_nif_cnode_dist_relays_through_the_owner),
    };
#undef T
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
