/* tsrv.c: the test server of tsrv.h. */
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "tsrv.h"

atomic_int tsrv_gate;
atomic_int tsrv_fail_init = -1;

static uv_mutex_t log_lock;
static uv_once_t log_once = UV_ONCE_INIT;
static tsrv_event_t events[100000];
static int nevents;

static void log_init(void) { uv_mutex_init(&log_lock); }

static void record(char what, int n) {
    uv_once(&log_once, log_init);
    uv_mutex_lock(&log_lock);
    if (nevents < (int)(sizeof events / sizeof events[0]))
        events[nevents++] = (tsrv_event_t){what, n};
    uv_mutex_unlock(&log_lock);
}

void tsrv_reset(void) {
    uv_once(&log_once, log_init);
    uv_mutex_lock(&log_lock);
    nevents = 0;
    uv_mutex_unlock(&log_lock);
    atomic_store(&tsrv_gate, 0);
    atomic_store(&tsrv_fail_init, -1);
}

int tsrv_log(tsrv_event_t *out, int max) {
    int n;
    uv_once(&log_once, log_init);
    uv_mutex_lock(&log_lock);
    n = nevents < max ? nevents : max;
    memcpy(out, events, (size_t)n * sizeof *out);
    uv_mutex_unlock(&log_lock);
    return n;
}

int tsrv_count(char what, int n) {
    int c = 0;
    uv_once(&log_once, log_init);
    uv_mutex_lock(&log_lock);
    for (int i = 0; i < nevents; i++)
        c += events[i].what == what && events[i].n == n;
    uv_mutex_unlock(&log_lock);
    return c;
}

void tsrv_wait(char what, int n, int times) {
    for (long i = 0; tsrv_count(what, n) < times; i++) {
        if (i > 100000000L)
            abort(); /* a lost event: fail loudly rather than hang */
        sched_yield();
    }
}

moat_term_t *tsrv_args(int n) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_long(&x, n);
    ei_x_encode_empty_list(&x);
    return moat_term_from_x(&x);
}

typedef struct state_s {
    int n;
    long count;
} state_t;

static int init(moat_ctx_t *ctx, const char *args, int len, void **state,
                ei_x_buff *out) {
    int i = 0, v, arity;
    long n;
    state_t *s;
    (void)len;
    (void)out;
    if (ei_decode_version(args, &i, &v) || ei_decode_list_header(args, &i,
                                                                 &arity) ||
        arity != 1 || ei_decode_long(args, &i, &n))
        return moat_error(ctx, "bad args");
    if (n == atomic_load(&tsrv_fail_init))
        return moat_error(ctx, "init failed");
    if ((s = calloc(1, sizeof *s)) == NULL)
        return moat_error(ctx, "enomem");
    s->n = (int)n;
    *state = s;
    record('s', (int)n);
    return MOAT_OK;
}

static int atom_of(const char *req, char *atom) {
    int i = 0, v;
    return ei_decode_version(req, &i, &v) || ei_decode_atom(req, &i, atom);
}

static int call(moat_ctx_t *ctx, void *state, const char *req, int len,
                ei_x_buff *out) {
    state_t *s = state;
    char a[MAXATOMLEN];
    (void)len;
    if (atom_of(req, a))
        return moat_error(ctx, "bad request");
    if (strcmp(a, "get") == 0) {
        ei_x_encode_long(out, s->count);
    } else if (strcmp(a, "inc") == 0) {
        ei_x_encode_long(out, ++s->count);
    } else if (strcmp(a, "crash") == 0) {
        return moat_error(ctx, "crash");
    } else if (strcmp(a, "stop") == 0) {
        ei_x_encode_atom(out, "normal");
        return MOAT_EXIT;
    } else if (strcmp(a, "exit") == 0) {
        ei_x_encode_tuple_header(out, 2);
        ei_x_encode_atom(out, "shutdown");
        ei_x_encode_atom(out, "done");
        return MOAT_EXIT;
    } else if (strcmp(a, "poll") == 0) {
        while (!atomic_load(&tsrv_gate) && !moat_should_stop(ctx))
            sched_yield();
        ei_x_encode_atom(out, moat_should_stop(ctx) ? "stopped" : "ok");
    } else if (strcmp(a, "block") == 0) {
        while (!atomic_load(&tsrv_gate))
            sched_yield();
        ei_x_encode_atom(out, "ok");
    } else {
        return moat_error(ctx, "unknown request");
    }
    return MOAT_OK;
}

static int cast(moat_ctx_t *ctx, void *state, const char *req, int len,
                ei_x_buff *out) {
    state_t *s = state;
    char a[MAXATOMLEN];
    (void)len;
    (void)out;
    if (atom_of(req, a))
        return moat_error(ctx, "bad request");
    if (strcmp(a, "crash") == 0)
        return moat_error(ctx, "crash");
    if (strcmp(a, "inc") == 0)
        s->count++;
    return MOAT_OK;
}

static void terminate(moat_ctx_t *ctx, void *state, const char *reason,
                      int len) {
    state_t *s = state;
    (void)ctx;
    (void)reason;
    (void)len;
    if (s->n >= 100)
        while (!atomic_load(&tsrv_gate))
            sched_yield();
    record('t', s->n);
    free(s);
}

const moat_server_def_t tsrv_def = {"tsrv", init, call, cast, terminate};

int tsrv_call_ok(moat_ctx_t *ctx, void *state, const char *req, int len,
                 ei_x_buff *out) {
    (void)ctx;
    (void)state;
    (void)req;
    (void)len;
    return ei_x_encode_atom(out, "ok") ? MOAT_ERROR : MOAT_OK;
}
