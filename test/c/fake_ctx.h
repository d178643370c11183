/*
 * fake_ctx.h: a moat_ctx_t that runs task functions directly, without a
 * pool, for tests of task libraries.  Only should_stop and verror do
 * anything; the process calls answer MOAT_EINVAL.
 */
#ifndef FAKE_CTX_H
#define FAKE_CTX_H

#include <stdatomic.h>

#include "moat.h"

typedef struct {
    moat_ctx_t ctx; /* first, so the API functions find the rest */
    moat_api_t api;
    atomic_int stop;       /* moat_should_stop's answer when nonzero */
    int stop_after;        /* > 0: turn `stop` on at this many polls */
    atomic_int polls;      /* calls to moat_should_stop */
    char error[1024];      /* the last moat_error message */
    int errors;            /* calls to moat_error */
} fake_ctx_t;

void fake_ctx_init(fake_ctx_t *f);

/* Runs `fn` as moat would: `out` is made with the version byte first.
 * Returns the task's status; the caller frees `out` with ei_x_free. */
int fake_ctx_run(fake_ctx_t *f, moat_task_fn fn, const char *args, int len,
                 ei_x_buff *out);

#endif /* FAKE_CTX_H */
