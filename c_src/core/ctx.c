/*
 * ctx.c: the task ABI's function table (include/moat.h), through which a
 * task library reaches its own task and process without linking to moat.
 * Every entry runs on the task's own thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* moat.h promises the message is cut at 1023 bytes. */
#define ERRMSG_MAX 1024

static moat_task_t *task_of(moat_ctx_t *ctx) { return (moat_task_t *)ctx; }

static int ctx_should_stop(moat_ctx_t *ctx) {
    return atomic_load_explicit(&task_of(ctx)->stop, memory_order_relaxed);
}

static int ctx_verror(moat_ctx_t *ctx, const char *fmt, va_list ap) {
    moat_task_t *t = task_of(ctx);
    char *m = t->errmsg != NULL ? t->errmsg : malloc(ERRMSG_MAX);
    if (m != NULL)
        vsnprintf(m, ERRMSG_MAX, fmt, ap);
    t->errmsg = m; /* NULL (out of memory) reads as "error" */
    return MOAT_ERROR;
}

static moat_pid_t ctx_self(moat_ctx_t *ctx) {
    return moat__task_pid(task_of(ctx));
}

/* The caller's pid, or 0 when its process is gone. */
static moat_pid_t me(moat_ctx_t *ctx) { return moat__task_pid(task_of(ctx)); }

static int ctx_spawn(moat_ctx_t *ctx, const char *task, const char *args,
                     int args_len, unsigned flags, moat_pid_t *pid,
                     uint64_t *mref) {
    moat_task_t *t = task_of(ctx);
    const moat_task_def_t *def;
    moat_term_t *a;
    moat_pid_t self;
    int rc;
    if (task == NULL || args == NULL || args_len <= 0)
        return MOAT_EINVAL;
    def = t->lib != NULL ? moat_lib_task(t->lib, task, strlen(task)) : NULL;
    if (def == NULL)
        return MOAT_ENOTASK;
    if ((self = me(ctx)) == 0)
        return MOAT_EDEAD;
    if ((a = moat_term_new(args, (size_t)args_len, &rc)) == NULL)
        return rc;
    rc = moat__spawn(t->pool, self, def->run, t->lib, a, flags, pid, mref);
    if (rc != 0)
        moat_term_unref(a);
    return rc;
}

static int ctx_link(moat_ctx_t *ctx, moat_pid_t pid) {
    moat_pid_t self = me(ctx);
    return self ? moat_proc_link(task_of(ctx)->pool, self, pid) : MOAT_EDEAD;
}

static int ctx_unlink(moat_ctx_t *ctx, moat_pid_t pid) {
    moat_pid_t self = me(ctx);
    return self ? moat_proc_unlink(task_of(ctx)->pool, self, pid) : MOAT_EDEAD;
}

static int ctx_monitor(moat_ctx_t *ctx, moat_pid_t pid, uint64_t *mref) {
    moat_pid_t self = me(ctx);
    return self ? moat_proc_monitor(task_of(ctx)->pool, self, pid, mref)
                : MOAT_EDEAD;
}

static int ctx_demonitor(moat_ctx_t *ctx, uint64_t mref, unsigned flags) {
    moat_pid_t self = me(ctx);
    return self ? moat_proc_demonitor(task_of(ctx)->pool, self, mref, flags)
                : MOAT_EDEAD;
}

static int ctx_trap_exit(moat_ctx_t *ctx, int on) {
    moat_pid_t self = me(ctx);
    return self ? moat_proc_trap_exit(task_of(ctx)->pool, self, on) : MOAT_EDEAD;
}

static int ctx_send(moat_ctx_t *ctx, moat_pid_t to, const char *msg,
                    int len) {
    moat_pid_t self = me(ctx);
    moat_term_t *m;
    int rc;
    if (self == 0)
        return MOAT_EDEAD;
    if (msg == NULL || len <= 0)
        return MOAT_EINVAL;
    if ((m = moat_term_new(msg, (size_t)len, &rc)) == NULL)
        return rc;
    rc = moat_proc_send(task_of(ctx)->pool, self, to, m);
    moat_term_unref(m);
    return rc;
}

static int ctx_receive(moat_ctx_t *ctx, int timeout_ms, ei_x_buff *msg) {
    moat_pid_t self = me(ctx);
    if (self == 0)
        return MOAT_EDEAD;
    return moat__proc_receive_etf(task_of(ctx)->pool, self, timeout_ms, msg);
}

static int ctx_exit(moat_ctx_t *ctx, moat_pid_t pid, const char *reason,
                    int len) {
    moat_pid_t self = me(ctx);
    moat_term_t *r;
    int rc;
    if (self == 0)
        return MOAT_EDEAD;
    if (reason == NULL || len <= 0)
        return MOAT_EINVAL;
    if ((r = moat_term_new(reason, (size_t)len, &rc)) == NULL)
        return rc;
    rc = moat_proc_exit(task_of(ctx)->pool, self, pid, r);
    moat_term_unref(r);
    return rc;
}

const moat_api_t moat__task_api = {
    sizeof(moat_api_t), ctx_should_stop, ctx_verror,   ctx_self,
    ctx_spawn,          ctx_link,        ctx_unlink,   ctx_monitor,
    ctx_demonitor,      ctx_trap_exit,   ctx_send,     ctx_receive,
    ctx_exit,
};
