/* core_util.h: private to test/c.  Small helpers shared by the core suites:
 * building terms and expecting messages.  Header-only so each suite takes
 * what it uses. */
#ifndef MOAT_TEST_CORE_UTIL_H
#define MOAT_TEST_CORE_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "moat_core.h"

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
