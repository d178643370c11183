/*
 * test_demo.c: the demo library's tasks and its counter server, run
 * through a fake context (fake_ctx.h), loaded from MOAT_DEMO_SO as a pool
 * would load it.  segfault and abort are only looked up, and fed wrong
 * arguments, which they must refuse before doing anything.
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "fake_ctx.h"
#include "moat_core.h"

/* alloc's out-of-memory case asks for 2^62 bytes: under a sanitizer that
 * must fail like malloc does, not abort the test. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) {
    return "allocator_may_return_null=1";
}
const char *__tsan_default_options(void);
const char *__tsan_default_options(void) {
    return "allocator_may_return_null=1";
}

static moat_lib_t *demo;

static int setup(void **state) {
    const char *path = getenv("MOAT_DEMO_SO");
    char *msg = NULL;

    (void)state;
    if (path == NULL || moat_lib_open(path, &demo, &msg) != 0) {
        fprintf(stderr, "cannot load MOAT_DEMO_SO: %s\n",
                msg ? msg : "not set");
        free(msg);
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    moat_lib_close(demo);
    return 0;
}

static moat_task_fn task(const char *name) {
    const moat_task_def_t *t = moat_lib_task(demo, name, strlen(name));

    assert_non_null(t);
    return t->run;
}

/* The outcome of one run: status, the result term, the error message. */
typedef struct {
    fake_ctx_t f;
    ei_x_buff out;
    int status;
} run_t;

static void run(run_t *r, const char *name, ei_x_buff *args) {
    fake_ctx_init(&r->f);
    r->status = fake_ctx_run(&r->f, task(name), args->buff, args->index,
                             &r->out);
    ei_x_free(args);
}

/* Runs with `stop_after` set on the context first. */
static void run_stopping(run_t *r, const char *name, ei_x_buff *args,
                         int stop_after) {
    fake_ctx_init(&r->f);
    r->f.stop_after = stop_after;
    r->status = fake_ctx_run(&r->f, task(name), args->buff, args->index,
                             &r->out);
    ei_x_free(args);
}

static void done(run_t *r) {
    ei_x_free(&r->out);
}

/* Argument lists: [], [Integer], [Atom], [Binary]. */
static ei_x_buff no_args(void) {
    ei_x_buff x;

    ei_x_new_with_version(&x);
    ei_x_encode_empty_list(&x);
    return x;
}

static ei_x_buff int_args(long long v) {
    ei_x_buff x;

    ei_x_new_with_version(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_longlong(&x, v);
    ei_x_encode_empty_list(&x);
    return x;
}

static ei_x_buff atom_args(const char *a) {
    ei_x_buff x;

    ei_x_new_with_version(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, a);
    ei_x_encode_empty_list(&x);
    return x;
}

static ei_x_buff binary_args(const void *data, int len) {
    ei_x_buff x;

    ei_x_new_with_version(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_binary(&x, data, len);
    ei_x_encode_empty_list(&x);
    return x;
}

/* [A | B]: an improper list */
static ei_x_buff improper_args(void) {
    ei_x_buff x;

    ei_x_new_with_version(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_long(&x, 1);
    ei_x_encode_atom(&x, "tail");
    return x;
}

/* The same bytes term_to_binary makes for [Byte]: a string. */
static ei_x_buff string_args(const char *s) {
    ei_x_buff x;

    ei_x_new_with_version(&x);
    ei_x_encode_string(&x, s);
    return x;
}

static void expect_atom(const run_t *r, int status, const char *atom) {
    char name[MAXATOMLEN_UTF8];
    int index = 1;

    assert_int_equal(r->status, status);
    assert_int_equal(moat_etf_check(r->out.buff, (size_t)r->out.index), 0);
    assert_int_equal(ei_decode_atom_as(r->out.buff, &index, name,
                                       sizeof(name), ERLANG_UTF8, NULL, NULL),
                     0);
    assert_string_equal(name, atom);
}

static void expect_integer(const run_t *r, long long v) {
    long long got;
    int index = 1;

    assert_int_equal(r->status, MOAT_OK);
    assert_int_equal(moat_etf_check(r->out.buff, (size_t)r->out.index), 0);
    assert_int_equal(ei_decode_longlong(r->out.buff, &index, &got), 0);
    assert_int_equal(got, v);
    assert_int_equal(index, r->out.index);
}

/* The integer result of a run. */
static void index_integer(const run_t *r, long long *v) {
    int index = 1;

    assert_int_equal(ei_decode_longlong(r->out.buff, &index, v), 0);
}

static long long now_ms(void) {
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void expect_badarg(const char *name, ei_x_buff args) {
    run_t r;

    run(&r, name, &args);
    expect_atom(&r, MOAT_EXIT, "badarg");
    done(&r);
}

static void expect_error(const char *name, ei_x_buff args,
                         const char *message) {
    run_t r;

    run(&r, name, &args);
    assert_int_equal(r.status, MOAT_ERROR);
    assert_int_equal(r.f.errors, 1);
    assert_string_equal(r.f.error, message);
    done(&r);
}

static long long elapsed_ns(const struct timespec *since) {
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000000000LL +
           (now.tv_nsec - since->tv_nsec);
}

/* ------------------------------------------------------------ tasks */

static void test_demo_table_has_segfault_and_abort(void **state) {
    (void)state;
    assert_non_null(task("segfault"));
    assert_non_null(task("abort"));
    /* they check their arguments before they fault */
    expect_badarg("segfault", int_args(1));
    expect_badarg("abort", atom_args("now"));
}

static void test_demo_echo_returns_its_argument(void **state) {
    ei_x_buff args, term;
    run_t r;

    (void)state;
    /* {ok, [1.5, <<"bin">>], #{k => "v"}} */
    ei_x_new(&term);
    ei_x_encode_tuple_header(&term, 3);
    ei_x_encode_atom(&term, "ok");
    ei_x_encode_list_header(&term, 2);
    ei_x_encode_double(&term, 1.5);
    ei_x_encode_binary(&term, "bin", 3);
    ei_x_encode_empty_list(&term);
    ei_x_encode_map_header(&term, 1);
    ei_x_encode_atom(&term, "k");
    ei_x_encode_string(&term, "v");
    ei_x_new_with_version(&args);
    ei_x_encode_list_header(&args, 1);
    ei_x_append(&args, &term);
    ei_x_encode_empty_list(&args);
    run(&r, "echo", &args);
    assert_int_equal(r.status, MOAT_OK);
    assert_int_equal(r.out.index, 1 + term.index);
    assert_memory_equal(r.out.buff + 1, term.buff, (size_t)term.index);
    done(&r);
    ei_x_free(&term);
}

static void test_demo_echo_reads_string_encoded_args(void **state) {
    ei_x_buff args = string_args("A"); /* [65] */
    run_t r;

    (void)state;
    run(&r, "echo", &args);
    expect_integer(&r, 65);
    done(&r);
}

static void test_demo_echo_rejects_wrong_shapes(void **state) {
    ei_x_buff args;

    (void)state;
    expect_badarg("echo", no_args());
    expect_badarg("echo", improper_args());
    expect_badarg("echo", string_args("AB"));
    ei_x_new_with_version(&args); /* echo(a): not a list */
    ei_x_encode_atom(&args, "a");
    expect_badarg("echo", args);
    ei_x_new_with_version(&args); /* [a, b] */
    ei_x_encode_list_header(&args, 2);
    ei_x_encode_atom(&args, "a");
    ei_x_encode_atom(&args, "b");
    ei_x_encode_empty_list(&args);
    expect_badarg("echo", args);
}

static void test_demo_sleep_returns_ok(void **state) {
    ei_x_buff args = int_args(3);
    struct timespec start;
    run_t r;

    (void)state;
    clock_gettime(CLOCK_MONOTONIC, &start);
    run(&r, "sleep", &args);
    expect_atom(&r, MOAT_OK, "ok");
    assert_true(elapsed_ns(&start) >= 3000000LL);
    /* It polls between steps; how many steps fit in 3 ms depends on the
     * machine, so only that it polled is asserted (cancellation stopping
     * it early is the next case). */
    assert_true(atomic_load(&r.f.polls) >= 1);
    done(&r);
}

static void test_demo_sleep_stops_early_when_cancelled(void **state) {
    ei_x_buff args = int_args(3600 * 1000); /* an hour */
    run_t r;

    (void)state;
    run_stopping(&r, "sleep", &args, 3);
    expect_atom(&r, MOAT_OK, "ok");
    assert_int_equal(atomic_load(&r.f.polls), 3);
    done(&r);
}

static void test_demo_sleep_rejects_wrong_shapes(void **state) {
    (void)state;
    expect_badarg("sleep", int_args(-1));
    expect_badarg("sleep", atom_args("infinity"));
    expect_badarg("sleep", no_args());
}

static void test_demo_spin_ignores_cancellation(void **state) {
    ei_x_buff args = int_args(2000);
    struct timespec start;
    run_t r;

    (void)state;
    clock_gettime(CLOCK_MONOTONIC, &start);
    fake_ctx_init(&r.f);
    atomic_store(&r.f.stop, 1);
    r.status = fake_ctx_run(&r.f, task("spin"), args.buff, args.index,
                            &r.out);
    ei_x_free(&args);
    expect_atom(&r, MOAT_OK, "ok");
    assert_true(elapsed_ns(&start) >= 2000000LL);
    assert_int_equal(atomic_load(&r.f.polls), 0);
    done(&r);
    expect_badarg("spin", int_args(-5));
    expect_badarg("spin", binary_args("x", 1));
}

static void test_demo_fail_raises_the_message(void **state) {
    ei_x_buff args;

    (void)state;
    expect_error("fail", binary_args("bad size", 8), "bad size");

    ei_x_new_with_version(&args); /* ["disk full"] */
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_string(&args, "disk full");
    ei_x_encode_empty_list(&args);
    expect_error("fail", args, "disk full");

    /* [[<<"a">>, $b, "cd", [[]] | <<"e">>]], with é as a code point */
    ei_x_new_with_version(&args);
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_list_header(&args, 5);
    ei_x_encode_binary(&args, "a", 1);
    ei_x_encode_long(&args, 'b');
    ei_x_encode_string(&args, "cd");
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_empty_list(&args);
    ei_x_encode_empty_list(&args);
    ei_x_encode_long(&args, 0xE9);
    ei_x_encode_binary(&args, "e", 1);
    ei_x_encode_empty_list(&args);
    expect_error("fail", args, "abcd\xC3\xA9" "e");

    ei_x_new_with_version(&args); /* [[]] */
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_empty_list(&args);
    ei_x_encode_empty_list(&args);
    expect_error("fail", args, "");
}

static void test_demo_fail_cuts_long_messages(void **state) {
    char *big = malloc(5000);
    ei_x_buff args;
    run_t r;

    (void)state;
    assert_non_null(big);
    memset(big, 'x', 5000);
    args = binary_args(big, 5000);
    run(&r, "fail", &args);
    assert_int_equal(r.status, MOAT_ERROR);
    assert_int_equal(strlen(r.f.error), 1023);
    done(&r);
    free(big);
}

static void test_demo_fail_rejects_wrong_shapes(void **state) {
    ei_x_buff args;

    (void)state;
    expect_badarg("fail", atom_args("oops"));
    expect_badarg("fail", int_args(7));
    expect_badarg("fail", string_args("A")); /* [65]: an integer, not text */
    ei_x_new_with_version(&args); /* [[-1]] */
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_long(&args, -1);
    ei_x_encode_empty_list(&args);
    ei_x_encode_empty_list(&args);
    expect_badarg("fail", args);
    ei_x_new_with_version(&args); /* [[0xD800]]: a surrogate */
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_long(&args, 0xD800);
    ei_x_encode_empty_list(&args);
    ei_x_encode_empty_list(&args);
    expect_badarg("fail", args);
    ei_x_new_with_version(&args); /* [[a]] */
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_atom(&args, "a");
    ei_x_encode_empty_list(&args);
    ei_x_encode_empty_list(&args);
    expect_badarg("fail", args);
}

static void test_demo_exit_ends_with_the_reason(void **state) {
    ei_x_buff args, reason;
    run_t r;

    (void)state;
    ei_x_new(&reason); /* {shutdown, {tcp_closed, "peer"}} */
    ei_x_encode_tuple_header(&reason, 2);
    ei_x_encode_atom(&reason, "shutdown");
    ei_x_encode_tuple_header(&reason, 2);
    ei_x_encode_atom(&reason, "tcp_closed");
    ei_x_encode_string(&reason, "peer");
    ei_x_new_with_version(&args);
    ei_x_encode_list_header(&args, 1);
    ei_x_append(&args, &reason);
    ei_x_encode_empty_list(&args);
    run(&r, "exit", &args);
    assert_int_equal(r.status, MOAT_EXIT);
    assert_int_equal(r.out.index, 1 + reason.index);
    assert_memory_equal(r.out.buff + 1, reason.buff, (size_t)reason.index);
    done(&r);
    ei_x_free(&reason);

    args = atom_args("normal");
    run(&r, "exit", &args);
    expect_atom(&r, MOAT_EXIT, "normal");
    done(&r);
    expect_badarg("exit", no_args());
}

static void test_demo_alloc_touches_and_frees(void **state) {
    ei_x_buff args;
    run_t r;

    (void)state;
    args = int_args(0);
    run(&r, "alloc", &args);
    expect_atom(&r, MOAT_OK, "ok");
    done(&r);
    args = int_args(3 * 1024 * 1024 + 7);
    run(&r, "alloc", &args);
    expect_atom(&r, MOAT_OK, "ok");
    done(&r);
    expect_error("alloc", int_args(1LL << 62), "out of memory");
    expect_badarg("alloc", int_args(-1));
    expect_badarg("alloc", atom_args("lots"));
}

static void test_demo_fib_computes(void **state) {
    static const long long want[][2] = {
        {0, 0}, {1, 1}, {2, 1}, {10, 55}, {25, 75025}};
    ei_x_buff args;
    run_t r;
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        args = int_args(want[i][0]);
        run(&r, "fib", &args);
        expect_integer(&r, want[i][1]);
        done(&r);
    }
    expect_badarg("fib", int_args(-1));
    expect_badarg("fib", int_args(94)); /* past 64 bits */
    expect_badarg("fib", atom_args("ten"));
}

static void test_demo_sum_adds_the_bytes(void **state) {
    unsigned char bytes[1000];
    ei_x_buff args;
    run_t r;

    (void)state;
    args = binary_args("\x01\x02\x03", 3);
    run(&r, "sum", &args);
    expect_integer(&r, 6);
    done(&r);
    args = binary_args("", 0);
    run(&r, "sum", &args);
    expect_integer(&r, 0);
    done(&r);
    memset(bytes, 255, sizeof(bytes));
    args = binary_args(bytes, sizeof(bytes));
    run(&r, "sum", &args);
    expect_integer(&r, 255000);
    done(&r);
    expect_badarg("sum", atom_args("abc"));
    expect_badarg("sum", string_args("A"));
    ei_x_new_with_version(&args); /* ["abc"]: a string is not a binary */
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_string(&args, "abc");
    ei_x_encode_empty_list(&args);
    expect_badarg("sum", args);
}

/* ---------------------------------------------------------- counter */

static const moat_server_def_t *counter(void) {
    const moat_server_def_t *s = moat_lib_server(demo, "counter", 7);

    assert_non_null(s);
    return s;
}

/* Encodes a request: `name`, or {name, n} when with_n. */
static void request(ei_x_buff *x, const char *name, int with_n,
                    long long n) {
    ei_x_new_with_version(x);
    if (with_n) {
        ei_x_encode_tuple_header(x, 2);
        ei_x_encode_atom(x, name);
        ei_x_encode_longlong(x, n);
    } else {
        ei_x_encode_atom(x, name);
    }
}

static int call(fake_ctx_t *f, void *st, const char *name, int with_n,
                long long n, ei_x_buff *out) {
    ei_x_buff req;
    int rc;

    request(&req, name, with_n, n);
    ei_x_new_with_version(out);
    rc = counter()->handle_call(&f->ctx, st, req.buff, req.index, out);
    ei_x_free(&req);
    return rc;
}

static void call_expect_count(fake_ctx_t *f, void *st, const char *name,
                              int with_n, long long n, long long count) {
    run_t r;

    r.status = call(f, st, name, with_n, n, &r.out);
    expect_integer(&r, count);
    done(&r);
}

static void call_expect_bad_request(fake_ctx_t *f, void *st,
                                    const char *name, int with_n,
                                    long long n) {
    char atom[MAXATOMLEN_UTF8];
    ei_x_buff out;
    int index = 1, arity;

    assert_int_equal(call(f, st, name, with_n, n, &out), MOAT_OK);
    assert_int_equal(ei_decode_tuple_header(out.buff, &index, &arity), 0);
    assert_int_equal(arity, 2);
    assert_int_equal(ei_decode_atom(out.buff, &index, atom), 0);
    assert_string_equal(atom, "error");
    assert_int_equal(ei_decode_atom(out.buff, &index, atom), 0);
    assert_string_equal(atom, "badarg");
    ei_x_free(&out);
}

static void cast(fake_ctx_t *f, void *st, const char *name, int with_n,
                 long long n) {
    ei_x_buff req, out;

    request(&req, name, with_n, n);
    ei_x_new_with_version(&out);
    assert_int_equal(
        counter()->handle_cast(&f->ctx, st, req.buff, req.index, &out),
        MOAT_OK);
    assert_int_equal(out.index, 1); /* a cast encodes nothing */
    ei_x_free(&req);
    ei_x_free(&out);
}

static void *start(fake_ctx_t *f, long long initial) {
    ei_x_buff args = int_args(initial), out;
    void *st = NULL;

    ei_x_new_with_version(&out);
    assert_int_equal(
        counter()->init(&f->ctx, args.buff, args.index, &st, &out), MOAT_OK);
    assert_non_null(st);
    ei_x_free(&args);
    ei_x_free(&out);
    return st;
}

static void stop(fake_ctx_t *f, void *st) {
    static const char reason[] = {(char)131, 119, 6, 'n', 'o', 'r', 'm', 'a',
                                  'l'};

    counter()->terminate(&f->ctx, st, reason, sizeof(reason));
}

static void test_demo_counter_counts(void **state) {
    fake_ctx_t f;
    void *st;

    (void)state;
    fake_ctx_init(&f);
    st = start(&f, 5);
    call_expect_count(&f, st, "get", 0, 0, 5);
    call_expect_count(&f, st, "add", 1, 3, 8);
    cast(&f, st, "add", 1, 2);
    call_expect_count(&f, st, "get", 0, 0, 10);
    call_expect_count(&f, st, "add", 1, -20, -10);
    cast(&f, st, "junk", 0, 0); /* dropped */
    cast(&f, st, "add", 1, LLONG_MAX);
    call_expect_count(&f, st, "add", 1, 0, LLONG_MAX - 10);
    cast(&f, st, "add", 1, 11); /* would overflow: dropped */
    call_expect_count(&f, st, "get", 0, 0, LLONG_MAX - 10);
    stop(&f, st);
}

static void test_demo_counter_answers_bad_requests(void **state) {
    fake_ctx_t f;
    void *st;

    (void)state;
    fake_ctx_init(&f);
    st = start(&f, 1);
    call_expect_bad_request(&f, st, "reset", 0, 0);
    call_expect_bad_request(&f, st, "sub", 1, 1);
    call_expect_bad_request(&f, st, "add", 1, LLONG_MAX); /* overflow */
    call_expect_count(&f, st, "get", 0, 0, 1);            /* unchanged */
    stop(&f, st);
}

static void test_demo_counter_crash_and_stop(void **state) {
    ei_x_buff out;
    run_t r;
    fake_ctx_t f;
    void *st;

    (void)state;
    fake_ctx_init(&f);
    st = start(&f, 0);
    assert_int_equal(call(&f, st, "crash", 0, 0, &out), MOAT_ERROR);
    assert_string_equal(f.error, "crash");
    ei_x_free(&out);
    r.status = call(&f, st, "stop", 0, 0, &r.out);
    expect_atom(&r, MOAT_EXIT, "normal");
    done(&r);
    stop(&f, st);
}

static void test_demo_counter_refuses_bad_start_args(void **state) {
    ei_x_buff args = atom_args("zero"), out;
    fake_ctx_t f;
    void *st = NULL;
    run_t r;

    (void)state;
    fake_ctx_init(&f);
    ei_x_new_with_version(&out);
    r.status = counter()->init(&f.ctx, args.buff, args.index, &st, &out);
    r.out = out;
    expect_atom(&r, MOAT_EXIT, "badarg");
    assert_null(st);
    done(&r);
    ei_x_free(&args);
}

/* Sends a request given as ready ETF (version byte first). */
static int call_raw(fake_ctx_t *f, void *st, ei_x_buff *req, ei_x_buff *out) {
    int rc;

    ei_x_new_with_version(out);
    rc = counter()->handle_call(&f->ctx, st, req->buff, req->index, out);
    ei_x_free(req);
    return rc;
}

/* {stop, Reason} ends with Reason byte for byte; {sleep, Ms} replies the
 * count after about Ms, sooner once the server is asked to stop. */
static void test_demo_counter_stop_with_reason_and_sleep(void **state) {
    ei_x_buff req, out;
    char atom[MAXATOMLEN_UTF8];
    fake_ctx_t f;
    long long t0;
    int index = 1, arity;
    void *st;
    run_t r;

    (void)state;
    fake_ctx_init(&f);
    st = start(&f, 7);
    ei_x_new_with_version(&req);
    ei_x_encode_tuple_header(&req, 2);
    ei_x_encode_atom(&req, "stop");
    ei_x_encode_tuple_header(&req, 2);
    ei_x_encode_atom(&req, "shutdown");
    ei_x_encode_atom(&req, "bye");
    assert_int_equal(call_raw(&f, st, &req, &out), MOAT_EXIT);
    assert_int_equal(ei_decode_tuple_header(out.buff, &index, &arity), 0);
    assert_int_equal(arity, 2);
    assert_int_equal(ei_decode_atom(out.buff, &index, atom), 0);
    assert_string_equal(atom, "shutdown");
    assert_int_equal(ei_decode_atom(out.buff, &index, atom), 0);
    assert_string_equal(atom, "bye");
    assert_int_equal(index, out.index);
    ei_x_free(&out);

    t0 = now_ms();
    r.status = call(&f, st, "sleep", 1, 30, &r.out);
    expect_integer(&r, 7);
    done(&r);
    assert_true(now_ms() - t0 >= 30);
    f.stop_after = 1;
    t0 = now_ms();
    r.status = call(&f, st, "sleep", 1, 60000, &r.out);
    expect_integer(&r, 7);
    done(&r);
    assert_true(now_ms() - t0 < 30000);
    call_expect_bad_request(&f, st, "sleep", 1, -1);
    stop(&f, st);
}

/* start_seq numbers starts across counters; [Initial, StopMs] makes
 * terminate take StopMs. */
static void test_demo_counter_start_seq_and_slow_stop(void **state) {
    ei_x_buff args, out;
    fake_ctx_t f;
    long long a, b, t0;
    void *st1, *st2 = NULL;
    run_t r;

    (void)state;
    fake_ctx_init(&f);
    st1 = start(&f, 0);
    ei_x_new_with_version(&args);
    ei_x_encode_list_header(&args, 2);
    ei_x_encode_longlong(&args, 3);
    ei_x_encode_longlong(&args, 40);
    ei_x_encode_empty_list(&args);
    ei_x_new_with_version(&out);
    assert_int_equal(
        counter()->init(&f.ctx, args.buff, args.index, &st2, &out), MOAT_OK);
    ei_x_free(&args);
    ei_x_free(&out);
    r.status = call(&f, st1, "start_seq", 0, 0, &r.out);
    assert_int_equal(r.status, MOAT_OK);
    index_integer(&r, &a);
    done(&r);
    r.status = call(&f, st2, "start_seq", 0, 0, &r.out);
    index_integer(&r, &b);
    done(&r);
    assert_true(a >= 1);
    assert_int_equal(b, a + 1);
    call_expect_count(&f, st2, "get", 0, 0, 3);
    stop(&f, st1);
    t0 = now_ms();
    stop(&f, st2);
    assert_true(now_ms() - t0 >= 40);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_demo_table_has_segfault_and_abort),
        cmocka_unit_test(test_demo_echo_returns_its_argument),
        cmocka_unit_test(test_demo_echo_reads_string_encoded_args),
        cmocka_unit_test(test_demo_echo_rejects_wrong_shapes),
        cmocka_unit_test(test_demo_sleep_returns_ok),
        cmocka_unit_test(test_demo_sleep_stops_early_when_cancelled),
        cmocka_unit_test(test_demo_sleep_rejects_wrong_shapes),
        cmocka_unit_test(test_demo_spin_ignores_cancellation),
        cmocka_unit_test(test_demo_fail_raises_the_message),
        cmocka_unit_test(test_demo_fail_cuts_long_messages),
        cmocka_unit_test(test_demo_fail_rejects_wrong_shapes),
        cmocka_unit_test(test_demo_exit_ends_with_the_reason),
        cmocka_unit_test(test_demo_alloc_touches_and_frees),
        cmocka_unit_test(test_demo_fib_computes),
        cmocka_unit_test(test_demo_sum_adds_the_bytes),
        cmocka_unit_test(test_demo_counter_counts),
        cmocka_unit_test(test_demo_counter_answers_bad_requests),
        cmocka_unit_test(test_demo_counter_crash_and_stop),
        cmocka_unit_test(test_demo_counter_refuses_bad_start_args),
        cmocka_unit_test(test_demo_counter_stop_with_reason_and_sleep),
        cmocka_unit_test(test_demo_counter_start_seq_and_slow_stop),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
