/*
 * ctx.c: the task ABI's function tables (include/moat.h), through which a
 * task library reaches its own task or server, and its process, without
 * linking to moat.  Every entry runs on the caller's own thread: a task's
 * body, or a server's callback.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* moat.h promises the message is cut at 1023 bytes. */
#define ERRMSG_MAX 1024

/* Who a context stands for. */
typedef struct who_s {
    moat_pool_t *pool;
    moat_pid_t self; /* 0 when its process is gone */
    const moat_lib_t *lib;
    char **errmsg;
} who_t;

static who_t who(moat_ctx_t *ctx) {
    who_t w;
    if (ctx->api == &moat__task_api) {
        moat_task_t *t = (moat_task_t *)ctx;
        w.pool = t->pool;
        w.self = moat__task_pid(t);
        w.lib = t->lib;
        w.errmsg = &t->errmsg;
    } else {
        moat__server_t *s = MOAT__CONTAINER(ctx, moat__server_t, ctx);
        w.pool = s->pool;
        w.self = moat_proc_alive(s->pool, s->pid) ? s->pid : 0;
        w.lib = s->lib;
        w.errmsg = &s->errmsg;
    }
    return w;
}

static int task_should_stop(moat_ctx_t *ctx) {
    return atomic_load_explicit(&((moat_task_t *)ctx)->stop,
                                memory_order_relaxed);
}

static int server_should_stop(moat_ctx_t *ctx) {
    moat__server_t *s = MOAT__CONTAINER(ctx, moat__server_t, ctx);
    return atomic_load_explicit(&s->stopping, memory_order_relaxed);
}

static int ctx_verror(moat_ctx_t *ctx, const char *fmt, va_list ap) {
    char **slot;
    char *m;
    if (ctx->api == &moat__task_api)
        slot = &((moat_task_t *)ctx)->errmsg;
    else
        slot = &MOAT__CONTAINER(ctx, moat__server_t, ctx)->errmsg;
    m = *slot != NULL ? *slot : malloc(ERRMSG_MAX);
    if (m != NULL && strchr(fmt, '%') == NULL) {
        /* A plain message, the usual case: a copy costs a tenth of
         * vsnprintf, on a path a crash loop takes every time. */
        size_t len = strnlen(fmt, ERRMSG_MAX - 1);
        memcpy(m, fmt, len);
        m[len] = '\0';
    } else if (m != NULL) {
        vsnprintf(m, ERRMSG_MAX, fmt, ap);
    }
    *slot = m; /* NULL (out of memory) reads as "error" */
    return MOAT_ERROR;
}

static moat_pid_t ctx_self(moat_ctx_t *ctx) { return who(ctx).self; }

static int ctx_spawn(moat_ctx_t *ctx, const char *task, const char *args,
                     int args_len, unsigned flags, moat_pid_t *pid,
                     uint64_t *mref) {
    who_t w;
    const moat_task_def_t *def;
    moat_term_t *a;
    int rc;
    if (task == NULL || args == NULL || args_len <= 0)
        return MOAT_EINVAL;
    w = who(ctx);
    def = w.lib != NULL ? moat_lib_task(w.lib, task, strlen(task)) : NULL;
    if (def == NULL)
        return MOAT_ENOTASK;
    if (w.self == 0)
        return MOAT_EDEAD;
    if ((a = moat_term_new(args, (size_t)args_len, &rc)) == NULL)
        return rc;
    rc = moat__spawn(w.pool, w.self, def->run, w.lib, a, flags, pid, mref);
    if (rc != 0)
        moat_term_unref(a);
    return rc;
}

static int ctx_link(moat_ctx_t *ctx, moat_pid_t pid) {
    who_t w = who(ctx);
    return w.self ? moat_proc_link(w.pool, w.self, pid) : MOAT_EDEAD;
}

static int ctx_unlink(moat_ctx_t *ctx, moat_pid_t pid) {
    who_t w = who(ctx);
    return w.self ? moat_proc_unlink(w.pool, w.self, pid) : MOAT_EDEAD;
}

static int ctx_monitor(moat_ctx_t *ctx, moat_pid_t pid, uint64_t *mref) {
    who_t w = who(ctx);
    return w.self ? moat_proc_monitor(w.pool, w.self, pid, mref) : MOAT_EDEAD;
}

static int ctx_demonitor(moat_ctx_t *ctx, uint64_t mref, unsigned flags) {
    who_t w = who(ctx);
    return w.self ? moat_proc_demonitor(w.pool, w.self, mref, flags)
                  : MOAT_EDEAD;
}

static int task_trap_exit(moat_ctx_t *ctx, int on) {
    who_t w = who(ctx);
    return w.self ? moat_proc_trap_exit(w.pool, w.self, on) : MOAT_EDEAD;
}

/* A server cannot trap exits (ABI v1 has no handle_info to get them) nor
 * receive: its messages go to its callbacks. */
static int server_trap_exit(moat_ctx_t *ctx, int on) {
    (void)ctx;
    (void)on;
    return MOAT_EINVAL;
}

static int server_receive(moat_ctx_t *ctx, int timeout_ms, ei_x_buff *msg) {
    (void)ctx;
    (void)timeout_ms;
    (void)msg;
    return MOAT_EINVAL;
}

/* Runs op(pool, self, other, term) with the ETF bytes as a term. */
static int with_term(moat_ctx_t *ctx, moat_pid_t other, const char *etf,
                     int len,
                     int (*op)(moat_pool_t *, moat_pid_t, moat_pid_t,
                               moat_term_t *)) {
    who_t w = who(ctx);
    moat_term_t *t;
    int rc;
    if (w.self == 0)
        return MOAT_EDEAD;
    if (etf == NULL || len <= 0)
        return MOAT_EINVAL;
    if ((t = moat_term_new(etf, (size_t)len, &rc)) == NULL)
        return rc;
    rc = op(w.pool, w.self, other, t);
    moat_term_unref(t);
    return rc;
}

static int ctx_send(moat_ctx_t *ctx, moat_pid_t to, const char *msg,
                    int len) {
    return with_term(ctx, to, msg, len, moat_proc_send);
}

static int ctx_exit(moat_ctx_t *ctx, moat_pid_t pid, const char *reason,
                    int len) {
    return with_term(ctx, pid, reason, len, moat_proc_exit);
}

static int task_receive(moat_ctx_t *ctx, int timeout_ms, ei_x_buff *msg) {
    who_t w = who(ctx);
    if (w.self == 0)
        return MOAT_EDEAD;
    return moat__proc_receive_etf(w.pool, w.self, timeout_ms, msg);
}

const moat_api_t moat__task_api = {
    sizeof(moat_api_t), task_should_stop, ctx_verror,     ctx_self,
    ctx_spawn,          ctx_link,         ctx_unlink,     ctx_monitor,
    ctx_demonitor,      task_trap_exit,   ctx_send,       task_receive,
    ctx_exit,
};

const moat_api_t moat__server_api = {
    sizeof(moat_api_t), server_should_stop, ctx_verror,     ctx_self,
    ctx_spawn,          ctx_link,           ctx_unlink,     ctx_monitor,
    ctx_demonitor,      server_trap_exit,   ctx_send,       server_receive,
    ctx_exit,
};
