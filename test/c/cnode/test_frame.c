/*
 * test_frame.c: the C-node's frame decoder (c_src/cnode/frame.c) called
 * directly: what it reads from good frames of each kind, what it refuses,
 * which tags it still reads from bad ones, and that no cut or changed byte
 * makes it read out of bounds (ASan and valgrind watch those cases); and
 * the same of its decoder of distribution packets.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "frame.h"

/* ------------------------------------------------------------- helpers */

static ei_x_buff start(const char *kind, int arity) {
    ei_x_buff x;
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(ei_x_encode_tuple_header(&x, arity), 0);
    assert_int_equal(ei_x_encode_atom(&x, kind), 0);
    return x;
}

/* Decodes x and frees it; returns what the decoder returned.  The
 * frame's atoms point into x: read them only with decode_keep. */
static int decode_x(ei_x_buff *x, moat__frame_t *f) {
    int rc = moat__frame_decode(x->buff, (size_t)x->index, f);
    ei_x_free(x);
    return rc;
}

static int decode_keep(const ei_x_buff *x, moat__frame_t *f) {
    return moat__frame_decode(x->buff, (size_t)x->index, f);
}

/* {hello, #{Key => Value}} with the value encoded by `put`. */
static ei_x_buff hello1(const char *key, void (*value)(ei_x_buff *)) {
    ei_x_buff x = start("hello", 2);
    ei_x_encode_map_header(&x, 1);
    ei_x_encode_atom(&x, key);
    value(&x);
    return x;
}

/* {run, Tag, echo, [1, 2]} */
static ei_x_buff run_frame(uint64_t tag) {
    ei_x_buff x = start("run", 4);
    ei_x_encode_ulonglong(&x, tag);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_list_header(&x, 2);
    ei_x_encode_long(&x, 1);
    ei_x_encode_long(&x, 2);
    ei_x_encode_empty_list(&x);
    return x;
}

/* Checks that an entry's args are exactly [131] + list. */
static void assert_args(const moat__run_t *e, const ei_x_buff *list) {
    size_t len;
    const char *d;
    assert_non_null(e->args);
    d = moat_term_data(e->args, &len);
    assert_int_equal(len, (size_t)list->index + 1);
    assert_int_equal((unsigned char)d[0], 131);
    assert_memory_equal(d + 1, list->buff, (size_t)list->index);
}

/* ---------------------------------------------------------------- hello */

static void test_cnode_frame_hello_reads_every_option(void **state) {
    ei_x_buff x = start("hello", 2);
    moat__frame_t f;
    (void)state;
    ei_x_encode_map_header(&x, 6);
    ei_x_encode_atom(&x, "size");
    ei_x_encode_long(&x, 4);
    ei_x_encode_atom(&x, "max_queue");
    ei_x_encode_long(&x, 100000);
    ei_x_encode_atom(&x, "libraries");
    ei_x_encode_list_header(&x, 2);
    ei_x_encode_binary(&x, "/a/x.so", 7);
    ei_x_encode_binary(&x, "y.so", 4);
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "isolation");
    ei_x_encode_atom(&x, "thread");
    ei_x_encode_atom(&x, "name");
    ei_x_encode_atom(&x, "pool_a");
    ei_x_encode_atom(&x, "unknown_key"); /* ignored, whatever its value */
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_binary(&x, "v", 1);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_double(&x, 1.5);
    ei_x_encode_empty_list(&x);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__FRAME_HELLO);
    assert_int_equal(f.hello.size, 4);
    assert_int_equal(f.hello.max_queue, 100000);
    assert_int_equal(f.hello.nlibraries, 2);
    assert_string_equal(f.hello.libraries[0], "/a/x.so");
    assert_string_equal(f.hello.libraries[1], "y.so");
    assert_int_equal(f.hello.isolation, MOAT__ISOLATION_THREAD);
    assert_string_equal(f.hello.name, "pool_a");
    moat__frame_free(&f);
}

static void test_cnode_frame_hello_defaults(void **state) {
    ei_x_buff x = start("hello", 2);
    moat__frame_t f;
    (void)state;
    ei_x_encode_map_header(&x, 1);
    ei_x_encode_atom(&x, "isolation");
    ei_x_encode_atom(&x, "process"); /* read: refusing it is main's */
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.hello.size, 0);
    assert_int_equal(f.hello.max_queue, 0);
    assert_int_equal(f.hello.nlibraries, 0);
    assert_null(f.hello.libraries);
    assert_int_equal(f.hello.isolation, MOAT__ISOLATION_PROCESS);
    assert_string_equal(f.hello.name, "");
    moat__frame_free(&f);
}

static void v_size0(ei_x_buff *x) { ei_x_encode_long(x, 0); }
static void v_size_big(ei_x_buff *x) { ei_x_encode_long(x, 1025); }
static void v_neg(ei_x_buff *x) { ei_x_encode_long(x, -1); }
static void v_atom(ei_x_buff *x) { ei_x_encode_atom(x, "foo"); }
static void v_2_32(ei_x_buff *x) { ei_x_encode_ulonglong(x, 1ULL << 32); }
static void v_binary(ei_x_buff *x) { ei_x_encode_binary(x, "thread", 6); }
static void v_string(ei_x_buff *x) { ei_x_encode_string(x, "name"); }
static void v_list_of_atoms(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    ei_x_encode_atom(x, "lib");
    ei_x_encode_empty_list(x);
}
static void v_empty_path(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    ei_x_encode_binary(x, "", 0);
    ei_x_encode_empty_list(x);
}
static void v_nul_path(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    ei_x_encode_binary(x, "a\0b", 3);
    ei_x_encode_empty_list(x);
}
static void v_improper(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    ei_x_encode_binary(x, "a.so", 4);
    ei_x_encode_binary(x, "tail", 4);
}

/* Each bad option makes the frame malformed, and says which. */
static void test_cnode_frame_hello_refuses_bad_options(void **state) {
    static const struct {
        const char *key;
        void (*value)(ei_x_buff *);
        const char *why;
    } cases[] = {
        {"size", v_size0, "size"},
        {"size", v_size_big, "size"},
        {"size", v_neg, "size"},
        {"size", v_atom, "size"},
        {"max_queue", v_neg, "max_queue"},
        {"max_queue", v_2_32, "max_queue"},
        {"isolation", v_atom, "isolation"},
        {"isolation", v_binary, "isolation"},
        {"name", v_string, "name"},
        {"libraries", v_atom, "libraries"},
        {"libraries", v_string, "libraries"},
        {"libraries", v_list_of_atoms, "libraries"},
        {"libraries", v_empty_path, "empty"},
        {"libraries", v_nul_path, "NUL"},
        {"libraries", v_improper, "proper"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ei_x_buff x = hello1(cases[i].key, cases[i].value);
        moat__frame_t f;
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        assert_int_equal(f.kind, MOAT__FRAME_HELLO);
        if (strstr(f.why, cases[i].why) == NULL)
            fail_msg("case %zu: \"%s\" does not say %s", i, f.why,
                     cases[i].why);
        moat__frame_free(&f);
    }
    {
        ei_x_buff x = start("hello", 2);
        moat__frame_t f;
        ei_x_encode_list_header(&x, 0); /* not a map */
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        assert_non_null(strstr(f.why, "map"));
        moat__frame_free(&f);
        x = start("hello", 1);
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        assert_int_equal(f.kind, MOAT__FRAME_HELLO);
        moat__frame_free(&f);
    }
}

/* ------------------------------------------------------------------ run */

static void test_cnode_frame_run_reads_tag_task_args(void **state) {
    static const uint64_t tags[] = {0,          1,          255,
                                    256,        0x7fffffff, 0x80000000ULL,
                                    1ULL << 40, UINT64_MAX};
    (void)state;
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        ei_x_buff x = run_frame(tags[i]), list;
        moat__frame_t f;
        assert_int_equal(decode_keep(&x, &f), 0);
        assert_int_equal(f.kind, MOAT__FRAME_RUN);
        assert_int_equal(f.nruns, 1);
        assert_int_equal(f.runs[0].tag, tags[i]);
        assert_int_equal(f.runs[0].status, 0);
        assert_int_equal(f.runs[0].task.len, 4);
        assert_memory_equal(f.runs[0].task.name, "echo", 4);
        ei_x_new(&list);
        ei_x_encode_list_header(&list, 2);
        ei_x_encode_long(&list, 1);
        ei_x_encode_long(&list, 2);
        ei_x_encode_empty_list(&list);
        assert_args(&f.runs[0], &list);
        ei_x_free(&list);
        moat__frame_free(&f);
        ei_x_free(&x);
    }
}

/* term_to_binary's other encodings: a Latin-1 atom (ATOM_EXT), a list of
 * small integers as a string, and []. */
static void test_cnode_frame_run_reads_every_encoding(void **state) {
    /* {run, 9, 'écho', "ab"} with the atom as ATOM_EXT */
    static const unsigned char latin1[] = {131, 104, 4,   100, 0,   3,
                                           'r', 'u', 'n', 97,  9,   100,
                                           0,   5,   0xE9, 'c', 'h', 'o',
                                           ' ', 107, 0,   2,   'a', 'b'};
    static const unsigned char nil[] = {131, 104, 4,   119, 3,   'r', 'u',
                                        'n', 97,  1,   119, 4,   'e', 'c',
                                        'h', 'o', 106};
    moat__frame_t f;
    char utf8[16];
    (void)state;
    assert_int_equal(moat__frame_decode((const char *)latin1, sizeof latin1,
                                        &f),
                     0);
    assert_int_equal(f.runs[0].tag, 9);
    assert_true(f.runs[0].task.latin1);
    assert_int_equal(moat__atom_utf8(&f.runs[0].task, utf8, sizeof utf8), 6);
    assert_string_equal(utf8, "\xc3\xa9\x63ho ");
    assert_int_equal(f.runs[0].task.etf_len, 8);
    assert_memory_equal(f.runs[0].task.etf, latin1 + 11, 8);
    {
        ei_x_buff s;
        ei_x_new(&s);
        ei_x_encode_string(&s, "ab");
        assert_args(&f.runs[0], &s);
        ei_x_free(&s);
    }
    moat__frame_free(&f);
    assert_int_equal(moat__frame_decode((const char *)nil, sizeof nil, &f), 0);
    assert_int_equal(f.runs[0].status, 0);
    assert_false(f.runs[0].task.latin1);
    moat__frame_free(&f);
}

/* A run frame with a readable tag but anything else wrong keeps the tag,
 * so that it can be answered badarg. */
static void test_cnode_frame_run_bad_parts_keep_the_tag(void **state) {
    moat__frame_t f;
    ei_x_buff x;
    (void)state;
    for (int c = 0; c < 6; c++) {
        x = start("run", c == 3 ? 3 : 4);
        ei_x_encode_ulonglong(&x, 77);
        if (c == 0) { /* args not a list */
            ei_x_encode_atom(&x, "echo");
            ei_x_encode_atom(&x, "args");
        } else if (c == 1) { /* an improper list */
            ei_x_encode_atom(&x, "echo");
            ei_x_encode_list_header(&x, 1);
            ei_x_encode_atom(&x, "a");
            ei_x_encode_atom(&x, "b");
        } else if (c == 2) { /* the task is not an atom */
            ei_x_encode_binary(&x, "echo", 4);
            ei_x_encode_empty_list(&x);
        } else if (c == 3) { /* arity 3 */
            ei_x_encode_atom(&x, "echo");
        } else if (c == 4) { /* a float the BEAM cannot have, inside */
            static const char inf[] = {70, 0x7f, (char)0xf0, 0, 0, 0, 0, 0, 0};
            ei_x_encode_atom(&x, "echo");
            ei_x_encode_list_header(&x, 1);
            ei_x_append_buf(&x, inf, sizeof inf);
            ei_x_encode_empty_list(&x);
        } else { /* trailing bytes after the term */
            ei_x_encode_atom(&x, "echo");
            ei_x_encode_empty_list(&x);
            ei_x_encode_atom(&x, "extra");
        }
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        assert_int_equal(f.kind, MOAT__FRAME_RUN);
        assert_int_equal(f.nruns, 1);
        assert_int_equal(f.runs[0].tag, 77);
        assert_int_equal(f.runs[0].status, MOAT_EBADTERM);
        assert_null(f.runs[0].args);
        assert_true(f.why[0] != '\0');
        moat__frame_free(&f);
    }
    /* cut anywhere after the tag: still the tag */
    x = run_frame(1234);
    for (int cut = 13; cut < x.index; cut++) {
        assert_int_equal(moat__frame_decode(x.buff, (size_t)cut, &f),
                         MOAT_EBADTERM);
        assert_int_equal(f.nruns, 1);
        assert_int_equal(f.runs[0].tag, 1234);
        assert_int_equal(f.runs[0].status, MOAT_EBADTERM);
        moat__frame_free(&f);
    }
    ei_x_free(&x);
}

/* Arguments nested deeper than moat_etf_check allows: refused, and
 * skipping them takes no stack. */
static void test_cnode_frame_deep_arguments(void **state) {
    const int depth = 20000; /* over moat_etf_check's 10000 */
    ei_x_buff x = start("run", 4);
    moat__frame_t f;
    (void)state;
    ei_x_encode_ulonglong(&x, 5);
    ei_x_encode_atom(&x, "echo");
    for (int i = 0; i < depth; i++)
        ei_x_encode_list_header(&x, 1);
    ei_x_encode_empty_list(&x);
    for (int i = 0; i < depth; i++)
        ei_x_encode_empty_list(&x);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_int_equal(f.nruns, 1);
    assert_int_equal(f.runs[0].tag, 5);
    assert_int_equal(f.runs[0].status, MOAT_EBADTERM);
    moat__frame_free(&f);
}

static void test_cnode_frame_unreadable_tags(void **state) {
    moat__frame_t f;
    ei_x_buff x;
    (void)state;
    for (int c = 0; c < 5; c++) {
        x = start("run", c == 4 ? 1 : 4);
        if (c == 0)
            ei_x_encode_long(&x, -1);
        else if (c == 1)
            ei_x_encode_double(&x, 1.0);
        else if (c == 2)
            ei_x_encode_atom(&x, "tag");
        else if (c == 3) { /* 2^64: a bignum of nine bytes */
            static const char big[] = {110, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
            ei_x_append_buf(&x, big, sizeof big);
        }
        if (c != 4) {
            ei_x_encode_atom(&x, "echo");
            ei_x_encode_empty_list(&x);
        }
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        assert_int_equal(f.kind, MOAT__FRAME_RUN);
        assert_int_equal(f.nruns, 0);
        assert_non_null(strstr(f.why, "tag"));
        moat__frame_free(&f);
    }
}

/* ----------------------------------------------------------------- runs */

/* Good elements of a runs frame are kept beside bad ones; an element
 * without a readable tag is counted. */
static void test_cnode_frame_runs_mixed_elements(void **state) {
    ei_x_buff x = start("runs", 2);
    moat__frame_t f;
    (void)state;
    ei_x_encode_list_header(&x, 5);
    ei_x_encode_tuple_header(&x, 3); /* good */
    ei_x_encode_ulonglong(&x, 1);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "garbage"); /* untagged */
    ei_x_encode_tuple_header(&x, 3); /* bad args */
    ei_x_encode_ulonglong(&x, 2);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_atom(&x, "x");
    ei_x_encode_tuple_header(&x, 1); /* tag only */
    ei_x_encode_ulonglong(&x, 3);
    ei_x_encode_tuple_header(&x, 3); /* good */
    ei_x_encode_ulonglong(&x, 4);
    ei_x_encode_atom(&x, "sleep");
    ei_x_encode_empty_list(&x);
    ei_x_encode_empty_list(&x);
    assert_int_equal(decode_keep(&x, &f), MOAT_EBADTERM);
    assert_int_equal(f.kind, MOAT__FRAME_RUNS);
    assert_int_equal(f.nruns, 4);
    assert_int_equal(f.untagged, 1);
    assert_int_equal(f.runs[0].tag, 1);
    assert_int_equal(f.runs[0].status, 0);
    assert_non_null(f.runs[0].args);
    assert_int_equal(f.runs[1].tag, 2);
    assert_int_equal(f.runs[1].status, MOAT_EBADTERM);
    assert_int_equal(f.runs[2].tag, 3);
    assert_int_equal(f.runs[2].status, MOAT_EBADTERM);
    assert_int_equal(f.runs[3].tag, 4);
    assert_int_equal(f.runs[3].status, 0);
    assert_memory_equal(f.runs[3].task.name, "sleep", 5);
    /* the caller may take an argument term */
    moat_term_unref(f.runs[3].args);
    f.runs[3].args = NULL;
    moat__frame_free(&f);
    ei_x_free(&x);

    x = start("runs", 2);
    ei_x_encode_empty_list(&x);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.nruns, 0);
    moat__frame_free(&f);
}

/* A list count the frame cannot hold allocates nothing for it. */
static void test_cnode_frame_runs_lying_count(void **state) {
    static const unsigned char lie[] = {131, 104, 2,   119,  4,    'r',
                                        'u', 'n', 's', 108,  0xff, 0xff,
                                        0xff, 0xff, 104, 3,   97,   8,
                                        119, 1,   'e', 106};
    moat__frame_t f;
    (void)state;
    assert_int_equal(moat__frame_decode((const char *)lie, sizeof lie, &f),
                     MOAT_EBADTERM);
    assert_int_equal(f.kind, MOAT__FRAME_RUNS);
    assert_true(f.nruns + f.untagged <= sizeof lie);
    assert_int_equal(f.nruns, 1);
    assert_int_equal(f.runs[0].tag, 8);
    assert_int_equal(f.runs[0].status, MOAT_EBADTERM);
    moat__frame_free(&f);
}

/* --------------------------------------------------------------- cancel */

static void test_cnode_frame_cancel(void **state) {
    static const struct {
        const char *reason;
        moat_atom_t want;
    } cases[] = {{"shutdown", MOAT_A_SHUTDOWN},
                 {"killed", MOAT_A_KILLED},
                 {"timeout", MOAT_A_TIMEOUT},
                 {"whatever", MOAT_A_SHUTDOWN}};
    moat__frame_t f;
    ei_x_buff x;
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        x = start("cancel", 3);
        ei_x_encode_ulonglong(&x, 1000 + i);
        ei_x_encode_atom(&x, cases[i].reason);
        assert_int_equal(decode_x(&x, &f), 0);
        assert_int_equal(f.kind, MOAT__FRAME_CANCEL);
        assert_int_equal(f.tag, 1000 + i);
        assert_int_equal(f.reason, cases[i].want);
        moat__frame_free(&f);
    }
    x = start("cancel", 3);
    ei_x_encode_long(&x, -3);
    ei_x_encode_atom(&x, "shutdown");
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_int_equal(f.kind, MOAT__FRAME_CANCEL);
    moat__frame_free(&f);
    x = start("cancel", 2);
    ei_x_encode_long(&x, 3);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    moat__frame_free(&f);
}

/* -------------------------------------------------------------- garbage */

static void test_cnode_frame_garbage_is_refused(void **state) {
    static const struct {
        const char *bytes;
        size_t len;
    } cases[] = {
        {"", 0},
        {"\x83", 1},
        {"x", 1},
        {"\x83\x6a", 2},                    /* [] */
        {"\x83\x68\x00", 3},                /* {} */
        {"\x83\x68\x01\x61\x01", 5},        /* {1} */
        {"\x83\x77\x03run", 6},             /* run */
        {"\x83\x68\x01\x77\x03why", 7},     /* {why} */
        {"\x84\x68\x01\x77\x03run", 7},     /* a wrong version byte */
        {"\x83\x50\x00\x00\x00\x10\x78", 7} /* compressed */
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moat__frame_t f;
        assert_int_equal(moat__frame_decode(cases[i].bytes, cases[i].len, &f),
                         MOAT_EBADTERM);
        assert_int_equal(f.nruns, 0);
        assert_true(f.why[0] != '\0');
        moat__frame_free(&f);
    }
}

/* Checks what any decode must leave: a known result, and argument terms
 * only where the entry is good, each one well-formed. */
static void check_any(const char *buf, size_t len) {
    moat__frame_t f;
    int rc = moat__frame_decode(buf, len, &f);
    assert_true(rc == 0 || rc == MOAT_EBADTERM);
    for (size_t i = 0; i < f.nruns; i++) {
        if (f.runs[i].status == 0) {
            size_t alen;
            const char *a = moat_term_data(f.runs[i].args, &alen);
            assert_int_equal(moat_etf_check(a, alen), 0);
            assert_true(f.runs[i].task.name >= buf &&
                        f.runs[i].task.name + f.runs[i].task.len <= buf + len);
        } else {
            assert_null(f.runs[i].args);
        }
    }
    moat__frame_free(&f);
}

/* Every prefix of good frames, and every one-byte change of them: a
 * bounded fuzz that the sanitizers and valgrind watch.  Each buffer is
 * copied to memory of its exact size, so a read past it is caught. */
static void test_cnode_frame_survives_every_cut_and_change(void **state) {
    static const unsigned char values[] = {0,   1,   2,    3,    0x7f,
                                           0x80, 0xfe, 0xff, 97,  104,
                                           106, 107, 108,  109,  110,
                                           111, 116, 119,  131};
    ei_x_buff frames[4];
    (void)state;
    frames[0] = run_frame(300);
    frames[1] = start("runs", 2);
    ei_x_encode_list_header(&frames[1], 2);
    for (int i = 0; i < 2; i++) {
        ei_x_encode_tuple_header(&frames[1], 3);
        ei_x_encode_ulonglong(&frames[1], 70000 + (uint64_t)i);
        ei_x_encode_atom(&frames[1], "echo");
        ei_x_encode_list_header(&frames[1], 1);
        ei_x_encode_tuple_header(&frames[1], 2);
        ei_x_encode_binary(&frames[1], "xy", 2);
        ei_x_encode_map_header(&frames[1], 1);
        ei_x_encode_atom(&frames[1], "k");
        ei_x_encode_string(&frames[1], "v");
        ei_x_encode_empty_list(&frames[1]);
    }
    ei_x_encode_empty_list(&frames[1]);
    frames[2] = hello1("libraries", v_improper);
    frames[3] = start("cancel", 3);
    ei_x_encode_ulonglong(&frames[3], 1ULL << 63);
    ei_x_encode_atom(&frames[3], "killed");

    for (size_t k = 0; k < 4; k++) {
        size_t n = (size_t)frames[k].index;
        for (size_t cut = 0; cut <= n; cut++) {
            char *b = malloc(cut > 0 ? cut : 1);
            assert_non_null(b);
            memcpy(b, frames[k].buff, cut);
            check_any(b, cut);
            free(b);
        }
        for (size_t at = 0; at < n; at++) {
            for (size_t v = 0; v < sizeof values; v++) {
                char *b = malloc(n);
                assert_non_null(b);
                memcpy(b, frames[k].buff, n);
                b[at] = (char)values[v];
                check_any(b, n);
                free(b);
            }
        }
        ei_x_free(&frames[k]);
    }
}

/* --------------------------------------------------------------- atoms */

static void test_cnode_frame_atom_utf8_cuts_at_characters(void **state) {
    moat__atom_t a = {"\xe9\xe9\xe9", 3, 1, NULL, 0};
    moat__atom_t u = {"\xc3\xa9\xc3\xa9", 4, 0, NULL, 0};
    char out[8];
    (void)state;
    assert_int_equal(moat__atom_utf8(&a, out, sizeof out), 6);
    assert_string_equal(out, "\xc3\xa9\xc3\xa9\xc3\xa9");
    assert_int_equal(moat__atom_utf8(&a, out, 4), 2);
    assert_string_equal(out, "\xc3\xa9");
    assert_int_equal(moat__atom_utf8(&u, out, 4), 2);
    assert_string_equal(out, "\xc3\xa9");
    assert_int_equal(moat__atom_utf8(&u, out, 1), 0);
    assert_string_equal(out, "");
}

/* ------------------------------------------------ frames from a worker */

/* hello's process options: read when given, the defaults when not, and
 * out-of-range values refused. */
static void test_cnode_frame_hello_process_options(void **state) {
    moat__frame_t f;
    ei_x_buff x = start("hello", 2);
    (void)state;
    ei_x_encode_map_header(&x, 4);
    ei_x_encode_atom(&x, "max_memory");
    ei_x_encode_ulonglong(&x, 1ull << 33);
    ei_x_encode_atom(&x, "spares");
    ei_x_encode_long(&x, 0);
    ei_x_encode_atom(&x, "max_restarts");
    ei_x_encode_long(&x, 10);
    ei_x_encode_atom(&x, "max_seconds");
    ei_x_encode_long(&x, 60);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_true(f.hello.max_memory == 1ull << 33);
    assert_int_equal(f.hello.spares, 0);
    assert_int_equal(f.hello.max_restarts, 10);
    assert_int_equal(f.hello.max_seconds, 60);
    moat__frame_free(&f);

    x = start("hello", 2);
    ei_x_encode_map_header(&x, 0);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_true(f.hello.max_memory == 0);
    assert_int_equal(f.hello.spares, MOAT__HELLO_SPARES);
    assert_int_equal(f.hello.max_restarts, MOAT__HELLO_MAX_RESTARTS);
    assert_int_equal(f.hello.max_seconds, MOAT__HELLO_MAX_SECONDS);
    moat__frame_free(&f);

    x = start("hello", 2);
    ei_x_encode_map_header(&x, 1);
    ei_x_encode_atom(&x, "max_seconds");
    ei_x_encode_long(&x, 0);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_non_null(strstr(f.why, "max_seconds"));
    moat__frame_free(&f);
}

static int wdecode(ei_x_buff *x, moat__wframe_t *f) {
    return moat__wframe_decode(x->buff, (size_t)x->index, f);
}

/* The frames a worker sends are read with their parts; anything else is
 * refused. */
static void test_cnode_frame_worker_frames(void **state) {
    moat__wframe_t f;
    ei_x_buff x;
    (void)state;

    x = start("done", 2);
    ei_x_encode_list_header(&x, 2);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_ulonglong(&x, UINT64_MAX);
    ei_x_encode_atom(&x, "ok");
    ei_x_encode_atom(&x, "fine");
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_ulonglong(&x, 7);
    ei_x_encode_atom(&x, "exit");
    ei_x_encode_long(&x, 3);
    ei_x_encode_empty_list(&x);
    assert_int_equal(wdecode(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__WFRAME_DONE);
    assert_int_equal(f.ndone, 2);
    assert_true(f.done[0].tag == UINT64_MAX);
    assert_int_equal(f.done[0].kind, MOAT_OK);
    assert_int_equal(f.done[0].len, 6); /* SMALL_ATOM_UTF8, 1, "fine" */
    assert_int_equal(f.done[1].kind, MOAT_EXIT);
    assert_int_equal(f.done[1].len, 2);
    moat__wframe_free(&f);
    ei_x_free(&x);

    x = start("stopped", 2);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_ulonglong(&x, 9);
    ei_x_encode_empty_list(&x);
    assert_int_equal(wdecode(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__WFRAME_STOPPED);
    assert_int_equal(f.ntags, 1);
    assert_true(f.tags[0] == 9);
    moat__wframe_free(&f);
    ei_x_free(&x);

    x = start("log", 3);
    ei_x_encode_atom(&x, "info");
    ei_x_encode_binary(&x, "hi", 2);
    assert_int_equal(wdecode(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__WFRAME_LOG);
    assert_string_equal(f.level, "info");
    assert_int_equal(f.msg_len, 2);
    assert_memory_equal(f.msg, "hi", 2);
    moat__wframe_free(&f);
    ei_x_free(&x);

    /* the servers' worker's reports; error's and gave_up's reasons */
    x = start("restarts", 2);
    ei_x_encode_ulonglong(&x, 17);
    assert_int_equal(wdecode(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__WFRAME_RESTARTS);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = start("crashed", 4);
    ei_x_encode_long(&x, 2);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_atom(&x, "boom");
    assert_int_equal(wdecode(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__WFRAME_CRASHED);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = start("servers_stopped", 1);
    assert_int_equal(wdecode(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__WFRAME_SERVERS_STOPPED);
    moat__wframe_free(&f);
    ei_x_free(&x);
    for (int k = 0; k < 2; k++) {
        x = start(k == 0 ? "gave_up" : "error", 2);
        int at = x.index;
        ei_x_encode_tuple_header(&x, 2);
        ei_x_encode_atom(&x, "native_crash");
        ei_x_encode_atom(&x, "sigsegv");
        assert_int_equal(wdecode(&x, &f), 0);
        assert_int_equal(f.kind, k == 0 ? MOAT__WFRAME_GAVE_UP
                                        : MOAT__WFRAME_ERROR);
        assert_ptr_equal(f.reason, x.buff + at);
        assert_int_equal(f.reason_len, x.index - at);
        moat__wframe_free(&f);
        ei_x_free(&x);
    }

    /* refused: a bad level, an empty done list, a run, garbage, reports
     * of the wrong shape, every cut of a good frame */
    x = start("restarts", 2);
    ei_x_encode_long(&x, -1);
    assert_int_equal(wdecode(&x, &f), MOAT_EBADTERM);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = start("crashed", 4);
    ei_x_encode_long(&x, 0);
    ei_x_encode_atom(&x, "a");
    ei_x_encode_atom(&x, "boom");
    assert_int_equal(wdecode(&x, &f), MOAT_EBADTERM);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = start("servers_stopped", 2);
    ei_x_encode_atom(&x, "now");
    assert_int_equal(wdecode(&x, &f), MOAT_EBADTERM);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = start("log", 3);
    ei_x_encode_atom(&x, "loud");
    ei_x_encode_binary(&x, "hi", 2);
    assert_int_equal(wdecode(&x, &f), MOAT_EBADTERM);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = start("done", 2);
    ei_x_encode_empty_list(&x);
    assert_int_equal(wdecode(&x, &f), MOAT_EBADTERM);
    moat__wframe_free(&f);
    ei_x_free(&x);
    x = run_frame(1);
    assert_int_equal(wdecode(&x, &f), MOAT_EBADTERM);
    moat__wframe_free(&f);
    ei_x_free(&x);
    assert_int_equal(moat__wframe_decode("\x83garbage", 8, &f),
                     MOAT_EBADTERM);
    moat__wframe_free(&f);

    x = start("done", 2);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_ulonglong(&x, 5);
    ei_x_encode_atom(&x, "ok");
    ei_x_encode_binary(&x, "payload", 7);
    ei_x_encode_empty_list(&x);
    for (int cut = 0; cut < x.index; cut++) {
        assert_int_equal(moat__wframe_decode(x.buff, (size_t)cut, &f),
                         MOAT_EBADTERM);
        moat__wframe_free(&f);
    }
    for (int i = 1; i < x.index; i++) {
        char *b = malloc((size_t)x.index);
        assert_non_null(b);
        for (int v = 0; v < 256; v += 37) {
            memcpy(b, x.buff, (size_t)x.index);
            b[i] = (char)v;
            moat__wframe_decode(b, (size_t)x.index, &f); /* no crash */
            moat__wframe_free(&f);
        }
        free(b);
    }
    ei_x_free(&x);
}

/* -------------------------------------------------------------- servers */

/* One child spec {Id, Lib, counter, [0], Restart, Shutdown}; Id is {a,
 * Index}, Shutdown an integer (>= 0), brutal_kill (-1) or infinity
 * (-2). */
static void child(ei_x_buff *x, long index, long lib, const char *restart,
                  long shutdown) {
    ei_x_encode_tuple_header(x, 6);
    ei_x_encode_tuple_header(x, 2);
    ei_x_encode_atom(x, "a");
    ei_x_encode_long(x, index);
    ei_x_encode_long(x, lib);
    ei_x_encode_atom(x, "counter");
    ei_x_encode_list_header(x, 1);
    ei_x_encode_long(x, 0);
    ei_x_encode_empty_list(x);
    ei_x_encode_atom(x, restart);
    if (shutdown >= 0)
        ei_x_encode_long(x, shutdown);
    else
        ei_x_encode_atom(x, shutdown == -1 ? "brutal_kill" : "infinity");
}

/* {hello, #{servers => [...], strategy => S, libraries => [<<"l.so">>]}}
 * with the servers last in the map, as a crafted frame may put them:
 * library indices are checked once the whole map is read. */
static ei_x_buff hello_servers(const char *strategy, int n, long lib,
                               const char *restart, long shutdown) {
    ei_x_buff x = start("hello", 2);
    ei_x_encode_map_header(&x, 3);
    ei_x_encode_atom(&x, "strategy");
    ei_x_encode_atom(&x, strategy);
    ei_x_encode_atom(&x, "servers");
    ei_x_encode_list_header(&x, n);
    for (int i = 0; i < n; i++)
        child(&x, i, lib, restart, shutdown);
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "libraries");
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_binary(&x, "l.so", 4);
    ei_x_encode_empty_list(&x);
    return x;
}

static void test_cnode_frame_hello_servers(void **state) {
    static const struct {
        const char *strategy, *restart;
        long shutdown;
        int want_strategy, want_restart, want_shutdown;
    } cases[] = {
        {"one_for_one", "permanent", 5000, MOAT_ONE_FOR_ONE, MOAT_PERMANENT,
         5000},
        {"one_for_all", "transient", -1, MOAT_ONE_FOR_ALL, MOAT_TRANSIENT,
         MOAT_SHUTDOWN_BRUTAL},
        {"rest_for_one", "temporary", -2, MOAT_REST_FOR_ONE, MOAT_TEMPORARY,
         MOAT_SHUTDOWN_INFINITY},
        {"one_for_one", "permanent", 0, MOAT_ONE_FOR_ONE, MOAT_PERMANENT, 0},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ei_x_buff x = hello_servers(cases[i].strategy, 2, 0,
                                    cases[i].restart, cases[i].shutdown);
        ei_x_buff id;
        moat__frame_t f;
        size_t len;
        const char *d;
        assert_int_equal(decode_keep(&x, &f), 0);
        assert_int_equal(f.hello.strategy, cases[i].want_strategy);
        assert_int_equal(f.hello.nservers, 2);
        for (int k = 0; k < 2; k++) {
            const moat__child_t *c = &f.hello.servers[k];
            char name[16];
            assert_int_equal(c->lib, 0);
            moat__atom_utf8(&c->server, name, sizeof name);
            assert_string_equal(name, "counter");
            assert_int_equal(c->restart, cases[i].want_restart);
            assert_int_equal(c->shutdown_ms, cases[i].want_shutdown);
            /* the id and the args, exactly as encoded */
            ei_x_new_with_version(&id);
            ei_x_encode_tuple_header(&id, 2);
            ei_x_encode_atom(&id, "a");
            ei_x_encode_long(&id, k);
            d = moat_term_data(c->id, &len);
            assert_int_equal(len, (size_t)id.index);
            assert_memory_equal(d, id.buff, len);
            ei_x_free(&id);
            d = moat_term_data(c->args, &len);
            /* 131, then [0] as ei wrote it: LIST_EXT, 0, NIL */
            assert_int_equal(len, 1 + 5 + 2 + 1);
            assert_int_equal((unsigned char)d[1], 108);
        }
        moat__frame_free(&f);
        ei_x_free(&x);
    }
    {
        /* An empty list: no servers, one_for_one. */
        ei_x_buff x = start("hello", 2);
        moat__frame_t f;
        ei_x_encode_map_header(&x, 1);
        ei_x_encode_atom(&x, "servers");
        ei_x_encode_empty_list(&x);
        assert_int_equal(decode_x(&x, &f), 0);
        assert_int_equal(f.hello.nservers, 0);
        assert_int_equal(f.hello.strategy, MOAT_ONE_FOR_ONE);
        moat__frame_free(&f);
    }
}

static void v_strategy_sofo(ei_x_buff *x) {
    ei_x_encode_atom(x, "simple_one_for_one");
}
static void v_servers_improper(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    child(x, 0, 0, "permanent", 10);
    ei_x_encode_atom(x, "tail");
}
static void v_servers_arity5(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    ei_x_encode_tuple_header(x, 5);
    ei_x_encode_atom(x, "a");
    ei_x_encode_long(x, 0);
    ei_x_encode_atom(x, "counter");
    ei_x_encode_empty_list(x);
    ei_x_encode_atom(x, "permanent");
    ei_x_encode_empty_list(x);
}
static void v_servers_bad_restart(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    child(x, 0, 0, "sometimes", 10);
    ei_x_encode_empty_list(x);
}
static void v_servers_bad_shutdown(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    child(x, 0, 0, "permanent", 1L << 31);
    ei_x_encode_empty_list(x);
}
static void v_servers_bad_lib(ei_x_buff *x) {
    ei_x_encode_list_header(x, 1);
    child(x, 0, 1, "permanent", 10); /* no library at all in this hello */
    ei_x_encode_empty_list(x);
}

/* Each bad servers option makes hello malformed, and says which; the
 * parts read before the fault are freed (ASan, valgrind). */
static void test_cnode_frame_hello_refuses_bad_servers(void **state) {
    static const struct {
        const char *key;
        void (*value)(ei_x_buff *);
        const char *why;
    } cases[] = {
        {"strategy", v_strategy_sofo, "strategy"},
        {"strategy", v_binary, "strategy"},
        {"servers", v_atom, "servers"},
        {"servers", v_servers_improper, "proper"},
        {"servers", v_servers_arity5, "{Id, Lib, Server, Args"},
        {"servers", v_servers_bad_restart, "restart"},
        {"servers", v_servers_bad_shutdown, "shutdown"},
        {"servers", v_servers_bad_lib, "library"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ei_x_buff x = hello1(cases[i].key, cases[i].value);
        moat__frame_t f;
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        if (strstr(f.why, cases[i].why) == NULL)
            fail_msg("case %zu: \"%s\" does not say %s", i, f.why,
                     cases[i].why);
        moat__frame_free(&f);
    }
    {
        /* A library index past the libraries given. */
        ei_x_buff x = hello_servers("one_for_one", 3, 1, "permanent", 1);
        moat__frame_t f;
        assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
        assert_non_null(strstr(f.why, "server 1: the library"));
        moat__frame_free(&f);
    }
}

/* {call, Tag, Child, Request}, {cast, Child, Request}, the queries and
 * stop_servers, read; a call or query whose tag can be read is tagged
 * even when the rest is wrong, so that it is answered badarg. */
static void test_cnode_frame_server_frames(void **state) {
    ei_x_buff x = start("call", 4);
    moat__frame_t f;
    size_t len;
    const char *d;
    (void)state;
    ei_x_encode_ulonglong(&x, UINT64_MAX);
    ei_x_encode_long(&x, 3);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "add");
    ei_x_encode_long(&x, 5);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__FRAME_CALL);
    assert_int_equal(f.tagged, 1);
    assert_true(f.tag == UINT64_MAX);
    assert_int_equal(f.child, 3);
    d = moat_term_data(f.msg, &len);
    assert_int_equal(len, 1 + 2 + 5 + 2); /* 131, {2, add, 5} */
    assert_int_equal((unsigned char)d[1], 104);
    moat__frame_free(&f);

    x = start("cast", 3);
    ei_x_encode_long(&x, 0);
    ei_x_encode_atom(&x, "get");
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__FRAME_CAST);
    assert_int_equal(f.tagged, 0);
    assert_int_equal(f.child, 0);
    assert_non_null(f.msg);
    moat__frame_free(&f);

    x = start("which_children", 2);
    ei_x_encode_long(&x, 7);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__FRAME_WHICH_CHILDREN);
    assert_true(f.tagged && f.tag == 7);
    moat__frame_free(&f);

    x = start("count_children", 2);
    ei_x_encode_long(&x, 8);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__FRAME_COUNT_CHILDREN);
    assert_true(f.tagged && f.tag == 8);
    moat__frame_free(&f);

    x = start("stop_servers", 1);
    assert_int_equal(decode_x(&x, &f), 0);
    assert_int_equal(f.kind, MOAT__FRAME_STOP_SERVERS);
    moat__frame_free(&f);

    /* Wrong shapes: refused, the tag kept where it could be read. */
    x = start("call", 3); /* no request */
    ei_x_encode_long(&x, 9);
    ei_x_encode_long(&x, 0);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_true(f.tagged && f.tag == 9);
    assert_null(f.msg);
    moat__frame_free(&f);

    x = start("call", 4);
    ei_x_encode_long(&x, 10);
    ei_x_encode_long(&x, -1); /* not an index */
    ei_x_encode_atom(&x, "get");
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_true(f.tagged && f.tag == 10);
    moat__frame_free(&f);

    x = start("call", 4);
    ei_x_encode_atom(&x, "no_tag");
    ei_x_encode_long(&x, 0);
    ei_x_encode_atom(&x, "get");
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_int_equal(f.tagged, 0);
    moat__frame_free(&f);

    x = start("cast", 2);
    ei_x_encode_long(&x, 0);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_int_equal(f.kind, MOAT__FRAME_CAST);
    moat__frame_free(&f);

    x = start("which_children", 3);
    ei_x_encode_long(&x, 11);
    ei_x_encode_long(&x, 0);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_true(f.tagged && f.tag == 11);
    moat__frame_free(&f);

    x = start("count_children", 2);
    ei_x_encode_atom(&x, "x");
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    assert_int_equal(f.tagged, 0);
    moat__frame_free(&f);

    x = start("stop_servers", 2);
    ei_x_encode_long(&x, 0);
    assert_int_equal(decode_x(&x, &f), MOAT_EBADTERM);
    moat__frame_free(&f);
}

/* Every cut of a call frame and a hello with servers, and every byte of
 * them changed, decodes without reading out of bounds or leaking. */
static void test_cnode_frame_server_frames_survive_cuts(void **state) {
    ei_x_buff frames[2];
    (void)state;
    frames[0] = start("call", 4);
    ei_x_encode_ulonglong(&frames[0], 1234567);
    ei_x_encode_long(&frames[0], 1);
    ei_x_encode_tuple_header(&frames[0], 2);
    ei_x_encode_atom(&frames[0], "add");
    ei_x_encode_long(&frames[0], -5);
    frames[1] = hello_servers("rest_for_one", 2, 0, "transient", -1);
    for (int k = 0; k < 2; k++) {
        ei_x_buff *x = &frames[k];
        size_t n = (size_t)x->index;
        char *copy = malloc(n);
        assert_non_null(copy);
        for (size_t cut = 0; cut <= n; cut++) {
            moat__frame_t f;
            char *b = malloc(cut > 0 ? cut : 1);
            assert_non_null(b);
            memcpy(b, x->buff, cut);
            (void)moat__frame_decode(b, cut, &f);
            moat__frame_free(&f);
            free(b);
        }
        for (size_t i = 0; i < n; i++) {
            for (int v = 0; v < 256; v += 51) {
                moat__frame_t f;
                memcpy(copy, x->buff, n);
                copy[i] = (char)v;
                (void)moat__frame_decode(copy, n, &f);
                moat__frame_free(&f);
            }
        }
        free(copy);
        ei_x_free(x);
    }
}

/* ------------------------------------------------ distribution packets */

/* A packet's body: the pass-through byte, then {Op, ...} (its version
 * byte first); the caller encodes the rest of the tuple and any message. */
static ei_x_buff packet(long op, int arity) {
    ei_x_buff x;
    assert_int_equal(ei_x_new(&x), 0);
    assert_int_equal(ei_x_append_buf(&x, "p", 1), 0); /* 112 */
    assert_int_equal(ei_x_encode_version(&x), 0);
    assert_int_equal(ei_x_encode_tuple_header(&x, arity), 0);
    assert_int_equal(ei_x_encode_long(&x, op), 0);
    return x;
}

static void add_message(ei_x_buff *x, const char *text) {
    ei_x_buff m;
    assert_int_equal(ei_x_new_with_version(&m), 0);
    ei_x_encode_binary(&m, text, (long)strlen(text));
    ei_x_append_buf(x, m.buff, m.index);
    ei_x_free(&m);
}

static erlang_pid a_pid(unsigned num) {
    erlang_pid p;
    memset(&p, 0, sizeof p);
    strcpy(p.node, "vm@host");
    p.num = num;
    p.serial = 3;
    p.creation = 0x12345678;
    return p;
}

static void assert_pid(const moat__pid_t *got, const erlang_pid *want) {
    char node[MAXATOMLEN_UTF8];
    moat__atom_utf8(&got->node, node, sizeof node);
    assert_string_equal(node, want->node);
    assert_int_equal(got->num, want->num);
    assert_int_equal(got->serial, want->serial);
    assert_int_equal(got->creation, want->creation);
}

/* The message of a decoded send is the binary `text`, at the packet's
 * end. */
static void assert_message(const moat__dist_msg_t *m, const ei_x_buff *x,
                           const char *text) {
    char bin[64];
    long len;
    int i = 0, version;
    assert_true(m->msg + m->msg_len == x->buff + x->index);
    assert_int_equal(ei_decode_version(m->msg, &i, &version), 0);
    assert_int_equal(ei_decode_binary(m->msg, &i, bin, &len), 0);
    assert_int_equal((size_t)i, m->msg_len);
    assert_int_equal(len, (long)strlen(text));
    assert_memory_equal(bin, text, (size_t)len);
}

/* What each control message this node acts on carries, read from packets
 * as ERTS writes them (ei's encoders standing in for it). */
static void test_cnode_frame_dist_packets(void **state) {
    erlang_pid from = a_pid(40), to = a_pid(41);
    erlang_trace token;
    moat__dist_msg_t m;
    ei_x_buff x;
    (void)state;
    memset(&token, 0, sizeof token);
    token.label = 5;
    token.serial = 7;
    token.from = from;

    assert_int_equal(moat__dist_decode("", 0, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_TICK);

    x = packet(6, 4); /* {REG_SEND, From, '', moat} */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_atom(&x, "");
    ei_x_encode_atom(&x, "moat");
    add_message(&x, "frame");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_REG_SEND);
    assert_int_equal(m.op, 6);
    assert_pid(&m.from, &from);
    assert_int_equal(m.toname.len, 4);
    assert_memory_equal(m.toname.name, "moat", 4);
    assert_message(&m, &x, "frame");
    ei_x_free(&x);

    x = packet(16, 5); /* {REG_SEND_TT, From, '', moat_echo, Token} */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_atom(&x, "");
    ei_x_encode_atom(&x, "moat_echo");
    ei_x_encode_trace(&x, &token);
    add_message(&x, "traced");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_REG_SEND);
    assert_pid(&m.from, &from);
    assert_int_equal(m.toname.len, 9);
    assert_message(&m, &x, "traced");
    ei_x_free(&x);

    x = packet(2, 3); /* {SEND, '', To} */
    ei_x_encode_atom(&x, "");
    ei_x_encode_pid(&x, &to);
    add_message(&x, "to the pid");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_SEND);
    assert_message(&m, &x, "to the pid");
    ei_x_free(&x);

    x = packet(12, 4); /* {SEND_TT, '', To, Token} */
    ei_x_encode_atom(&x, "");
    ei_x_encode_pid(&x, &to);
    ei_x_encode_trace(&x, &token);
    add_message(&x, "tt");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_SEND);
    assert_message(&m, &x, "tt");
    ei_x_free(&x);

    x = packet(3, 4); /* {EXIT, From, To, Reason} */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_pid(&x, &to);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "shutdown");
    ei_x_encode_binary(&x, "why", 3);
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_EXIT);
    assert_pid(&m.from, &from);
    assert_null(m.msg);
    ei_x_free(&x);

    x = packet(18, 5); /* {EXIT2_TT, From, To, Token, Reason} */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_pid(&x, &to);
    ei_x_encode_trace(&x, &token);
    ei_x_encode_atom(&x, "kill");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_EXIT);
    assert_int_equal(m.op, 18);
    assert_pid(&m.from, &from);
    ei_x_free(&x);

    x = packet(35, 4); /* {UNLINK_ID, Id, From, To} */
    ei_x_encode_ulonglong(&x, 1ULL << 40);
    ei_x_encode_pid(&x, &from);
    ei_x_encode_pid(&x, &to);
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_UNLINK_ID);
    assert_pid(&m.from, &from);
    assert_pid(&m.to, &to);
    {
        unsigned long long id;
        int i = 0;
        assert_int_equal(ei_decode_ulonglong(m.id, &i, &id), 0);
        assert_int_equal((size_t)i, m.id_len);
        assert_true(id == 1ULL << 40);
    }
    ei_x_free(&x);

    x = packet(19, 4); /* {MONITOR_P, From, To, Ref}: read no further */
    ei_x_encode_pid(&x, &from);
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    assert_int_equal(m.kind, MOAT__DIST_OTHER);
    assert_int_equal(m.op, 19);
    ei_x_free(&x);
}

/* Packets of the wrong shape are refused, and no cut or changed byte of
 * a good one makes the decoder read outside it (ASan, valgrind). */
static void test_cnode_frame_dist_bad_packets(void **state) {
    erlang_pid from = a_pid(40);
    moat__dist_msg_t m;
    ei_x_buff x;
    (void)state;

    /* no pass-through byte; no version byte; an operation that is not a
     * small integer */
    assert_int_equal(moat__dist_decode("\203h\1a\6", 5, &m), MOAT_EBADTERM);
    assert_int_equal(moat__dist_decode("ph\1a\6", 5, &m), MOAT_EBADTERM);
    assert_int_equal(moat__dist_decode("p\203h\1d\0\1x", 8, &m),
                     MOAT_EBADTERM);

    x = packet(6, 3); /* REG_SEND one element short */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_atom(&x, "");
    add_message(&x, "m");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m),
                     MOAT_EBADTERM);
    ei_x_free(&x);

    x = packet(6, 4); /* the sender is not a pid */
    ei_x_encode_atom(&x, "me");
    ei_x_encode_atom(&x, "");
    ei_x_encode_atom(&x, "moat");
    add_message(&x, "m");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m),
                     MOAT_EBADTERM);
    ei_x_free(&x);

    x = packet(3, 4); /* EXIT with bytes after it */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_pid(&x, &from);
    ei_x_encode_atom(&x, "normal");
    ei_x_append_buf(&x, "\0", 1);
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m),
                     MOAT_EBADTERM);
    ei_x_free(&x);

    x = packet(6, 4); /* a send with no message, then with two */
    ei_x_encode_pid(&x, &from);
    ei_x_encode_atom(&x, "");
    ei_x_encode_atom(&x, "moat");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m),
                     MOAT_EBADTERM);
    add_message(&x, "one");
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m), 0);
    ei_x_append_buf(&x, "a\1", 2);
    assert_int_equal(moat__dist_decode(x.buff, (size_t)x.index, &m),
                     MOAT_EBADTERM);
    x.index -= 2;

    {
        size_t n = (size_t)x.index;
        char *copy = malloc(n);
        assert_non_null(copy);
        for (size_t cut = 1; cut < n; cut++) {
            char *b = malloc(cut);
            assert_non_null(b);
            memcpy(b, x.buff, cut);
            assert_int_equal(moat__dist_decode(b, cut, &m), MOAT_EBADTERM);
            free(b);
        }
        for (size_t i = 0; i < n; i++) {
            for (int v = 0; v < 256; v += 51) {
                memcpy(copy, x.buff, n);
                copy[i] = (char)v;
                (void)moat__dist_decode(copy, n, &m);
            }
        }
        free(copy);
    }
    ei_x_free(&x);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cnode_frame_hello_reads_every_option),
        cmocka_unit_test(test_cnode_frame_hello_defaults),
        cmocka_unit_test(test_cnode_frame_hello_refuses_bad_options),
        cmocka_unit_test(test_cnode_frame_run_reads_tag_task_args),
        cmocka_unit_test(test_cnode_frame_run_reads_every_encoding),
        cmocka_unit_test(test_cnode_frame_run_bad_parts_keep_the_tag),
        cmocka_unit_test(test_cnode_frame_deep_arguments),
        cmocka_unit_test(test_cnode_frame_unreadable_tags),
        cmocka_unit_test(test_cnode_frame_runs_mixed_elements),
        cmocka_unit_test(test_cnode_frame_runs_lying_count),
        cmocka_unit_test(test_cnode_frame_cancel),
        cmocka_unit_test(test_cnode_frame_garbage_is_refused),
        cmocka_unit_test(test_cnode_frame_survives_every_cut_and_change),
        cmocka_unit_test(test_cnode_frame_atom_utf8_cuts_at_characters),
        cmocka_unit_test(test_cnode_frame_hello_process_options),
        cmocka_unit_test(test_cnode_frame_worker_frames),
        cmocka_unit_test(test_cnode_frame_hello_servers),
        cmocka_unit_test(test_cnode_frame_hello_refuses_bad_servers),
        cmocka_unit_test(test_cnode_frame_server_frames),
        cmocka_unit_test(test_cnode_frame_server_frames_survive_cuts),
        cmocka_unit_test(test_cnode_frame_dist_packets),
        cmocka_unit_test(test_cnode_frame_dist_bad_packets),
    };
    ei_init();
    return cmocka_run_group_tests_name("cnode frame decoder", tests, NULL,
                                       NULL);
}
