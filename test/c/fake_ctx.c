/* fake_ctx.c: see fake_ctx.h. */
#include <stdio.h>
#include <string.h>

#include "fake_ctx.h"

static int fake_should_stop(moat_ctx_t *ctx) {
    fake_ctx_t *f = (fake_ctx_t *)ctx;
    int polls = atomic_fetch_add(&f->polls, 1) + 1;

    if (f->stop_after > 0 && polls >= f->stop_after)
        atomic_store(&f->stop, 1);
    return atomic_load(&f->stop);
}

static int fake_verror(moat_ctx_t *ctx, const char *fmt, va_list ap) {
    fake_ctx_t *f = (fake_ctx_t *)ctx;

    vsnprintf(f->error, sizeof(f->error), fmt, ap);
    f->errors++;
    return MOAT_ERROR;
}

static moat_pid_t fake_self(moat_ctx_t *ctx) {
    (void)ctx;
    return 0;
}

static int fake_spawn(moat_ctx_t *ctx, const char *task, const char *args,
                      int args_len, unsigned flags, moat_pid_t *pid,
                      uint64_t *mref) {
    (void)ctx, (void)task, (void)args, (void)args_len, (void)flags;
    (void)pid, (void)mref;
    return MOAT_EINVAL;
}

static int fake_pid_op(moat_ctx_t *ctx, moat_pid_t pid) {
    (void)ctx, (void)pid;
    return MOAT_EINVAL;
}

static int fake_monitor(moat_ctx_t *ctx, moat_pid_t pid, uint64_t *mref) {
    (void)ctx, (void)pid, (void)mref;
    return MOAT_EINVAL;
}

static int fake_demonitor(moat_ctx_t *ctx, uint64_t mref, unsigned flags) {
    (void)ctx, (void)mref, (void)flags;
    return MOAT_EINVAL;
}

static int fake_trap_exit(moat_ctx_t *ctx, int on) {
    (void)ctx, (void)on;
    return MOAT_EINVAL;
}

static int fake_send(moat_ctx_t *ctx, moat_pid_t to, const char *msg,
                     int len) {
    (void)ctx, (void)to, (void)msg, (void)len;
    return MOAT_EINVAL;
}

static int fake_receive(moat_ctx_t *ctx, int timeout_ms, ei_x_buff *msg) {
    (void)ctx, (void)timeout_ms, (void)msg;
    return MOAT_EINVAL;
}

void fake_ctx_init(fake_ctx_t *f) {
    memset(f, 0, sizeof(*f));
    f->api.size = sizeof(f->api);
    f->api.should_stop = fake_should_stop;
    f->api.verror = fake_verror;
    f->api.self = fake_self;
    f->api.spawn = fake_spawn;
    f->api.link = fake_pid_op;
    f->api.unlink = fake_pid_op;
    f->api.monitor = fake_monitor;
    f->api.demonitor = fake_demonitor;
    f->api.trap_exit = fake_trap_exit;
    f->api.send = fake_send;
    f->api.receive = fake_receive;
    f->api.exit = fake_send;
    f->ctx.api = &f->api;
    atomic_init(&f->stop, 0);
    atomic_init(&f->polls, 0);
}

int fake_ctx_run(fake_ctx_t *f, moat_task_fn fn, const char *args, int len,
                 ei_x_buff *out) {
    if (ei_x_new_with_version(out) < 0)
        return -1;
    return fn(&f->ctx, args, len, out);
}
