/*
 * moat_demo.c: the demo task library (DESIGN.md §6), used by the tests and
 * the benchmarks, and the example to copy when writing a library.
 *
 * Every task takes its arguments as a list and rejects any other shape by
 * ending with the atom `badarg` (MOAT_EXIT), as a BIF would.  moat has
 * checked that `args` is one well-formed term before a task runs, which is
 * what makes ei's decoders (they take no length) safe here.
 *
 * Tasks:
 *   echo [T]         T
 *   sleep [Ms]       sleeps in steps of at most 1 ms, returns ok.  Once
 *                    moat_should_stop() is true it returns ok at once:
 *                    moat has already given the task its outcome
 *                    (shutdown, killed or timeout) and discards what a
 *                    cancelled task returns, so stopping early only gives
 *                    the thread back.
 *   spin [Us]        busy loop for Us microseconds on the monotonic clock,
 *                    ignoring cancellation (the abandoned-task case);
 *                    returns ok
 *   fail [Msg]       raises {native_error, Msg}; Msg is chardata: a
 *                    binary, a charlist, or lists nesting both (code points
 *                    are written as UTF-8, a NUL ends the message)
 *   exit [Reason]    ends with Reason, byte for byte
 *   segfault []      writes through a null pointer
 *   abort []         calls abort()
 *   alloc [Bytes]    mallocs Bytes, touches every page, frees, returns ok;
 *                    raises "out of memory" when malloc fails
 *   fib [N]          naive recursive Fibonacci, 0 =< N =< 93 (fib(93) is
 *                    the last that fits 64 bits); ignores cancellation
 *   sum [Binary]     the sum of the bytes
 *
 * Server `counter`, started with [Initial] or [Initial, StopMs]:
 *   call get         replies the count
 *   call {add, N}    adds N, replies the new count
 *   call crash       fails with {native_error, <<"crash">>}
 *   call stop        stops with reason normal
 *   call {stop, R}   stops with reason R, byte for byte
 *   call {sleep, Ms} sleeps Ms milliseconds (less if the server is
 *                    killed meanwhile), then replies the count
 *   call start_seq   replies which counter start this one was, counted
 *                    from 1 across every counter of the loaded library
 *                    (so tests can see the order of restarts)
 *   call segfault    writes through a null pointer, as the task does: a
 *                    hard fault where the server runs
 *   call os_pid      replies the OS pid of the process the server runs in
 *   cast {add, N}    adds N
 * terminate sleeps StopMs milliseconds (0 by default) before freeing the
 * state: a server that is slow to stop, for shutdown tests.
 * Any other call, or an add that would overflow 64 bits, is answered with
 * {error, badarg} and the server carries on: a bad request is the caller's
 * fault, not a reason to lose the count.  Other casts are dropped.
 */
#include <limits.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moat.h"

#define ETF_VERSION 131

/* Longest sleep step, so cancellation is noticed within a millisecond. */
#define SLEEP_STEP_NS 1000000LL

/* The largest N whose Fibonacci number fits an unsigned 64-bit integer. */
#define FIB_MAX 93

/* moat cuts an error message at 1023 bytes; read no more than that. */
#define MESSAGE_MAX 1023

/* Deeper chardata than this is refused rather than recursed into. */
#define CHARDATA_MAX_DEPTH 100

/* ------------------------------------------------------------- helpers */

/* Ends with the term just encoded, or with an error if encoding failed
 * (ei's only failure is running out of memory). */
static int done(moat_ctx_t *ctx, int status, int ei_rc) {
    return ei_rc < 0 ? moat_error(ctx, "out of memory") : status;
}

static int badarg(moat_ctx_t *ctx, ei_x_buff *out) {
    return done(ctx, MOAT_EXIT, ei_x_encode_atom(out, "badarg"));
}

static int ok(moat_ctx_t *ctx, ei_x_buff *out) {
    return done(ctx, MOAT_OK, ei_x_encode_atom(out, "ok"));
}

/* Where a term starts: after the version byte, if there is one. */
static int term_start(const char *buf, int len) {
    return len > 0 && (unsigned char)buf[0] == ETF_VERSION ? 1 : 0;
}

/*
 * A cursor over an argument list.  term_to_binary encodes a list of small
 * integers as a string ([100] arrives as "d"), so both forms are read.
 */
typedef struct {
    const char *buf;
    int index;                  /* list form: the next element */
    const unsigned char *bytes; /* string form: the elements, else NULL */
    int left;
} args_t;

/* Opens `args` when it is a proper list of exactly n elements. */
static int args_open(const char *args, int len, int n, args_t *a) {
    int index = term_start(args, len), type, size, arity, i;

    a->buf = args;
    a->bytes = NULL;
    a->left = n;
    if (index >= len || ei_get_type(args, &index, &type, &size) < 0)
        return -1;
    if (type == ERL_STRING_EXT) {
        a->bytes = (const unsigned char *)args + index + 3;
        return size == n ? 0 : -1;
    }
    if (type == ERL_NIL_EXT)
        return n == 0 ? 0 : -1;
    if (type != ERL_LIST_EXT ||
        ei_decode_list_header(args, &index, &arity) < 0 || arity != n)
        return -1;
    a->index = index;
    for (i = 0; i < n; i++)
        if (ei_skip_term(args, &index) < 0)
            return -1;
    /* a proper list: the tail is [] */
    if (ei_get_type(args, &index, &type, &size) < 0 || type != ERL_NIL_EXT)
        return -1;
    return 0;
}

static int arg_integer(args_t *a, long long *v) {
    if (a->left-- <= 0)
        return -1;
    if (a->bytes != NULL) {
        *v = *a->bytes++;
        return 0;
    }
    return ei_decode_longlong(a->buf, &a->index, v);
}

/* Appends the next argument, as it is, to `out`. */
static int arg_copy(args_t *a, ei_x_buff *out) {
    int start;

    if (a->left-- <= 0)
        return -1;
    if (a->bytes != NULL)
        return ei_x_encode_long(out, *a->bytes++);
    start = a->index;
    if (ei_skip_term(a->buf, &a->index) < 0)
        return -1;
    return ei_x_append_buf(out, a->buf + start, a->index - start);
}

static int arg_binary(args_t *a, const unsigned char **data, size_t *len) {
    int type, size;

    if (a->left-- <= 0 || a->bytes != NULL)
        return -1;
    if (ei_get_type(a->buf, &a->index, &type, &size) < 0 ||
        type != ERL_BINARY_EXT)
        return -1;
    /* BINARY_EXT: tag, four length bytes, the data */
    *data = (const unsigned char *)a->buf + a->index + 5;
    *len = (uint32_t)size;
    a->index += 5 + size;
    return 0;
}

static long long now_ns(void) {
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* now + delta_ns, saturating instead of overflowing. */
static long long deadline_after(long long delta, long long unit) {
    long long now = now_ns();

    if (delta > (LLONG_MAX - now) / unit)
        return LLONG_MAX;
    return now + delta * unit;
}

/* Sleeps ms milliseconds in steps, returning early once should_stop says
 * so (ctx may be NULL: no early return). */
static void sleep_ms(moat_ctx_t *ctx, long long ms) {
    struct timespec step;
    long long deadline = deadline_after(ms, 1000000LL), left;

    while (ctx == NULL || !moat_should_stop(ctx)) {
        left = deadline - now_ns();
        if (left <= 0)
            break;
        if (left > SLEEP_STEP_NS)
            left = SLEEP_STEP_NS;
        step.tv_sec = 0;
        step.tv_nsec = (long)left;
        nanosleep(&step, NULL);
    }
}

/* ---------------------------------------------------------------- tasks */

static int task_echo(moat_ctx_t *ctx, const char *args, int len,
                     ei_x_buff *out) {
    args_t a;

    if (args_open(args, len, 1, &a) < 0)
        return badarg(ctx, out);
    return done(ctx, MOAT_OK, arg_copy(&a, out));
}

static int task_sleep(moat_ctx_t *ctx, const char *args, int len,
                      ei_x_buff *out) {
    long long ms;
    args_t a;

    if (args_open(args, len, 1, &a) < 0 || arg_integer(&a, &ms) < 0 ||
        ms < 0)
        return badarg(ctx, out);
    sleep_ms(ctx, ms);
    return ok(ctx, out);
}

static int task_spin(moat_ctx_t *ctx, const char *args, int len,
                     ei_x_buff *out) {
    long long us, deadline;
    args_t a;

    if (args_open(args, len, 1, &a) < 0 || arg_integer(&a, &us) < 0 ||
        us < 0)
        return badarg(ctx, out);
    deadline = deadline_after(us, 1000LL);
    while (now_ns() < deadline)
        ;
    return ok(ctx, out);
}

/* The message of `fail`, cut at MESSAGE_MAX bytes. */
typedef struct {
    char buf[MESSAGE_MAX];
    size_t len;
} text_t;

static void put_bytes(text_t *t, const void *p, size_t n) {
    if (n > sizeof(t->buf) - t->len)
        n = sizeof(t->buf) - t->len;
    memcpy(t->buf + t->len, p, n);
    t->len += n;
}

static int put_code_point(text_t *t, long long cp) {
    unsigned char u[4];
    size_t n;

    if (cp < 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return -1;
    if (cp < 0x80) {
        u[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (unsigned char)(0xC0 | cp >> 6);
        u[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (unsigned char)(0xE0 | cp >> 12);
        u[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (unsigned char)(0xF0 | cp >> 18);
        u[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        u[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    put_bytes(t, u, n);
    return 0;
}

/* Appends the chardata at *index: a binary, a string, or a list of code
 * points and chardata whose tail is [] or a binary. */
static int chardata(const char *buf, int *index, text_t *t, int depth) {
    int type, size, i, n;
    long long cp;

    if (depth > CHARDATA_MAX_DEPTH ||
        ei_get_type(buf, index, &type, &size) < 0)
        return -1;
    switch (type) {
    case ERL_BINARY_EXT:
        put_bytes(t, buf + *index + 5, (uint32_t)size);
        *index += 5 + size;
        return 0;
    case ERL_STRING_EXT:
        for (i = 0; i < size; i++)
            put_code_point(t, (unsigned char)buf[*index + 3 + i]);
        *index += 3 + size;
        return 0;
    case ERL_NIL_EXT:
        *index += 1;
        return 0;
    case ERL_LIST_EXT:
        if (ei_decode_list_header(buf, index, &n) < 0)
            return -1;
        break;
    default:
        return -1;
    }
    for (i = 0; i < n; i++) {
        if (ei_get_type(buf, index, &type, &size) < 0)
            return -1;
        if (type == ERL_SMALL_INTEGER_EXT || type == ERL_INTEGER_EXT) {
            if (ei_decode_longlong(buf, index, &cp) < 0 ||
                put_code_point(t, cp) < 0)
                return -1;
        } else if (chardata(buf, index, t, depth + 1) < 0) {
            return -1;
        }
    }
    /* the tail: [] or a binary */
    if (ei_get_type(buf, index, &type, &size) < 0 ||
        (type != ERL_NIL_EXT && type != ERL_BINARY_EXT))
        return -1;
    return chardata(buf, index, t, depth + 1);
}

static int task_fail(moat_ctx_t *ctx, const char *args, int len,
                     ei_x_buff *out) {
    text_t text;
    args_t a;

    text.len = 0;
    if (args_open(args, len, 1, &a) < 0 || a.bytes != NULL ||
        chardata(args, &a.index, &text, 0) < 0)
        return badarg(ctx, out);
    return moat_error(ctx, "%.*s", (int)text.len, text.buf);
}

static int task_exit(moat_ctx_t *ctx, const char *args, int len,
                     ei_x_buff *out) {
    args_t a;

    if (args_open(args, len, 1, &a) < 0)
        return badarg(ctx, out);
    return done(ctx, MOAT_EXIT, arg_copy(&a, out));
}

/* Read through a volatile object, so the compiler cannot see the pointer is
 * null and replace the store with a trap (SIGILL instead of SIGSEGV). */
static int *volatile null_target = NULL;

static int task_segfault(moat_ctx_t *ctx, const char *args, int len,
                         ei_x_buff *out) {
    args_t a;

    if (args_open(args, len, 0, &a) < 0)
        return badarg(ctx, out);
    *(volatile int *)null_target = 1;
    return ok(ctx, out);
}

static int task_abort(moat_ctx_t *ctx, const char *args, int len,
                      ei_x_buff *out) {
    args_t a;

    if (args_open(args, len, 0, &a) < 0)
        return badarg(ctx, out);
    abort();
}

static int task_alloc(moat_ctx_t *ctx, const char *args, int len,
                      ei_x_buff *out) {
    volatile char *p; /* volatile: the compiler may drop unread stores */
    long long bytes;
    size_t i, n, page;
    args_t a;

    if (args_open(args, len, 1, &a) < 0 || arg_integer(&a, &bytes) < 0 ||
        bytes < 0)
        return badarg(ctx, out);
    if ((unsigned long long)bytes > SIZE_MAX)
        return moat_error(ctx, "out of memory");
    n = (size_t)bytes;
    if (n > 0) {
        p = malloc(n);
        if (p == NULL)
            return moat_error(ctx, "out of memory");
        page = (size_t)sysconf(_SC_PAGESIZE);
        for (i = 0; i < n; i += page)
            p[i] = 1;
        p[n - 1] = 1;
        free((void *)p);
    }
    return ok(ctx, out);
}

static unsigned long long fib(unsigned n) {
    return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

static int task_fib(moat_ctx_t *ctx, const char *args, int len,
                    ei_x_buff *out) {
    long long n;
    args_t a;

    if (args_open(args, len, 1, &a) < 0 || arg_integer(&a, &n) < 0 ||
        n < 0 || n > FIB_MAX)
        return badarg(ctx, out);
    return done(ctx, MOAT_OK, ei_x_encode_ulonglong(out, fib((unsigned)n)));
}

static int task_sum(moat_ctx_t *ctx, const char *args, int len,
                    ei_x_buff *out) {
    const unsigned char *data;
    unsigned long long sum = 0;
    size_t n, i;
    args_t a;

    if (args_open(args, len, 1, &a) < 0 || arg_binary(&a, &data, &n) < 0)
        return badarg(ctx, out);
    for (i = 0; i < n; i++)
        sum += data[i];
    return done(ctx, MOAT_OK, ei_x_encode_ulonglong(out, sum));
}

/* --------------------------------------------------------------- counter */

typedef struct {
    long long count;
    long long stop_ms;
    long long seq;
} counter_t;

static atomic_llong counter_starts;

typedef enum {
    REQ_BAD,
    REQ_GET,
    REQ_ADD,
    REQ_CRASH,
    REQ_STOP,
    REQ_STOP_WITH,
    REQ_SLEEP,
    REQ_START_SEQ,
    REQ_SEGFAULT,
    REQ_OS_PID
} request_t;

/* Parses get, crash, stop, start_seq, segfault, os_pid, {add, N},
 * {sleep, Ms} and {stop, Reason}; for the last, *arg is where Reason
 * starts in req. */
static request_t parse_request(const char *req, int len, long long *n,
                               int *arg) {
    char name[MAXATOMLEN_UTF8];
    int index = term_start(req, len), arity;

    if (index >= len)
        return REQ_BAD;
    if (ei_decode_atom_as(req, &index, name, sizeof(name), ERLANG_UTF8, NULL,
                          NULL) == 0) {
        if (strcmp(name, "get") == 0)
            return REQ_GET;
        if (strcmp(name, "crash") == 0)
            return REQ_CRASH;
        if (strcmp(name, "stop") == 0)
            return REQ_STOP;
        if (strcmp(name, "start_seq") == 0)
            return REQ_START_SEQ;
        if (strcmp(name, "segfault") == 0)
            return REQ_SEGFAULT;
        if (strcmp(name, "os_pid") == 0)
            return REQ_OS_PID;
        return REQ_BAD;
    }
    if (ei_decode_tuple_header(req, &index, &arity) < 0 || arity != 2 ||
        ei_decode_atom_as(req, &index, name, sizeof(name), ERLANG_UTF8, NULL,
                          NULL) < 0)
        return REQ_BAD;
    *arg = index;
    if (strcmp(name, "stop") == 0)
        return ei_skip_term(req, &index) == 0 && index <= len ? REQ_STOP_WITH
                                                              : REQ_BAD;
    if (ei_decode_longlong(req, &index, n) < 0)
        return REQ_BAD;
    if (strcmp(name, "add") == 0)
        return REQ_ADD;
    if (strcmp(name, "sleep") == 0 && *n >= 0)
        return REQ_SLEEP;
    return REQ_BAD;
}

static int counter_init(moat_ctx_t *ctx, const char *args, int len,
                        void **state, ei_x_buff *out) {
    long long initial, stop_ms = 0;
    counter_t *c;
    args_t a;

    if (args_open(args, len, 1, &a) == 0) {
        if (arg_integer(&a, &initial) < 0)
            return badarg(ctx, out);
    } else if (args_open(args, len, 2, &a) < 0 ||
               arg_integer(&a, &initial) < 0 ||
               arg_integer(&a, &stop_ms) < 0 || stop_ms < 0) {
        return badarg(ctx, out);
    }
    c = malloc(sizeof(*c));
    if (c == NULL)
        return moat_error(ctx, "out of memory");
    c->count = initial;
    c->stop_ms = stop_ms;
    c->seq = atomic_fetch_add(&counter_starts, 1) + 1;
    *state = c;
    return MOAT_OK;
}

static int reply_bad_request(moat_ctx_t *ctx, ei_x_buff *out) {
    if (ei_x_encode_tuple_header(out, 2) < 0 ||
        ei_x_encode_atom(out, "error") < 0)
        return moat_error(ctx, "out of memory");
    return done(ctx, MOAT_OK, ei_x_encode_atom(out, "badarg"));
}

static int counter_call(moat_ctx_t *ctx, void *state, const char *req,
                        int len, ei_x_buff *out) {
    counter_t *c = state;
    long long n, sum;
    int arg = 0, end;

    switch (parse_request(req, len, &n, &arg)) {
    case REQ_GET:
        return done(ctx, MOAT_OK, ei_x_encode_longlong(out, c->count));
    case REQ_ADD:
        if (__builtin_add_overflow(c->count, n, &sum))
            return reply_bad_request(ctx, out);
        c->count = sum;
        return done(ctx, MOAT_OK, ei_x_encode_longlong(out, c->count));
    case REQ_CRASH:
        return moat_error(ctx, "crash");
    case REQ_STOP:
        return done(ctx, MOAT_EXIT, ei_x_encode_atom(out, "normal"));
    case REQ_STOP_WITH:
        end = arg;
        ei_skip_term(req, &end); /* checked by parse_request */
        return done(ctx, MOAT_EXIT, ei_x_append_buf(out, req + arg, end - arg));
    case REQ_SLEEP:
        sleep_ms(ctx, n); /* a kill ends it early */
        return done(ctx, MOAT_OK, ei_x_encode_longlong(out, c->count));
    case REQ_START_SEQ:
        return done(ctx, MOAT_OK, ei_x_encode_longlong(out, c->seq));
    case REQ_SEGFAULT:
        *(volatile int *)null_target = 1;
        return reply_bad_request(ctx, out); /* not reached */
    case REQ_OS_PID:
        return done(ctx, MOAT_OK, ei_x_encode_long(out, (long)getpid()));
    default:
        return reply_bad_request(ctx, out);
    }
}

static int counter_cast(moat_ctx_t *ctx, void *state, const char *req,
                        int len, ei_x_buff *out) {
    counter_t *c = state;
    long long n, sum;
    int arg;

    (void)ctx;
    (void)out;
    if (parse_request(req, len, &n, &arg) == REQ_ADD &&
        !__builtin_add_overflow(c->count, n, &sum))
        c->count = sum;
    return MOAT_OK;
}

static void counter_terminate(moat_ctx_t *ctx, void *state,
                              const char *reason, int reason_len) {
    counter_t *c = state;

    (void)ctx;
    (void)reason;
    (void)reason_len;
    if (c->stop_ms > 0)
        sleep_ms(NULL, c->stop_ms);
    free(c);
}

/* ----------------------------------------------------------------- table */

static const moat_task_def_t tasks[] = {
    {"echo", task_echo},         {"sleep", task_sleep},
    {"spin", task_spin},         {"fail", task_fail},
    {"exit", task_exit},         {"segfault", task_segfault},
    {"abort", task_abort},       {"alloc", task_alloc},
    {"fib", task_fib},           {"sum", task_sum},
    {NULL, NULL},
};

static const moat_server_def_t servers[] = {
    {"counter", counter_init, counter_call, counter_cast, counter_terminate},
    {NULL, NULL, NULL, NULL, NULL},
};

MOAT_LIBRARY("moat_demo", tasks, servers)
