/* tsrv.h: private to test/c.  A native server for the server and
 * supervisor suites, and the log of what it did.
 *
 * Start args [N]: N names the instance in the log.  N >= 100 makes its
 * terminate wait for the gate; tsrv_fail_init = N makes its init fail.
 * Calls: get (the count), inc (adds one, replies the count), crash
 * (fails with {native_error, <<"crash">>}), stop (ends with normal),
 * exit (ends with {shutdown, done}), block (waits for the gate, replies
 * ok), poll (waits for the gate or moat_should_stop).  Casts: inc,
 * crash. */
#ifndef MOAT_TEST_TSRV_H
#define MOAT_TEST_TSRV_H

#include <stdatomic.h>

#include "moat_core.h"

extern const moat_server_def_t tsrv_def;
extern atomic_int tsrv_gate;
extern atomic_int tsrv_fail_init;

typedef struct tsrv_event_s {
    char what; /* 's' started, 't' terminated */
    int n;
} tsrv_event_t;

void tsrv_reset(void);
/* A copy of the log so far; returns its length. */
int tsrv_log(tsrv_event_t *out, int max);
/* How many times `what` happened to instance n. */
int tsrv_count(char what, int n);
/* Waits (bounded) until `what` happened to n at least `times` times. */
void tsrv_wait(char what, int n, int times);

/* [N] and the request atoms. */
moat_term_t *tsrv_args(int n);

/* A handle_call that replies ok to anything, for the suites' own small
 * servers. */
int tsrv_call_ok(moat_ctx_t *ctx, void *state, const char *req, int len,
                 ei_x_buff *out);
#endif
