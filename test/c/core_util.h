/* core_util.h: private to test/c.  Small helpers shared by the core suites:
 * building terms and expecting messages.  Header-only so each suite takes
 * what it uses. */
#ifndef MOAT_TEST_CORE_UTIL_H
#define MOAT_TEST_CORE_UTIL_H

#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "moat_core.h"

/* What the completion callback saw for one task (its data pointer). */
typedef struct t_rec_s {
    atomic_int outcomes;
    atomic_int ready; /* set (release) once kind/term/id are written */
    int kind;
    moat_term_t *term;
    uint64_t id;
} t_rec_t;

/* A complete callback that records the outcome in the task's t_rec_t. */
static inline void t_record(moat_task_t *t, const moat_outcome_t *o,
                            void *d) {
    t_rec_t *r = moat_task_data(t);
    (void)d;
    if (atomic_fetch_add(&r->outcomes, 1) == 0) {
        r->kind = o->kind;
        r->term = moat_term_ref(o->term);
        r->id = moat_task_id(t);
        atomic_store_explicit(&r->ready, 1, memory_order_release);
    }
}

static inline void t_ignore(moat_task_t *t, const moat_outcome_t *o,
                            void *d) {
    (void)t;
    (void)o;
    (void)d;
}

/* Waits (yielding) until r has its outcome; bounded, so that a lost
 * outcome fails the test instead of hanging it. */
static inline void t_wait(t_rec_t *r) {
    for (long i = 0; !atomic_load_explicit(&r->ready, memory_order_acquire);
         i++) {
        assert_true(i < 200000000L);
        sched_yield();
    }
}

static inline void t_rec_clear(t_rec_t *r, size_t n) {
    for (size_t i = 0; i < n; i++) {
        moat_term_unref(r[i].term);
        r[i].term = NULL;
    }
}

static inline moat_pool_t *t_pool(unsigned threads, unsigned max_queue,
                                  const char *name, moat_complete_cb cb) {
    moat_pool_opts_t o = {0};
    moat_pool_t *pool = NULL;
    o.nthreads = threads;
    o.max_queue = max_queue;
    o.name = name;
    o.complete = cb;
    assert_int_equal(moat_pool_new(&o, &pool), 0);
    return pool;
}

/* cmocka group teardown for suites whose state is one pool. */
static inline int t_pool_teardown(void **state) {
    moat_pool_free(*state);
    return 0;
}

/* The atom `name` as a term. */
static inline moat_term_t *t_atom(const char *name) {
    ei_x_buff x;
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(ei_x_encode_atom(&x, name), 0);
    return moat_term_from_x(&x);
}

/* {A, B} of two atoms. */
static inline moat_term_t *t_pair(const char *a, const char *b) {
    ei_x_buff x;
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(ei_x_encode_tuple_header(&x, 2), 0);
    assert_int_equal(ei_x_encode_atom(&x, a), 0);
    assert_int_equal(ei_x_encode_atom(&x, b), 0);
    return moat_term_from_x(&x);
}

/* [] as an argument list. */
static inline moat_term_t *t_nil(void) {
    ei_x_buff x;
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(ei_x_encode_empty_list(&x), 0);
    return moat_term_from_x(&x);
}

/* [N] as an argument list. */
static inline moat_term_t *t_int_list(long n) {
    ei_x_buff x;
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(ei_x_encode_list_header(&x, 1), 0);
    assert_int_equal(ei_x_encode_long(&x, n), 0);
    assert_int_equal(ei_x_encode_empty_list(&x), 0);
    return moat_term_from_x(&x);
}

/* The first message, within 5 s (a generous bound for sanitizer runs: the
 * tests wait on messages, never on time). */
static inline moat_msg_t *t_recv(moat_pool_t *pool, moat_pid_t self) {
    moat_msg_t *m = NULL;
    assert_int_equal(moat_proc_receive(pool, self, 5000, &m), 0);
    assert_non_null(m);
    return m;
}

static inline void t_expect_exit(moat_pool_t *pool, moat_pid_t self,
                                 moat_pid_t from, moat_term_t *reason) {
    moat_msg_t *m = t_recv(pool, self);
    assert_int_equal(m->kind, MOAT_MSG_EXIT);
    assert_int_equal(m->from, from);
    assert_true(moat_term_equal(m->term, reason));
    moat_msg_free(m);
}

static inline void t_expect_down(moat_pool_t *pool, moat_pid_t self,
                                 uint64_t ref, moat_pid_t from,
                                 moat_term_t *reason) {
    moat_msg_t *m = t_recv(pool, self);
    assert_int_equal(m->kind, MOAT_MSG_DOWN);
    assert_int_equal(m->ref, ref);
    assert_int_equal(m->from, from);
    assert_true(moat_term_equal(m->term, reason));
    moat_msg_free(m);
}

static inline void t_expect_empty(moat_pool_t *pool, moat_pid_t self) {
    moat_msg_t *m = NULL;
    assert_int_equal(moat_proc_receive(pool, self, 0, &m), MOAT_ETIMEDOUT);
    assert_null(m);
}

#endif
