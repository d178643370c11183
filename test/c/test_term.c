/*
 * test_term.c: terms (atoms, the abnormal predicate, reference counting)
 * and moat_etf_check, which stands between untrusted bytes and ei.
 *
 * Every buffer handed to moat_etf_check is malloc'd at its exact length,
 * so a read one byte too far is an ASan or valgrind error, not luck.
 * Wherever the check accepts a buffer, ei_skip_term (which trusts its input)
 * must walk it to exactly its end: that is the promise callers rely on.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "moat_core.h"

/* ------------------------------------------------------------- helpers */

typedef struct {
    const char *what;
    char *buf;
    size_t len;
} sample_t;

typedef struct {
    sample_t *v;
    size_t n;
    size_t cap;
} samples_t;

static void add_bytes(samples_t *s, const char *what, const void *buf,
                      size_t len) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->v = realloc(s->v, s->cap * sizeof(*s->v));
        assert_non_null(s->v);
    }
    s->v[s->n].what = what;
    s->v[s->n].buf = malloc(len ? len : 1);
    assert_non_null(s->v[s->n].buf);
    memcpy(s->v[s->n].buf, buf, len);
    s->v[s->n].len = len;
    s->n++;
}

/* Adds an ei_x_buff's contents and frees it. */
static void add_x(samples_t *s, const char *what, ei_x_buff *x) {
    add_bytes(s, what, x->buff, (size_t)x->index);
    ei_x_free(x);
}

static void free_samples(samples_t *s) {
    size_t i;

    for (i = 0; i < s->n; i++)
        free(s->v[i].buf);
    free(s->v);
}

/* Checks a copy of buf[0..len) in a buffer of exactly len bytes. */
static int check_exact(const char *buf, size_t len) {
    char *copy = malloc(len ? len : 1);
    int rc;

    assert_non_null(copy);
    memcpy(copy, buf, len);
    rc = moat_etf_check(copy, len);
    /* What the check accepts, ei must walk to exactly its end. */
    if (rc == 0) {
        int index = 1;
        assert_int_equal(ei_skip_term(copy, &index), 0);
        assert_int_equal((size_t)index, len);
    }
    free(copy);
    return rc;
}

static void new_x(ei_x_buff *x) {
    assert_int_equal(ei_x_new_with_version(x), 0);
}

static moat_term_t *term_of(const void *buf, size_t len) {
    int err = 1;
    moat_term_t *t = moat_term_new(buf, len, &err);

    assert_non_null(t);
    assert_int_equal(err, 0);
    return t;
}

/* A term made with ei, then checked and copied. */
static moat_term_t *term_of_x(ei_x_buff *x) {
    moat_term_t *t = term_of(x->buff, (size_t)x->index);

    ei_x_free(x);
    return t;
}

static moat_term_t *atom_term(const char *name) {
    ei_x_buff x;

    new_x(&x);
    ei_x_encode_atom(&x, name);
    return term_of_x(&x);
}

static moat_term_t *tuple_term(int arity, const char *first,
                               const char *second, const char *third) {
    ei_x_buff x;

    new_x(&x);
    ei_x_encode_tuple_header(&x, arity);
    ei_x_encode_atom(&x, first);
    if (arity > 1)
        ei_x_encode_atom(&x, second);
    if (arity > 2)
        ei_x_encode_atom(&x, third);
    return term_of_x(&x);
}

/* xorshift64*: a fixed seed makes every run see the same inputs. */
static uint64_t rng_state;

static uint64_t rng(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

/* ------------------------------------------------- the valid samples */

static const unsigned char node_atom[] = {100, 0, 3, 'a', '@', 'b'};

/* Hand-built encodings of the forms ei never writes, and OTP 25's own
 * term_to_binary output for the forms ei writes differently. */
static void add_handmade(samples_t *s) {
    static const unsigned char atom_ext[] = {131, 100, 0, 5, 'h', 'e', 'l',
                                             'l', 'o'};
    static const unsigned char atom_latin1[] = {131, 100, 0, 2, 0xE9, 0xFF};
    static const unsigned char small_atom[] = {131, 115, 2, 'o', 'k'};
    static const unsigned char atom_utf8[] = {131, 118, 0, 4, 0xF0, 0x9F,
                                              0x98, 0x80};
    static const unsigned char empty_atom[] = {131, 119, 0};
    static const unsigned char old_float[33] = {
        131, 99, '1', '.', '5', '0', '0', '0', '0', '0', '0', '0', '0',
        '0', '0', '0', '0', '0', '0', '0', '0', '0', '0', 'e', '+', '0',
        '0'};
    static const unsigned char old_float_neg[33] = {131, 99, '-', '2', '.',
                                                    '5', 'e', '-', '3'};
    static const unsigned char list_zero[] = {131, 108, 0, 0, 0, 0, 97, 7};
    static const unsigned char bits8[] = {131, 77, 0, 0, 0, 1, 8, 255};
    static const unsigned char bits_empty[] = {131, 77, 0, 0, 0, 0, 0};
    static const unsigned char big_zero[] = {131, 110, 0, 0};
    static const unsigned char integer_export[] = {
        131, 113, 100, 0, 1, 'm', 100, 0, 1, 'f', 98, 0, 0, 0, 3};
    /* term_to_binary on OTP 25 */
    static const unsigned char otp_shutdown[] = {
        131, 104, 2, 100, 0, 8, 115, 104, 117, 116, 100,
        111, 119, 110, 100, 0, 1, 120};
    static const unsigned char otp_big[] = {131, 110, 9, 0, 0, 0, 0, 0, 0,
                                            0, 0, 0, 64};
    static const unsigned char otp_pid[] = {
        131, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104,
        111, 115, 116, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0};
    static const unsigned char otp_ref[] = {
        131, 90, 0, 3, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111,
        104, 111, 115, 116, 0, 0, 0, 0, 0, 3, 249, 169, 69, 168, 0, 2, 246,
        94, 1, 170};
    static const unsigned char otp_port[] = {
        131, 89, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110,
        111, 104, 111, 115, 116, 0, 0, 0, 0, 0, 0, 0, 0};
    static const unsigned char otp_map[] = {131, 116, 0, 0, 0, 1, 100, 0,
                                            1, 97, 97, 1};
    static const unsigned char otp_export[] = {
        131, 113, 100, 0, 5, 108, 105, 115, 116, 115, 100,
        0, 3, 109, 97, 112, 97, 2};
    static const unsigned char otp_bits[] = {131, 77, 0, 0, 0, 1, 3, 32};
    static const unsigned char otp_improper[] = {131, 108, 0, 0, 0, 1,
                                                 97, 1, 97, 2};
    /* fun() -> X end with X = 42, from the shell (an erl_eval closure) */
    static const unsigned char otp_fun[] = {
        131, 112, 0, 0, 0, 154, 0, 6, 83, 97, 170, 70, 21, 144, 209, 189,
        241, 235, 98, 209, 166, 235, 8, 0, 0, 0, 43, 0, 0, 0, 1, 100,
        0, 8, 101, 114, 108, 95, 101, 118, 97, 108, 97, 43, 98, 0, 50, 155,
        13, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111,
        115, 116, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 104, 6,
        97, 4, 108, 0, 0, 0, 1, 104, 2, 100, 0, 1, 88, 97, 42, 106,
        100, 0, 4, 110, 111, 110, 101, 100, 0, 4, 110, 111, 110, 101, 116, 0,
        0, 0, 0, 108, 0, 0, 0, 1, 104, 5, 100, 0, 6, 99, 108, 97,
        117, 115, 101, 97, 4, 106, 106, 108, 0, 0, 0, 1, 104, 3, 100, 0,
        3, 118, 97, 114, 97, 4, 100, 0, 1, 88, 106, 106};
    unsigned char buf[400];
    size_t i, n;

    add_bytes(s, "ATOM_EXT", atom_ext, sizeof(atom_ext));
    add_bytes(s, "ATOM_EXT latin1", atom_latin1, sizeof(atom_latin1));
    add_bytes(s, "SMALL_ATOM_EXT", small_atom, sizeof(small_atom));
    add_bytes(s, "ATOM_UTF8_EXT", atom_utf8, sizeof(atom_utf8));
    add_bytes(s, "empty atom", empty_atom, sizeof(empty_atom));
    add_bytes(s, "FLOAT_EXT", old_float, sizeof(old_float));
    add_bytes(s, "FLOAT_EXT short", old_float_neg, sizeof(old_float_neg));
    add_bytes(s, "LIST_EXT of no elements", list_zero, sizeof(list_zero));
    add_bytes(s, "BIT_BINARY_EXT 8 bits", bits8, sizeof(bits8));
    add_bytes(s, "BIT_BINARY_EXT empty", bits_empty, sizeof(bits_empty));
    add_bytes(s, "SMALL_BIG_EXT zero", big_zero, sizeof(big_zero));
    add_bytes(s, "EXPORT_EXT INTEGER arity", integer_export,
              sizeof(integer_export));
    add_bytes(s, "OTP {shutdown, x}", otp_shutdown, sizeof(otp_shutdown));
    add_bytes(s, "OTP 1 bsl 70", otp_big, sizeof(otp_big));
    add_bytes(s, "OTP pid", otp_pid, sizeof(otp_pid));
    add_bytes(s, "OTP ref", otp_ref, sizeof(otp_ref));
    add_bytes(s, "OTP port", otp_port, sizeof(otp_port));
    add_bytes(s, "OTP map", otp_map, sizeof(otp_map));
    add_bytes(s, "OTP export fun", otp_export, sizeof(otp_export));
    add_bytes(s, "OTP bitstring", otp_bits, sizeof(otp_bits));
    add_bytes(s, "OTP improper list", otp_improper, sizeof(otp_improper));
    add_bytes(s, "OTP closure", otp_fun, sizeof(otp_fun));

    /* LARGE_BIG_EXT: 300 digit bytes, negative */
    n = 0;
    buf[n++] = 131;
    buf[n++] = 111;
    buf[n++] = 0, buf[n++] = 0, buf[n++] = 1, buf[n++] = 44;
    buf[n++] = 1;
    for (i = 0; i < 300; i++)
        buf[n++] = (unsigned char)i;
    add_bytes(s, "LARGE_BIG_EXT", buf, n);

    /* PID_EXT, PORT_EXT, REFERENCE_EXT, NEW_REFERENCE_EXT, V4_PORT_EXT */
    n = 0;
    buf[n++] = 131, buf[n++] = 103;
    memcpy(buf + n, node_atom, sizeof(node_atom)), n += sizeof(node_atom);
    memset(buf + n, 1, 9), n += 9;
    add_bytes(s, "PID_EXT", buf, n);
    n = 0;
    buf[n++] = 131, buf[n++] = 102;
    memcpy(buf + n, node_atom, sizeof(node_atom)), n += sizeof(node_atom);
    memset(buf + n, 1, 5), n += 5;
    add_bytes(s, "PORT_EXT", buf, n);
    n = 0;
    buf[n++] = 131, buf[n++] = 101;
    memcpy(buf + n, node_atom, sizeof(node_atom)), n += sizeof(node_atom);
    memset(buf + n, 1, 5), n += 5;
    add_bytes(s, "REFERENCE_EXT", buf, n);
    n = 0;
    buf[n++] = 131, buf[n++] = 114, buf[n++] = 0, buf[n++] = 5;
    memcpy(buf + n, node_atom, sizeof(node_atom)), n += sizeof(node_atom);
    memset(buf + n, 2, 1 + 20), n += 21;
    add_bytes(s, "NEW_REFERENCE_EXT", buf, n);
    n = 0;
    buf[n++] = 131, buf[n++] = 120;
    memcpy(buf + n, node_atom, sizeof(node_atom)), n += sizeof(node_atom);
    memset(buf + n, 3, 12), n += 12;
    add_bytes(s, "V4_PORT_EXT", buf, n);
}

static void add_ei_made(samples_t *s) {
    static const char bytes[] = {1, 2, 3, 4, 5};
    char utf8[301];
    erlang_pid pid;
    erlang_port port;
    erlang_ref ref;
    erlang_fun fun;
    ei_x_buff x, vars;
    int i;

#define ADD(what, encode)                                                   \
    do {                                                                    \
        new_x(&x);                                                          \
        assert_int_equal((encode), 0);                                      \
        add_x(s, what, &x);                                                 \
    } while (0)

    ADD("SMALL_INTEGER_EXT", ei_x_encode_long(&x, 255));
    ADD("INTEGER_EXT", ei_x_encode_long(&x, -2147483647L - 1));
    ADD("SMALL_BIG_EXT", ei_x_encode_longlong(&x, 1LL << 40));
    ADD("SMALL_BIG_EXT max", ei_x_encode_ulonglong(&x, UINT64_MAX));
    ADD("SMALL_BIG_EXT min", ei_x_encode_longlong(&x, INT64_MIN));
    ADD("NEW_FLOAT_EXT", ei_x_encode_double(&x, 1.5));
    ADD("NEW_FLOAT_EXT -0", ei_x_encode_double(&x, -0.0));
    ADD("NEW_FLOAT_EXT max", ei_x_encode_double(&x, 1.7976931348623157e308));
    ADD("SMALL_ATOM_UTF8_EXT", ei_x_encode_atom(&x, "hello"));
    for (i = 0; i < 150; i++)
        memcpy(utf8 + 2 * i, "\xC3\xA9", 2); /* é, 300 bytes */
    utf8[300] = '\0';
    ADD("ATOM_UTF8_EXT 300 bytes",
        ei_x_encode_atom_len_as(&x, utf8, 300, ERLANG_UTF8, ERLANG_UTF8));
    ADD("boolean", ei_x_encode_boolean(&x, 1));
    ADD("SMALL_TUPLE_EXT empty", ei_x_encode_tuple_header(&x, 0));
    ADD("NIL_EXT", ei_x_encode_empty_list(&x));
    ADD("STRING_EXT", ei_x_encode_string(&x, "hello"));
    ADD("BINARY_EXT", ei_x_encode_binary(&x, bytes, sizeof(bytes)));
    ADD("BINARY_EXT empty", ei_x_encode_binary(&x, bytes, 0));
    ADD("BIT_BINARY_EXT", ei_x_encode_bitstring(&x, bytes, 0, 13));
    ADD("MAP_EXT empty", ei_x_encode_map_header(&x, 0));

    new_x(&x);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_long(&x, 1);
    ei_x_encode_string(&x, "x");
    add_x(s, "SMALL_TUPLE_EXT", &x);

    new_x(&x);
    ei_x_encode_tuple_header(&x, 300);
    for (i = 0; i < 300; i++)
        ei_x_encode_long(&x, i);
    add_x(s, "LARGE_TUPLE_EXT", &x);

    new_x(&x);
    ei_x_encode_list_header(&x, 3);
    ei_x_encode_long(&x, 1);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_binary(&x, bytes, 0);
    ei_x_encode_empty_list(&x);
    add_x(s, "LIST_EXT proper", &x);

    new_x(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_atom(&x, "b");
    add_x(s, "LIST_EXT improper", &x);

    new_x(&x);
    ei_x_encode_map_header(&x, 2);
    ei_x_encode_atom(&x, "k");
    ei_x_encode_long(&x, 1);
    ei_x_encode_binary(&x, bytes, 2);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_long(&x, 2);
    ei_x_encode_empty_list(&x);
    add_x(s, "MAP_EXT", &x);

    memset(&pid, 0, sizeof(pid));
    strcpy(pid.node, "moat@host");
    pid.num = 7;
    pid.serial = 1;
    pid.creation = 0x12345678;
    ADD("NEW_PID_EXT", ei_x_encode_pid(&x, &pid));

    memset(&port, 0, sizeof(port));
    strcpy(port.node, "moat@host");
    port.id = 12;
    port.creation = 3;
    ADD("NEW_PORT_EXT", ei_x_encode_port(&x, &port));
    port.id = 1ULL << 40;
    ADD("V4_PORT_EXT", ei_x_encode_port(&x, &port));

    memset(&ref, 0, sizeof(ref));
    strcpy(ref.node, "moat@host");
    ref.len = 3;
    ref.n[0] = 1, ref.n[1] = 2, ref.n[2] = 3;
    ref.creation = 9;
    ADD("NEWER_REFERENCE_EXT", ei_x_encode_ref(&x, &ref));

    /* A closure with two free variables, encoded without version bytes. */
    assert_int_equal(ei_x_new(&vars), 0);
    ei_x_encode_atom(&vars, "free");
    ei_x_encode_tuple_header(&vars, 2);
    ei_x_encode_long(&vars, 1);
    ei_x_encode_empty_list(&vars);
    memset(&fun, 0, sizeof(fun));
    fun.type = EI_FUN_CLOSURE;
    fun.arity = 2;
    strcpy(fun.module, "mod");
    memset(fun.u.closure.md5, 0xAB, sizeof(fun.u.closure.md5));
    fun.u.closure.index = 1;
    fun.u.closure.old_index = 2;
    fun.u.closure.uniq = 3;
    fun.u.closure.n_free_vars = 2;
    fun.u.closure.pid = pid;
    fun.u.closure.free_var_len = vars.index;
    fun.u.closure.free_vars = vars.buff;
    ADD("NEW_FUN_EXT", ei_x_encode_fun(&x, &fun));
    fun.u.closure.n_free_vars = 0;
    fun.u.closure.free_var_len = 0;
    ADD("NEW_FUN_EXT without free variables", ei_x_encode_fun(&x, &fun));
    ei_x_free(&vars);

    memset(&fun, 0, sizeof(fun));
    fun.type = EI_FUN_EXPORT;
    fun.arity = 3;
    strcpy(fun.module, "lists");
    fun.u.exprt.func = "foldl";
    ADD("EXPORT_EXT", ei_x_encode_fun(&x, &fun));

    new_x(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_map_header(&x, 1);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_tuple_header(&x, 1);
    ei_x_encode_binary(&x, bytes, 1);
    ei_x_encode_empty_list(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_atom(&x, "b");
    add_x(s, "nested", &x);
#undef ADD
}

static samples_t valid_samples(void) {
    samples_t s = {NULL, 0, 0};

    add_ei_made(&s);
    add_handmade(&s);
    return s;
}

/* ----------------------------------------------------------- atoms */

static void test_atom_static_terms_encode_their_names(void **state) {
    static const char *names[MOAT_A__COUNT] = {
        "normal", "shutdown", "kill", "killed", "noproc",
        "timeout", "overloaded", "badarg", "noconnection", "ok", "enomem"};
    char name[MAXATOMLEN_UTF8];
    const char *data;
    size_t len;
    int a, b, index;

    (void)state;
    for (a = 0; a < MOAT_A__COUNT; a++) {
        moat_term_t *t = moat_atom((moat_atom_t)a);

        assert_non_null(t);
        data = moat_term_data(t, &len);
        assert_int_equal(moat_etf_check(data, len), 0);
        index = 1;
        assert_int_equal(ei_decode_atom_as(data, &index, name, sizeof(name),
                                           ERLANG_UTF8, NULL, NULL),
                         0);
        assert_string_equal(name, names[a]);
        assert_int_equal((size_t)index, len);
        for (b = 0; b < MOAT_A__COUNT; b++)
            assert_int_equal(moat_term_is(t, (moat_atom_t)b), a == b);
    }
}

static void test_atom_ref_and_unref_do_nothing(void **state) {
    moat_term_t *t = moat_atom(MOAT_A_KILLED);
    const char *data;
    size_t len;
    int i;

    (void)state;
    for (i = 0; i < 5; i++)
        assert_ptr_equal(moat_term_ref(t), t);
    for (i = 0; i < 100; i++)
        moat_term_unref(t);
    data = moat_term_data(t, &len);
    assert_int_equal(moat_etf_check(data, len), 0);
    assert_true(moat_term_is(t, MOAT_A_KILLED));
}

static void test_atom_out_of_range_is_null(void **state) {
    (void)state;
    assert_null(moat_atom(MOAT_A__COUNT));
    assert_null(moat_atom((moat_atom_t)-1));
}

static void test_atom_is_found_in_every_encoding(void **state) {
    static const unsigned char enc[4][10] = {
        {131, 100, 0, 6, 'n', 'o', 'r', 'm', 'a', 'l'},
        {131, 115, 6, 'n', 'o', 'r', 'm', 'a', 'l'},
        {131, 118, 0, 6, 'n', 'o', 'r', 'm', 'a', 'l'},
        {131, 119, 6, 'n', 'o', 'r', 'm', 'a', 'l'}};
    static const size_t lens[4] = {10, 9, 10, 9};
    int i;

    (void)state;
    for (i = 0; i < 4; i++) {
        moat_term_t *t = term_of(enc[i], lens[i]);

        assert_true(moat_term_is(t, MOAT_A_NORMAL));
        assert_false(moat_term_is(t, MOAT_A_SHUTDOWN));
        assert_false(moat_term_is_abnormal(t));
        moat_term_unref(t);
    }
}

static void test_atom_is_false_for_other_terms(void **state) {
    moat_term_t *t;
    ei_x_buff x;

    (void)state;
    t = atom_term("normalx");
    assert_false(moat_term_is(t, MOAT_A_NORMAL));
    moat_term_unref(t);
    t = atom_term("norma");
    assert_false(moat_term_is(t, MOAT_A_NORMAL));
    moat_term_unref(t);
    new_x(&x);
    ei_x_encode_binary(&x, "ok", 2);
    t = term_of_x(&x);
    assert_false(moat_term_is(t, MOAT_A_OK));
    assert_false(moat_term_is(t, MOAT_A__COUNT));
    moat_term_unref(t);
}

/* ------------------------------------------------------- abnormal */

static void test_abnormal_normal_is_not(void **state) {
    moat_term_t *t = atom_term("normal");

    (void)state;
    assert_false(moat_term_is_abnormal(moat_atom(MOAT_A_NORMAL)));
    assert_false(moat_term_is_abnormal(t));
    moat_term_unref(t);
}

static void test_abnormal_shutdown_is_not(void **state) {
    moat_term_t *t = atom_term("shutdown");

    (void)state;
    assert_false(moat_term_is_abnormal(moat_atom(MOAT_A_SHUTDOWN)));
    assert_false(moat_term_is_abnormal(t));
    moat_term_unref(t);
}

static void test_abnormal_shutdown_pair_is_not(void **state) {
    /* {shutdown, {a, "b"}} as a LARGE_TUPLE_EXT, which is still a pair */
    static const unsigned char large[] = {
        131, 105, 0, 0, 0, 2, 100, 0, 8, 's', 'h', 'u', 't', 'd', 'o', 'w',
        'n', 104, 2, 119, 1, 'a', 107, 0, 1, 'b'};
    moat_term_t *t = tuple_term(2, "shutdown", "x", NULL);

    (void)state;
    assert_false(moat_term_is_abnormal(t));
    assert_false(moat_term_is(t, MOAT_A_SHUTDOWN));
    moat_term_unref(t);
    t = term_of(large, sizeof(large));
    assert_false(moat_term_is_abnormal(t));
    moat_term_unref(t);
}

static void test_abnormal_shutdown_triple_is(void **state) {
    moat_term_t *t = tuple_term(3, "shutdown", "a", "b");

    (void)state;
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
    t = tuple_term(1, "shutdown", NULL, NULL);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
}

static void test_abnormal_killed_and_noproc_are(void **state) {
    static const moat_atom_t abnormal[] = {
        MOAT_A_KILL, MOAT_A_KILLED, MOAT_A_NOPROC, MOAT_A_TIMEOUT,
        MOAT_A_OVERLOADED, MOAT_A_BADARG, MOAT_A_NOCONNECTION, MOAT_A_OK,
        MOAT_A_ENOMEM};
    moat_term_t *t;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(abnormal) / sizeof(abnormal[0]); i++)
        assert_true(moat_term_is_abnormal(moat_atom(abnormal[i])));
    t = atom_term("killed");
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
    t = atom_term("noproc");
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
}

static void test_abnormal_other_terms_are(void **state) {
    moat_term_t *t;
    ei_x_buff x;

    (void)state;
    t = tuple_term(2, "normal", "x", NULL); /* {normal, x} */
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
    t = tuple_term(2, "x", "shutdown", NULL); /* {x, shutdown} */
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
    t = tuple_term(1, "normal", NULL, NULL); /* {normal} */
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
    t = atom_term("shutdown_now");
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);

    new_x(&x); /* [shutdown] */
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, "shutdown");
    ei_x_encode_empty_list(&x);
    t = term_of_x(&x);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);

    new_x(&x); /* "normal" */
    ei_x_encode_string(&x, "normal");
    t = term_of_x(&x);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);

    new_x(&x); /* <<"shutdown">> */
    ei_x_encode_binary(&x, "shutdown", 8);
    t = term_of_x(&x);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);

    new_x(&x); /* {"shutdown", x}: a string is not the atom */
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_string(&x, "shutdown");
    ei_x_encode_atom(&x, "x");
    t = term_of_x(&x);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);

    new_x(&x);
    ei_x_encode_long(&x, 42);
    t = term_of_x(&x);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);
}

/* --------------------------------------------------------- terms */

static int releases;

static void count_release(void *opaque) {
    int *counter = opaque;

    (*counter)++;
}

static void test_term_new_copies_the_bytes(void **state) {
    char buf[16];
    const char *data;
    moat_term_t *t;
    ei_x_buff x;
    size_t len;

    (void)state;
    new_x(&x);
    ei_x_encode_atom(&x, "abc");
    memcpy(buf, x.buff, (size_t)x.index);
    t = term_of(buf, (size_t)x.index);
    memset(buf, 0, sizeof(buf));
    data = moat_term_data(t, &len);
    assert_int_equal(len, (size_t)x.index);
    assert_memory_equal(data, x.buff, len);
    assert_ptr_not_equal(data, buf);
    ei_x_free(&x);
    moat_term_unref(t);
}

static void test_term_new_rejects_malformed_bytes(void **state) {
    static const char bad[] = {(char)131, 'h', 2, 'a', 1};
    int err = 0;

    (void)state;
    assert_null(moat_term_new(bad, sizeof(bad), &err));
    assert_int_equal(err, MOAT_EBADTERM);
    assert_null(moat_term_new(bad, 0, NULL));
    assert_null(moat_term_new(NULL, 0, &err));
    assert_int_equal(err, MOAT_EBADTERM);
}

/* list1 wraps one encoded term (no version byte) into a checked [T]. */
static void test_term_list1_wraps_one_term(void **state) {
    ei_x_buff x;
    moat_term_t *t;
    const char *d;
    size_t len;
    int index = 0, version, arity;
    char atom[MAXATOMLEN];
    (void)state;
    ei_x_new(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "hello");
    ei_x_encode_long(&x, 1234567);
    t = moat_term_list1(x.buff, (size_t)x.index);
    assert_non_null(t);
    d = moat_term_data(t, &len);
    assert_int_equal(moat_etf_check(d, len), 0);
    assert_int_equal(ei_decode_version(d, &index, &version), 0);
    assert_int_equal(ei_decode_list_header(d, &index, &arity), 0);
    assert_int_equal(arity, 1);
    assert_int_equal(ei_decode_tuple_header(d, &index, &arity), 0);
    assert_int_equal(arity, 2);
    assert_int_equal(ei_decode_atom(d, &index, atom), 0);
    assert_string_equal(atom, "hello");
    moat_term_unref(t);
    ei_x_free(&x);
}

static void test_term_refcount_frees_at_last_unref(void **state) {
    static const char data[] = {(char)131, 'a', 1};
    moat_term_t *t;
    int count = 0, i;

    (void)state;
    t = moat_term_wrap(data, sizeof(data), count_release, &count);
    assert_non_null(t);
    for (i = 0; i < 3; i++)
        assert_ptr_equal(moat_term_ref(t), t);
    for (i = 0; i < 3; i++) {
        moat_term_unref(t);
        assert_int_equal(count, 0);
    }
    moat_term_unref(t);
    assert_int_equal(count, 1);
    moat_term_unref(NULL);
    assert_null(moat_term_ref(NULL));
}

static void test_term_wrap_without_release(void **state) {
    static const char data[] = {(char)131, 'w', 2, 'o', 'k'};
    moat_term_t *t = moat_term_wrap(data, sizeof(data), NULL, NULL);
    size_t len;

    (void)state;
    assert_non_null(t);
    assert_ptr_equal(moat_term_data(t, &len), data);
    assert_int_equal(len, sizeof(data));
    assert_true(moat_term_is(t, MOAT_A_OK));
    assert_ptr_equal(moat_term_data(t, NULL), data);
    moat_term_unref(t);
}

static void test_term_from_x_takes_the_buffer(void **state) {
    moat_term_t *t;
    ei_x_buff x;
    const char *data;
    char *buff;
    size_t len;

    (void)state;
    new_x(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "shutdown");
    ei_x_encode_long(&x, 5);
    buff = x.buff;
    t = moat_term_from_x(&x);
    assert_non_null(t);
    assert_null(x.buff);
    data = moat_term_data(t, &len);
    assert_ptr_equal(data, buff);
    assert_int_equal(moat_etf_check(data, len), 0);
    assert_false(moat_term_is_abnormal(t));
    moat_term_unref(t); /* frees ei's buffer: valgrind would say otherwise */
    assert_null(moat_term_from_x(&x));
}

static void test_term_tagged_binary_encodes_a_pair(void **state) {
    static const char msg[] = "bad\0size";
    char tag[MAXATOMLEN_UTF8];
    const char *data;
    const char *bin;
    moat_term_t *t;
    int index = 1, arity, type, size;
    size_t len;

    (void)state;
    t = moat_term_tagged_binary("native_error", msg, sizeof(msg) - 1);
    assert_non_null(t);
    data = moat_term_data(t, &len);
    assert_int_equal(moat_etf_check(data, len), 0);
    assert_int_equal(ei_decode_tuple_header(data, &index, &arity), 0);
    assert_int_equal(arity, 2);
    assert_int_equal(ei_decode_atom_as(data, &index, tag, sizeof(tag),
                                       ERLANG_UTF8, NULL, NULL),
                     0);
    assert_string_equal(tag, "native_error");
    assert_int_equal(ei_get_type(data, &index, &type, &size), 0);
    assert_int_equal(type, ERL_BINARY_EXT);
    assert_int_equal(size, (int)sizeof(msg) - 1);
    bin = data + index + 5;
    assert_memory_equal(bin, msg, sizeof(msg) - 1);
    assert_int_equal((size_t)index + 5 + (size_t)size, len);
    assert_true(moat_term_is_abnormal(t));
    moat_term_unref(t);

    t = moat_term_tagged_binary("shutdown", NULL, 0);
    assert_non_null(t);
    data = moat_term_data(t, &len);
    assert_int_equal(moat_etf_check(data, len), 0);
    assert_false(moat_term_is_abnormal(t)); /* {shutdown, <<>>} */
    moat_term_unref(t);
}

static void test_term_tagged_binary_rejects_bad_tags(void **state) {
    char tag[257];

    (void)state;
    memset(tag, 'a', 256);
    tag[256] = '\0';
    assert_null(moat_term_tagged_binary(tag, "x", 1));
    tag[255] = '\0';
    moat_term_unref(moat_term_tagged_binary(tag, "x", 1)); /* 255 is fine */
    assert_null(moat_term_tagged_binary("\xC0\x80", "x", 1));
    assert_null(moat_term_tagged_binary(NULL, "x", 1));
    assert_null(moat_term_tagged_binary("error", NULL, 1));
}

static void test_term_equal_compares_encodings(void **state) {
    moat_term_t *a = atom_term("ok"), *b = atom_term("ok");
    moat_term_t *c = atom_term("ko");
    static const unsigned char latin1_ok[] = {131, 100, 0, 2, 'o', 'k'};
    moat_term_t *d = term_of(latin1_ok, sizeof(latin1_ok));

    (void)state;
    assert_true(moat_term_equal(a, a));
    assert_true(moat_term_equal(a, b));
    assert_true(moat_term_equal(a, moat_atom(MOAT_A_OK)));
    assert_false(moat_term_equal(a, c));
    /* the same atom, another encoding: equal as a term, not as bytes */
    assert_false(moat_term_equal(a, d));
    assert_true(moat_term_is(d, MOAT_A_OK));
    moat_term_unref(a);
    moat_term_unref(b);
    moat_term_unref(c);
    moat_term_unref(d);
}

#define SHARE_THREADS 4
#define SHARE_ROUNDS 20000

static void share_worker(void *arg) {
    moat_term_t *t = arg;
    int i;

    for (i = 0; i < SHARE_ROUNDS; i++) {
        moat_term_ref(t);
        assert_true(moat_term_is(t, MOAT_A_SHUTDOWN) == 0);
        moat_term_unref(t);
    }
    moat_term_unref(t); /* the reference the main thread gave this one */
}

static void test_term_threads_share_a_term(void **state) {
    static const char data[] = {(char)131, 'a', 7};
    uv_thread_t threads[SHARE_THREADS];
    moat_term_t *t;
    int i;

    (void)state;
    releases = 0;
    t = moat_term_wrap(data, sizeof(data), count_release, &releases);
    assert_non_null(t);
    for (i = 0; i < SHARE_THREADS; i++) {
        moat_term_ref(t);
        assert_int_equal(uv_thread_create(&threads[i], share_worker, t), 0);
    }
    moat_term_unref(t);
    for (i = 0; i < SHARE_THREADS; i++)
        assert_int_equal(uv_thread_join(&threads[i]), 0);
    assert_int_equal(releases, 1);
}

/* ------------------------------------------------------ etf check */

static void test_etf_check_accepts_every_type(void **state) {
    samples_t s = valid_samples();
    size_t i;

    (void)state;
    for (i = 0; i < s.n; i++) {
        if (check_exact(s.v[i].buf, s.v[i].len) != 0)
            fail_msg("rejected valid %s", s.v[i].what);
    }
    free_samples(&s);
}

static void test_etf_check_rejects_every_truncation(void **state) {
    samples_t s = valid_samples();
    size_t i, n;

    (void)state;
    for (i = 0; i < s.n; i++)
        for (n = 0; n < s.v[i].len; n++)
            if (check_exact(s.v[i].buf, n) != MOAT_EBADTERM)
                fail_msg("accepted %s cut to %zu of %zu bytes", s.v[i].what,
                         n, s.v[i].len);
    free_samples(&s);
}

static void test_etf_check_rejects_trailing_bytes(void **state) {
    samples_t s = valid_samples();
    char *buf;
    size_t i;

    (void)state;
    for (i = 0; i < s.n; i++) {
        buf = malloc(s.v[i].len + 1);
        assert_non_null(buf);
        memcpy(buf, s.v[i].buf, s.v[i].len);
        buf[s.v[i].len] = 'j';
        if (check_exact(buf, s.v[i].len + 1) != MOAT_EBADTERM)
            fail_msg("accepted %s followed by []", s.v[i].what);
        free(buf);
    }
    free_samples(&s);
}

static void test_etf_check_rejects_bad_versions(void **state) {
    static const unsigned char v130[] = {130, 106};
    static const unsigned char only_version[] = {131};
    static const unsigned char two_terms[] = {131, 106, 106};

    (void)state;
    assert_int_equal(moat_etf_check(NULL, 0), MOAT_EBADTERM);
    assert_int_equal(moat_etf_check(NULL, 5), MOAT_EBADTERM);
    assert_int_equal(check_exact("", 0), MOAT_EBADTERM);
    assert_int_equal(check_exact((const char *)v130, 2), MOAT_EBADTERM);
    assert_int_equal(check_exact((const char *)only_version, 1),
                     MOAT_EBADTERM);
    assert_int_equal(check_exact((const char *)two_terms, 3), MOAT_EBADTERM);
}

static void expect_bad(const void *buf, size_t len, const char *what) {
    if (check_exact(buf, len) != MOAT_EBADTERM)
        fail_msg("accepted %s", what);
}

#define EXPECT_BAD(what, ...)                                               \
    do {                                                                    \
        static const unsigned char b_[] = {__VA_ARGS__};                    \
        expect_bad(b_, sizeof(b_), what);                                   \
    } while (0)

static void test_etf_check_rejects_unsupported_tags(void **state) {
    /* term_to_binary(lists:duplicate(100, 0), [compressed]) */
    static const unsigned char compressed[] = {
        131, 80, 0, 0, 0, 103, 120, 156, 203, 102, 72, 97, 160, 3,
        0, 0, 82, 232, 0, 208};
    int tag;
    unsigned char buf[2];

    (void)state;
    expect_bad(compressed, sizeof(compressed), "a compressed term");
    EXPECT_BAD("ATOM_CACHE_REF", 131, 82, 0);
    EXPECT_BAD("FUN_EXT", 131, 117, 0, 0, 0, 0, 103, 100, 0, 1, 'a', 0, 0,
               0, 1, 0, 0, 0, 0, 0, 100, 0, 1, 'm', 97, 1, 97, 1);
    EXPECT_BAD("DIST_HEADER", 131, 68, 0);
    EXPECT_BAD("LOCAL_EXT", 131, 121, 0, 0, 0, 0, 0, 0, 0, 0, 106);
    EXPECT_BAD("a node that is not an atom", 131, 88, 97, 1, 0, 0, 0, 1, 0,
               0, 0, 0, 0, 0, 0, 0);
    /* every byte that is not a tag, alone after the version */
    for (tag = 0; tag < 256; tag++) {
        if (tag == 106) /* NIL_EXT is a whole term */
            continue;
        buf[0] = 131;
        buf[1] = (unsigned char)tag;
        expect_bad(buf, 2, "a lone tag");
    }
}

static void test_etf_check_rejects_bad_atoms(void **state) {
    unsigned char buf[4 + 1024 + 4];
    size_t i;

    (void)state;
    EXPECT_BAD("truncated UTF-8", 131, 119, 1, 0xC3);
    EXPECT_BAD("a bad continuation byte", 131, 119, 2, 0xC3, 0x28);
    EXPECT_BAD("an overlong NUL", 131, 119, 2, 0xC0, 0x80);
    EXPECT_BAD("an overlong slash", 131, 119, 3, 0xE0, 0x80, 0xAF);
    EXPECT_BAD("a surrogate", 131, 119, 3, 0xED, 0xA0, 0x80);
    EXPECT_BAD("a code point past U+10FFFF", 131, 119, 4, 0xF4, 0x90, 0x80,
               0x80);
    EXPECT_BAD("a 5-byte sequence", 131, 119, 5, 0xF8, 0x88, 0x80, 0x80,
               0x80);
    EXPECT_BAD("a lone continuation", 131, 118, 0, 1, 0x80);

    /* ATOM_EXT of 256 latin1 bytes: one too many */
    buf[0] = 131, buf[1] = 100, buf[2] = 1, buf[3] = 0;
    memset(buf + 4, 'a', 256);
    expect_bad(buf, 4 + 256, "ATOM_EXT of 256 bytes");
    buf[2] = 0, buf[3] = 255;
    assert_int_equal(check_exact((char *)buf, 4 + 255), 0);

    /* ATOM_UTF8_EXT: 255 four-byte characters pass, 256 do not */
    buf[0] = 131, buf[1] = 118;
    for (i = 0; i < 256; i++)
        memcpy(buf + 4 + 4 * i, "\xF0\x9F\x98\x80", 4);
    buf[2] = (unsigned char)((255 * 4) >> 8), buf[3] = (unsigned char)(255 * 4);
    assert_int_equal(check_exact((char *)buf, 4 + 255 * 4), 0);
    buf[2] = (unsigned char)((256 * 4) >> 8), buf[3] = (unsigned char)(256 * 4);
    expect_bad(buf, 4 + 256 * 4, "an atom of 256 characters");
}

static void test_etf_check_rejects_bad_fields(void **state) {
    static const unsigned char fun_ok[] = {
        131, 112, 0, 0, 0, 56, 1, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB,
        0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0, 0,
        0, 1, 0, 0, 0, 1, 119, 1, 'm', 97, 0, 97, 0, 88, 100, 0, 3, 'a',
        '@', 'b', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 106};
    unsigned char fun[sizeof(fun_ok)];

    (void)state;
    /* the sample itself is well-formed */
    assert_int_equal(check_exact((const char *)fun_ok, sizeof(fun_ok)), 0);
    memcpy(fun, fun_ok, sizeof(fun));
    fun[5] = 57;
    expect_bad(fun, sizeof(fun), "a fun whose Size is one too many");
    fun[5] = 55;
    expect_bad(fun, sizeof(fun), "a fun whose Size is one too few");
    fun[5] = 0xFF;
    expect_bad(fun, sizeof(fun), "a fun whose Size passes the end");
    memcpy(fun, fun_ok, sizeof(fun));
    fun[30] = 2;
    expect_bad(fun, sizeof(fun), "a fun with a free variable too many");
    memcpy(fun, fun_ok, sizeof(fun));
    fun[34] = 110; /* OldIndex as a small big */
    expect_bad(fun, sizeof(fun), "a fun with a big OldIndex");

    EXPECT_BAD("BIT_BINARY_EXT empty with bits", 131, 77, 0, 0, 0, 0, 1);
    EXPECT_BAD("BIT_BINARY_EXT with 0 bits", 131, 77, 0, 0, 0, 1, 0, 1);
    EXPECT_BAD("BIT_BINARY_EXT with 9 bits", 131, 77, 0, 0, 0, 1, 9, 1);
    EXPECT_BAD("SMALL_BIG_EXT sign 2", 131, 110, 1, 2, 5);
    EXPECT_BAD("LARGE_BIG_EXT sign 2", 131, 111, 0, 0, 0, 1, 2, 5);
    EXPECT_BAD("NEW_FLOAT_EXT infinity", 131, 70, 0x7F, 0xF0, 0, 0, 0, 0, 0,
               0);
    EXPECT_BAD("NEW_FLOAT_EXT NaN", 131, 70, 0xFF, 0xF8, 0, 0, 0, 0, 0, 1);
    EXPECT_BAD("FLOAT_EXT without a fraction", 131, 99, '1', 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0);
    EXPECT_BAD("FLOAT_EXT with a space", 131, 99, ' ', '1', '.', '5', 0, 0,
               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0);
    EXPECT_BAD("FLOAT_EXT overflowing", 131, 99, '1', '.', '0', 'e', '9',
               '9', '9', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0, 0, 0);
    EXPECT_BAD("FLOAT_EXT inf", 131, 99, 'i', 'n', 'f', 0, 0, 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
               0);
    EXPECT_BAD("FLOAT_EXT without a NUL", 131, 99, '1', '.', '0', '0', '0',
               '0', '0', '0', '0', '0', '0', '0', '0', '0', '0', '0', '0',
               '0', '0', '0', '0', '0', '0', '0', '0', '0', '0', '0', '0',
               '0', '0');
    EXPECT_BAD("NEWER_REFERENCE_EXT of no words", 131, 90, 0, 0, 100, 0, 1,
               'a', 0, 0, 0, 0);
    EXPECT_BAD("NEWER_REFERENCE_EXT of 6 words", 131, 90, 0, 6, 100, 0, 1,
               'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
               0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    EXPECT_BAD("EXPORT_EXT of arity 256", 131, 113, 100, 0, 1, 'm', 100, 0,
               1, 'f', 98, 0, 0, 1, 0);
    EXPECT_BAD("EXPORT_EXT of arity -1", 131, 113, 100, 0, 1, 'm', 100, 0,
               1, 'f', 98, 0xFF, 0xFF, 0xFF, 0xFF);
    EXPECT_BAD("EXPORT_EXT with a binary arity", 131, 113, 100, 0, 1, 'm',
               100, 0, 1, 'f', 109, 0, 0, 0, 0);
    EXPECT_BAD("MAP_EXT missing a value", 131, 116, 0, 0, 0, 1, 97, 1);
    EXPECT_BAD("LIST_EXT missing its tail", 131, 108, 0, 0, 0, 1, 97, 1);
}

/* Nesting of `depth` containers of the given kind around []. */
static void nest(ei_x_buff *x, int depth, char kind) {
    int i;

    new_x(x);
    for (i = 0; i < depth; i++) {
        if (kind == 'l')
            ei_x_encode_list_header(x, 1);
        else if (kind == 't')
            ei_x_encode_tuple_header(x, 1);
        else {
            ei_x_encode_map_header(x, 1);
            ei_x_encode_long(x, i);
        }
    }
    ei_x_encode_empty_list(x);
    if (kind == 'l')
        for (i = 0; i < depth; i++)
            ei_x_encode_empty_list(x);
}

static void test_etf_check_limits_nesting(void **state) {
    static const char kinds[] = {'l', 't', 'm'};
    ei_x_buff x;
    size_t k;

    (void)state;
    for (k = 0; k < sizeof(kinds); k++) {
        nest(&x, 10000, kinds[k]);
        assert_int_equal(check_exact(x.buff, (size_t)x.index), 0);
        ei_x_free(&x);
        nest(&x, 10001, kinds[k]);
        assert_int_equal(check_exact(x.buff, (size_t)x.index),
                         MOAT_EBADTERM);
        ei_x_free(&x);
        nest(&x, 20000, kinds[k]);
        assert_int_equal(check_exact(x.buff, (size_t)x.index),
                         MOAT_EBADTERM);
        ei_x_free(&x);
    }
    /* A long flat list is not deep. */
    new_x(&x);
    ei_x_encode_list_header(&x, 100000);
    for (k = 0; k < 100000; k++)
        ei_x_encode_empty_list(&x);
    ei_x_encode_empty_list(&x);
    assert_int_equal(check_exact(x.buff, (size_t)x.index), 0);
    ei_x_free(&x);
}

static void test_etf_check_rejects_huge_lengths(void **state) {
    (void)state;
    EXPECT_BAD("a list of 2^32-1", 131, 108, 0xFF, 0xFF, 0xFF, 0xFF, 106,
               106);
    EXPECT_BAD("a tuple of 2^32-1", 131, 105, 0xFF, 0xFF, 0xFF, 0xFF, 106);
    EXPECT_BAD("a map of 2^32-1 pairs", 131, 116, 0xFF, 0xFF, 0xFF, 0xFF,
               106, 106);
    EXPECT_BAD("a map of 2^31 pairs", 131, 116, 0x80, 0, 0, 0, 106, 106);
    EXPECT_BAD("a binary of 2^32-1", 131, 109, 0xFF, 0xFF, 0xFF, 0xFF, 1);
    EXPECT_BAD("a bitstring of 2^32-1", 131, 77, 0xFF, 0xFF, 0xFF, 0xFF, 3,
               1);
    EXPECT_BAD("a string of 65535", 131, 107, 0xFF, 0xFF, 'a');
    EXPECT_BAD("a big of 2^32-1 bytes", 131, 111, 0xFF, 0xFF, 0xFF, 0xFF, 0,
               1);
    EXPECT_BAD("a big of 255 bytes", 131, 110, 0xFF, 0, 1);
    EXPECT_BAD("an atom of 65535", 131, 118, 0xFF, 0xFF, 'a');
    EXPECT_BAD("a small atom of 255", 131, 119, 0xFF, 'a');
    EXPECT_BAD("a fun of size 2^32-1", 131, 112, 0xFF, 0xFF, 0xFF, 0xFF, 0);
    EXPECT_BAD("a fun of 2^32-1 free variables", 131, 112, 0, 0, 0, 56, 1,
               0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB,
               0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0, 0, 0, 1, 0xFF, 0xFF,
               0xFF, 0xFF, 119, 1, 'm', 97, 0, 97, 0, 88, 100, 0, 3, 'a',
               '@', 'b', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 106);
    EXPECT_BAD("a reference of 65535 words", 131, 90, 0xFF, 0xFF, 100, 0, 1,
               'a', 0, 0, 0, 0);
}

/* Random bytes, most of them after a version byte. */
static void test_etf_check_survives_random_bytes(void **state) {
    unsigned char buf[96];
    size_t len, i;
    int round, accepted = 0;

    (void)state;
    rng_state = 0x9E3779B97F4A7C15ULL;
    for (round = 0; round < 20000; round++) {
        len = rng() % sizeof(buf);
        for (i = 0; i < len; i++)
            buf[i] = (unsigned char)rng();
        if (len > 0 && round % 4 != 0)
            buf[0] = 131;
        /* bias towards real tags and small lengths so some are accepted */
        if (len > 1 && round % 2 == 0)
            buf[1] = (unsigned char)(97 + rng() % 24);
        if (check_exact((char *)buf, len) == 0)
            accepted++;
    }
    assert_true(accepted > 0);
}

/* Valid terms with a few bytes changed, inserted or removed. */
static void test_etf_check_survives_mutations(void **state) {
    samples_t s = valid_samples();
    unsigned char *buf;
    size_t i, len, pos;
    int round, k, edits, accepted = 0, rejected = 0;

    (void)state;
    rng_state = 0xD1B54A32D192ED03ULL;
    for (i = 0; i < s.n; i++) {
        buf = malloc(s.v[i].len + 8);
        assert_non_null(buf);
        for (round = 0; round < 400; round++) {
            memcpy(buf, s.v[i].buf, s.v[i].len);
            len = s.v[i].len;
            edits = 1 + (int)(rng() % 3);
            for (k = 0; k < edits; k++) {
                pos = 1 + rng() % (len > 1 ? len - 1 : 1);
                switch (rng() % 4) {
                case 0: /* a random byte */
                    if (pos < len)
                        buf[pos] = (unsigned char)rng();
                    break;
                case 1: /* a near value: lengths off by one */
                    if (pos < len)
                        buf[pos] = (unsigned char)(buf[pos] + (rng() % 2 ? 1 : -1));
                    break;
                case 2: /* insert a byte */
                    if (pos <= len && len < s.v[i].len + 8) {
                        memmove(buf + pos + 1, buf + pos, len - pos);
                        buf[pos] = (unsigned char)rng();
                        len++;
                    }
                    break;
                default: /* delete a byte */
                    if (pos < len) {
                        memmove(buf + pos, buf + pos + 1, len - pos - 1);
                        len--;
                    }
                    break;
                }
            }
            if (check_exact((char *)buf, len) == 0)
                accepted++;
            else
                rejected++;
        }
        free(buf);
    }
    assert_true(accepted > 0);
    assert_true(rejected > 0);
    free_samples(&s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_term_list1_wraps_one_term),
        cmocka_unit_test(test_atom_static_terms_encode_their_names),
        cmocka_unit_test(test_atom_ref_and_unref_do_nothing),
        cmocka_unit_test(test_atom_out_of_range_is_null),
        cmocka_unit_test(test_atom_is_found_in_every_encoding),
        cmocka_unit_test(test_atom_is_false_for_other_terms),
        cmocka_unit_test(test_abnormal_normal_is_not),
        cmocka_unit_test(test_abnormal_shutdown_is_not),
        cmocka_unit_test(test_abnormal_shutdown_pair_is_not),
        cmocka_unit_test(test_abnormal_shutdown_triple_is),
        cmocka_unit_test(test_abnormal_killed_and_noproc_are),
        cmocka_unit_test(test_abnormal_other_terms_are),
        cmocka_unit_test(test_term_new_copies_the_bytes),
        cmocka_unit_test(test_term_new_rejects_malformed_bytes),
        cmocka_unit_test(test_term_refcount_frees_at_last_unref),
        cmocka_unit_test(test_term_wrap_without_release),
        cmocka_unit_test(test_term_from_x_takes_the_buffer),
        cmocka_unit_test(test_term_tagged_binary_encodes_a_pair),
        cmocka_unit_test(test_term_tagged_binary_rejects_bad_tags),
        cmocka_unit_test(test_term_equal_compares_encodings),
        cmocka_unit_test(test_term_threads_share_a_term),
        cmocka_unit_test(test_etf_check_accepts_every_type),
        cmocka_unit_test(test_etf_check_rejects_every_truncation),
        cmocka_unit_test(test_etf_check_rejects_trailing_bytes),
        cmocka_unit_test(test_etf_check_rejects_bad_versions),
        cmocka_unit_test(test_etf_check_rejects_unsupported_tags),
        cmocka_unit_test(test_etf_check_rejects_bad_atoms),
        cmocka_unit_test(test_etf_check_rejects_bad_fields),
        cmocka_unit_test(test_etf_check_limits_nesting),
        cmocka_unit_test(test_etf_check_rejects_huge_lengths),
        cmocka_unit_test(test_etf_check_survives_random_bytes),
        cmocka_unit_test(test_etf_check_survives_mutations),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
