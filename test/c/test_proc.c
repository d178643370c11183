/* test_proc.c: native processes and signals, one case per BEAM rule of
 * REFERENCE.md §1 that applies to native processes (E8 as a reason the
 * transport gives, E9 in test_term.c's predicate and here in cascades). */
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <stdlib.h>

#include "core_util.h"

static int setup(void **state) {
    *state = t_pool(2, 0, "tproc", t_ignore);
    return 0;
}

static moat_pid_t open_proc(moat_pool_t *pool) {
    moat_pid_t p = 0;
    assert_int_equal(moat_proc_open(pool, &p), 0);
    assert_int_not_equal(p, 0);
    return p;
}

/* Opens a watcher that monitors `target`; returns the ref. */
static uint64_t watch(moat_pool_t *pool, moat_pid_t w, moat_pid_t target) {
    uint64_t ref = 0;
    assert_int_equal(moat_proc_monitor(pool, w, target, &ref), 0);
    return ref;
}

/* E1: link to a dead process raises noproc when not trapping. */
static void test_signal_link_dead_not_trapping_is_noproc(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool);
    assert_int_equal(moat_proc_close(pool, b, moat_atom(MOAT_A_NORMAL)), 0);
    assert_int_equal(moat_proc_link(pool, a, b), MOAT_ENOPROC);
    t_expect_empty(pool, a);
    assert_true(moat_proc_alive(pool, a));
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
}

/* E1: when trapping, link succeeds and delivers {'EXIT', P, noproc}. */
static void test_signal_link_dead_trapping_gets_exit_noproc(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool);
    moat_proc_close(pool, b, moat_atom(MOAT_A_NORMAL));
    assert_int_equal(moat_proc_trap_exit(pool, a, 1), 0);
    assert_int_equal(moat_proc_link(pool, a, b), 0);
    t_expect_exit(pool, a, b, moat_atom(MOAT_A_NOPROC));
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
}

/* E2: monitoring a dead process gives a ref and an immediate noproc DOWN. */
static void test_signal_monitor_dead_is_down_noproc(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool);
    uint64_t ref;
    moat_proc_close(pool, b, moat_atom(MOAT_A_NORMAL));
    ref = watch(pool, a, b);
    assert_int_not_equal(ref, 0);
    t_expect_down(pool, a, ref, b, moat_atom(MOAT_A_NOPROC));
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
}

/* E3: `normal` does not kill a linked non-trapping process; a trapping one
 * gets {'EXIT', P, normal}; monitors see normal. */
static void test_signal_normal_not_propagated(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool), c = open_proc(pool);
    uint64_t ref = watch(pool, c, b);
    moat_proc_trap_exit(pool, c, 1);
    assert_int_equal(moat_proc_link(pool, a, b), 0);
    assert_int_equal(moat_proc_link(pool, c, b), 0);
    moat_proc_close(pool, b, moat_atom(MOAT_A_NORMAL));
    t_expect_exit(pool, c, b, moat_atom(MOAT_A_NORMAL));
    t_expect_down(pool, c, ref, b, moat_atom(MOAT_A_NORMAL));
    assert_true(moat_proc_alive(pool, a));
    t_expect_empty(pool, a);
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, c, moat_atom(MOAT_A_NORMAL));
}

/* E4: every other reason, shutdown and {shutdown, _} included, kills a
 * linked non-trapping process with that same reason. */
static void test_signal_abnormal_kills_linked_with_reason(void **state) {
    moat_pool_t *pool = *state;
    moat_term_t *reasons[] = {moat_atom(MOAT_A_SHUTDOWN),
                              t_pair("shutdown", "done"), t_atom("crash"),
                              moat_atom(MOAT_A_KILLED)};
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++) {
        moat_pid_t w = open_proc(pool), a = open_proc(pool),
                   b = open_proc(pool);
        uint64_t ref = watch(pool, w, a);
        assert_int_equal(moat_proc_link(pool, a, b), 0);
        moat_proc_close(pool, b, reasons[i]);
        t_expect_down(pool, w, ref, a, reasons[i]);
        assert_false(moat_proc_alive(pool, a));
        moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
        moat_term_unref(reasons[i]);
    }
}

/* E5: exit(P, kill) cannot be trapped; P dies with `killed` and its links
 * and monitors see `killed`. */
static void test_signal_kill_untrappable_seen_as_killed(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t p = open_proc(pool), w = open_proc(pool), l = open_proc(pool),
               t = open_proc(pool);
    uint64_t ref = watch(pool, w, p);
    moat_term_t *kill = moat_atom(MOAT_A_KILL);
    moat_proc_trap_exit(pool, p, 1);
    moat_proc_trap_exit(pool, t, 1);
    assert_int_equal(moat_proc_link(pool, l, p), 0);
    assert_int_equal(moat_proc_link(pool, t, p), 0);
    assert_int_equal(moat_proc_exit(pool, w, p, kill), 0);
    t_expect_down(pool, w, ref, p, moat_atom(MOAT_A_KILLED));
    t_expect_exit(pool, t, p, moat_atom(MOAT_A_KILLED));
    assert_false(moat_proc_alive(pool, p));
    assert_false(moat_proc_alive(pool, l)); /* killed by the link signal */
    assert_int_equal(moat_proc_receive(pool, p, 0, &(moat_msg_t *){NULL}),
                     MOAT_EDEAD);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, t, moat_atom(MOAT_A_NORMAL));
}

/* E5: a process ending itself with reason `kill` sends an ordinary,
 * trappable `kill`: a trapping link gets {'EXIT', P, kill} and lives, a
 * non-trapping link dies with `kill`. */
static void test_signal_self_kill_is_trappable(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t p = open_proc(pool), t = open_proc(pool), l = open_proc(pool),
               w = open_proc(pool);
    uint64_t ref = watch(pool, w, l);
    moat_proc_trap_exit(pool, t, 1);
    moat_proc_link(pool, t, p);
    moat_proc_link(pool, l, p);
    moat_proc_close(pool, p, moat_atom(MOAT_A_KILL));
    t_expect_exit(pool, t, p, moat_atom(MOAT_A_KILL));
    assert_true(moat_proc_alive(pool, t));
    t_expect_down(pool, w, ref, l, moat_atom(MOAT_A_KILL));
    moat_proc_close(pool, t, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* E6: exit(Other, normal) is ignored by a non-trapping target, delivered
 * as {'EXIT', Sender, normal} to a trapping one, and exit(self, normal)
 * ends a non-trapping caller. */
static void test_signal_exit_normal(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = open_proc(pool), a = open_proc(pool), t = open_proc(pool),
               w = open_proc(pool);
    uint64_t ref = watch(pool, w, s);
    moat_term_t *normal = moat_atom(MOAT_A_NORMAL);
    moat_proc_trap_exit(pool, t, 1);
    assert_int_equal(moat_proc_exit(pool, s, a, normal), 0);
    assert_true(moat_proc_alive(pool, a));
    t_expect_empty(pool, a);
    assert_int_equal(moat_proc_exit(pool, s, t, normal), 0);
    t_expect_exit(pool, t, s, normal);
    assert_int_equal(moat_proc_exit(pool, s, s, normal), 0);
    t_expect_down(pool, w, ref, s, normal);
    moat_proc_close(pool, a, normal);
    moat_proc_close(pool, t, normal);
    moat_proc_close(pool, w, normal);
}

/* exit/2 with another reason: a trapping target gets it as a message, a
 * non-trapping one dies with it; a dead target is no error. */
static void test_signal_exit_abnormal(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t s = open_proc(pool), a = open_proc(pool), t = open_proc(pool),
               w = open_proc(pool);
    uint64_t ref = watch(pool, w, a);
    moat_term_t *crash = t_atom("crash");
    moat_proc_trap_exit(pool, t, 1);
    assert_int_equal(moat_proc_exit(pool, s, t, crash), 0);
    t_expect_exit(pool, t, s, crash);
    assert_int_equal(moat_proc_exit(pool, s, a, crash), 0);
    t_expect_down(pool, w, ref, a, crash);
    assert_int_equal(moat_proc_exit(pool, s, a, crash), 0);
    moat_term_unref(crash);
    moat_proc_close(pool, s, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, t, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* E7: after unlink, an EXIT queued before it stays (the caller flushes);
 * none arrives after it. */
static void test_signal_unlink_keeps_queued_exit(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool), c = open_proc(pool);
    moat_term_t *crash = t_atom("crash");
    moat_proc_trap_exit(pool, a, 1);
    moat_proc_link(pool, a, b);
    moat_proc_link(pool, a, c);
    moat_proc_close(pool, b, crash);
    assert_int_equal(moat_proc_unlink(pool, a, b), 0);
    assert_int_equal(moat_proc_unlink(pool, a, c), 0);
    moat_proc_close(pool, c, crash);
    t_expect_exit(pool, a, b, crash);
    t_expect_empty(pool, a);
    moat_term_unref(crash);
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
}

/* E7: demonitor says whether the monitor was active, and with flush
 * removes a DOWN already queued. */
static void test_signal_demonitor_info_and_flush(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool), c = open_proc(pool);
    uint64_t rb = watch(pool, a, b), rc = watch(pool, a, c);
    assert_int_equal(moat_proc_demonitor(pool, a, rb, 0), 1);
    assert_int_equal(moat_proc_demonitor(pool, a, rb, 0), 0);
    moat_proc_close(pool, b, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, c, moat_atom(MOAT_A_NORMAL));
    assert_int_equal(moat_proc_demonitor(pool, a, rc, MOAT_DEMONITOR_FLUSH),
                     0);
    t_expect_empty(pool, a);
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
}

/* E8: a lost connection is reported by the transport as `noconnection`,
 * which is abnormal: it kills links and reaches monitors unchanged. */
static void test_signal_noconnection_propagates(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t proxy = open_proc(pool), a = open_proc(pool),
               w = open_proc(pool);
    uint64_t ref = watch(pool, w, a);
    moat_proc_link(pool, a, proxy);
    moat_proc_close(pool, proxy, moat_atom(MOAT_A_NOCONNECTION));
    t_expect_down(pool, w, ref, a, moat_atom(MOAT_A_NOCONNECTION));
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
}

/* Exits cascade along links to every process of a chain, each dying with
 * the original reason; a trapping end stops the cascade. */
static void test_signal_cascade_along_links(void **state) {
    moat_pool_t *pool = *state;
    enum { N = 50 };
    moat_pid_t chain[N], w = open_proc(pool), end = open_proc(pool);
    uint64_t refs[N];
    moat_term_t *crash = t_atom("crash");
    moat_proc_trap_exit(pool, end, 1);
    for (int i = 0; i < N; i++) {
        chain[i] = open_proc(pool);
        refs[i] = watch(pool, w, chain[i]);
        if (i > 0)
            assert_int_equal(moat_proc_link(pool, chain[i - 1], chain[i]), 0);
    }
    moat_proc_link(pool, end, chain[0]);
    moat_proc_close(pool, chain[N - 1], crash);
    for (int i = N - 1; i >= 0; i--)
        t_expect_down(pool, w, refs[i], chain[i], crash);
    t_expect_exit(pool, end, chain[0], crash);
    assert_true(moat_proc_alive(pool, end));
    moat_term_unref(crash);
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, end, moat_atom(MOAT_A_NORMAL));
}

/* Ids are never reused: a stale id reaches nothing, even when its slot
 * holds a newer process. */
static void test_proc_ids_never_reused(void **state) {
    moat_pool_t *pool = *state;
    enum { N = 1000 };
    moat_pid_t *seen = calloc(N, sizeof *seen), a = open_proc(pool);
    for (int i = 0; i < N; i++) {
        seen[i] = open_proc(pool);
        for (int j = 0; j < i; j++)
            assert_int_not_equal(seen[i], seen[j]);
        moat_proc_close(pool, seen[i], moat_atom(MOAT_A_NORMAL));
    }
    for (int i = 0; i < N; i++) {
        assert_false(moat_proc_alive(pool, seen[i]));
        assert_int_equal(moat_proc_link(pool, a, seen[i]), MOAT_ENOPROC);
        assert_int_equal(
            moat_proc_close(pool, seen[i], moat_atom(MOAT_A_NORMAL)),
            MOAT_EDEAD);
    }
    free(seen);
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
}

/* A process made after others died (its struct reused from the pool's
 * cache) starts with no links, monitors or messages of theirs: its own
 * death signals nobody, with few or many links (an array too large to
 * keep is freed). */
static void test_proc_new_process_inherits_nothing(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t w = open_proc(pool), peers[12];
    moat_term_t *boom = t_atom("boom");
    assert_int_equal(moat_proc_trap_exit(pool, w, 1), 0);
    for (int n = 1; n <= 12; n += 11) {
        for (int round = 0; round < 100; round++) {
            moat_pid_t d = open_proc(pool), fresh;
            uint64_t ref = watch(pool, w, d), mref;
            for (int i = 0; i < n; i++) {
                peers[i] = open_proc(pool);
                assert_int_equal(moat_proc_trap_exit(pool, peers[i], 1), 0);
                assert_int_equal(moat_proc_link(pool, d, peers[i]), 0);
                assert_int_equal(moat_proc_monitor(pool, d, peers[i], &mref),
                                 0);
            }
            assert_int_equal(moat_proc_link(pool, w, d), 0);
            assert_int_equal(moat_proc_send(pool, w, d, boom), 0);
            moat_proc_close(pool, d, boom);
            t_expect_exit(pool, w, d, boom);
            t_expect_down(pool, w, ref, d, boom);
            for (int i = 0; i < n; i++)
                t_expect_exit(pool, peers[i], d, boom);
            /* Likely d's struct again: it must know none of them (a
             * stale array would also free d's link messages twice). */
            fresh = open_proc(pool);
            t_expect_empty(pool, fresh);
            moat_proc_close(pool, fresh, boom);
            t_expect_empty(pool, w);
            for (int i = 0; i < n; i++) {
                t_expect_empty(pool, peers[i]);
                moat_proc_close(pool, peers[i], moat_atom(MOAT_A_NORMAL));
            }
        }
    }
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
    moat_term_unref(boom);
}

/* User messages arrive in order; a receive with a timeout returns
 * MOAT_ETIMEDOUT; a send to a dead process is silently dropped. */
static void test_proc_send_receive_order(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool), b = open_proc(pool), d = open_proc(pool);
    moat_term_t *m1 = t_atom("one"), *m2 = t_atom("two");
    moat_msg_t *m = NULL;
    moat_proc_close(pool, d, moat_atom(MOAT_A_NORMAL));
    assert_int_equal(moat_proc_send(pool, a, b, m1), 0);
    assert_int_equal(moat_proc_send(pool, a, b, m2), 0);
    assert_int_equal(moat_proc_send(pool, a, d, m1), 0);
    m = t_recv(pool, b);
    assert_int_equal(m->kind, MOAT_MSG_USER);
    assert_true(moat_term_equal(m->term, m1));
    moat_msg_free(m);
    m = t_recv(pool, b);
    assert_true(moat_term_equal(m->term, m2));
    moat_msg_free(m);
    assert_int_equal(moat_proc_receive(pool, b, 20, &m), MOAT_ETIMEDOUT);
    moat_term_unref(m1);
    moat_term_unref(m2);
    moat_proc_close(pool, a, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, b, moat_atom(MOAT_A_NORMAL));
}

/* A receive blocked in another thread returns MOAT_EDEAD when an exit
 * signal kills its process. */
static void *blocked_receiver(void *arg) {
    void **a = arg;
    moat_msg_t *m = NULL;
    intptr_t rc = moat_proc_receive(a[0], *(moat_pid_t *)a[1], -1, &m);
    return (void *)rc;
}

static void test_proc_receive_woken_by_death(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t a = open_proc(pool);
    void *args[2] = {pool, &a}, *ret;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, blocked_receiver, args), 0);
    moat_proc_exit(pool, 0, a, moat_atom(MOAT_A_KILL));
    pthread_join(th, &ret);
    assert_int_equal((intptr_t)ret, MOAT_EDEAD);
}

static int task_ok(moat_ctx_t *ctx, const char *a, int n, ei_x_buff *out) {
    (void)ctx;
    (void)a;
    (void)n;
    return ei_x_encode_atom(out, "ok") ? MOAT_ERROR : MOAT_OK;
}

static int task_crash(moat_ctx_t *ctx, const char *a, int n, ei_x_buff *out) {
    (void)ctx;
    (void)a;
    (void)n;
    ei_x_encode_atom(out, "crash");
    return MOAT_EXIT;
}

/* A task that waits for moat_should_stop, checking its own id. */
static int task_wait_stop(moat_ctx_t *ctx, const char *a, int n,
                          ei_x_buff *out) {
    (void)a;
    (void)n;
    if (moat_self(ctx) == 0)
        return moat_error(ctx, "no self");
    while (!moat_should_stop(ctx))
        sched_yield();
    ei_x_encode_atom(out, "stopped");
    return MOAT_OK;
}

/* spawn_link is atomic: a child that dies at once always reaches its
 * trapping parent with its reason (no window before the link exists). */
static void test_proc_spawn_link_atomic(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t parent = open_proc(pool);
    moat_term_t *crash = t_atom("crash");
    moat_proc_trap_exit(pool, parent, 1);
    for (int i = 0; i < 500; i++) {
        moat_pid_t child = 0;
        moat_term_t *args = t_nil();
        assert_int_equal(moat_proc_spawn(pool, parent, task_crash, args,
                                         MOAT_SPAWN_LINK, &child, NULL),
                         0);
        t_expect_exit(pool, parent, child, crash);
    }
    moat_term_unref(crash);
    moat_proc_close(pool, parent, moat_atom(MOAT_A_NORMAL));
}

/* A spawned task that returns normally is DOWN with `normal`. */
static void test_proc_spawn_monitor_normal(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t parent = open_proc(pool), child = 0;
    uint64_t ref = 0;
    assert_int_equal(moat_proc_spawn(pool, parent, task_ok, t_nil(),
                                     MOAT_SPAWN_MONITOR, &child, &ref),
                     0);
    t_expect_down(pool, parent, ref, child, moat_atom(MOAT_A_NORMAL));
    moat_proc_close(pool, parent, moat_atom(MOAT_A_NORMAL));
}

/* Killing a running task process flags its task (moat_should_stop) and
 * reports `killed` at once, while the body finishes on its own. */
static void test_proc_kill_running_task(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t parent = open_proc(pool), child = 0;
    uint64_t ref = 0;
    moat_msg_t *m = NULL;
    assert_int_equal(moat_proc_spawn(pool, parent, task_wait_stop, t_nil(),
                                     MOAT_SPAWN_MONITOR, &child, &ref),
                     0);
    assert_int_equal(moat_proc_receive(pool, parent, 30, &m), MOAT_ETIMEDOUT);
    assert_int_equal(moat_proc_exit(pool, parent, child,
                                    moat_atom(MOAT_A_KILL)),
                     0);
    t_expect_down(pool, parent, ref, child, moat_atom(MOAT_A_KILLED));
    moat_proc_close(pool, parent, moat_atom(MOAT_A_NORMAL));
}

/* Spawning from a dead parent fails and leaves the args to the caller. */
static void test_proc_spawn_dead_parent(void **state) {
    moat_pool_t *pool = *state;
    moat_pid_t parent = open_proc(pool);
    moat_term_t *args = t_nil();
    moat_proc_close(pool, parent, moat_atom(MOAT_A_NORMAL));
    assert_int_equal(moat_proc_spawn(pool, parent, task_ok, args,
                                     MOAT_SPAWN_LINK, NULL, NULL),
                     MOAT_EDEAD);
    moat_term_unref(args);
}

/* A task that has a process and is killed while it returns: its outcome
 * and its monitors always give the same reason. */
static atomic_uint_fast64_t racer_pid;
static atomic_int racer_go;

static int task_publish_self(moat_ctx_t *ctx, const char *a, int n,
                             ei_x_buff *out) {
    (void)a;
    (void)n;
    atomic_store(&racer_pid, moat_self(ctx));
    while (!atomic_load(&racer_go) && !moat_should_stop(ctx))
        sched_yield();
    ei_x_encode_atom(out, "ok");
    return MOAT_OK;
}

typedef struct seen_s {
    atomic_int n;
    atomic_int ok;
} seen_t;

static void seen_outcome(moat_task_t *t, const moat_outcome_t *o, void *d) {
    seen_t *s = moat_task_data(t);
    (void)d;
    atomic_store(&s->ok, o->kind == MOAT_OK);
    atomic_fetch_add(&s->n, 1);
}

static void test_proc_kill_racing_return_agrees(void **state) {
    moat_pool_opts_t o = {0};
    moat_pool_t *pool;
    moat_pid_t w;
    (void)state;
    o.nthreads = 2;
    o.complete = seen_outcome;
    assert_int_equal(moat_pool_new(&o, &pool), 0);
    assert_int_equal(moat_proc_open(pool, &w), 0);
    for (int i = 0; i < 2000; i++) {
        seen_t seen = {0, 0};
        moat_job_t j = {task_publish_self, "race", NULL, t_nil(), 0, -1,
                        &seen};
        moat_pid_t pid;
        uint64_t ref;
        moat_msg_t *m;
        atomic_store(&racer_pid, 0);
        atomic_store(&racer_go, 0);
        assert_int_equal(moat_pool_submit(pool, &j, NULL), 0);
        while ((pid = atomic_load(&racer_pid)) == 0)
            sched_yield();
        assert_int_equal(moat_proc_monitor(pool, w, pid, &ref), 0);
        atomic_store(&racer_go, 1); /* the return races the kill */
        moat_proc_exit(pool, w, pid, moat_atom(MOAT_A_KILL));
        m = t_recv(pool, w);
        while (atomic_load(&seen.n) == 0)
            sched_yield();
        assert_int_equal(atomic_load(&seen.n), 1);
        assert_int_equal(m->kind, MOAT_MSG_DOWN);
        assert_int_equal(atomic_load(&seen.ok),
                         moat_term_is(m->term, MOAT_A_NORMAL));
        moat_msg_free(m);
    }
    moat_proc_close(pool, w, moat_atom(MOAT_A_NORMAL));
    moat_pool_free(pool);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_signal_link_dead_not_trapping_is_noproc),
        cmocka_unit_test(test_signal_link_dead_trapping_gets_exit_noproc),
        cmocka_unit_test(test_signal_monitor_dead_is_down_noproc),
        cmocka_unit_test(test_signal_normal_not_propagated),
        cmocka_unit_test(test_signal_abnormal_kills_linked_with_reason),
        cmocka_unit_test(test_signal_kill_untrappable_seen_as_killed),
        cmocka_unit_test(test_signal_self_kill_is_trappable),
        cmocka_unit_test(test_signal_exit_normal),
        cmocka_unit_test(test_signal_exit_abnormal),
        cmocka_unit_test(test_signal_unlink_keeps_queued_exit),
        cmocka_unit_test(test_signal_demonitor_info_and_flush),
        cmocka_unit_test(test_signal_noconnection_propagates),
        cmocka_unit_test(test_signal_cascade_along_links),
        cmocka_unit_test(test_proc_ids_never_reused),
        cmocka_unit_test(test_proc_new_process_inherits_nothing),
        cmocka_unit_test(test_proc_send_receive_order),
        cmocka_unit_test(test_proc_receive_woken_by_death),
        cmocka_unit_test(test_proc_spawn_link_atomic),
        cmocka_unit_test(test_proc_spawn_monitor_normal),
        cmocka_unit_test(test_proc_kill_running_task),
        cmocka_unit_test(test_proc_spawn_dead_parent),
        cmocka_unit_test(test_proc_kill_racing_return_agrees),
    };
    return cmocka_run_group_tests_name("proc", tests, setup, t_pool_teardown);
}
