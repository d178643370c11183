/*
 * moat.h: the one header a task library author needs.
 *
 * A task library is a shared object that exports one function,
 * moat_library(), returning a table of named tasks and native servers.
 * The same .so runs inside the VM (the NIF backend, on moat's pool
 * threads) and in the moat_cnode executable, because every value crosses
 * the boundary in the Erlang external term format (ETF), read and written
 * with ei (erl_interface).  A library links ei itself (libei.a is PIC).
 *
 * A library never calls moat's symbols directly: everything it asks of moat
 * goes through the function table at the start of its moat_ctx_t, so the
 * library needs no link-time dependency on the NIF or the C-node (the
 * JNIEnv pattern).  The inline wrappers below are the API.
 *
 * Threads: a task runs on one pool thread from start to return.  It may
 * block, but it should poll moat_should_stop() in long loops: moat cannot
 * preempt it, and a task that ignores cancellation is abandoned (its
 * outcome is delivered, its late result discarded) while it keeps its
 * thread until it returns.
 */
#ifndef MOAT_H
#define MOAT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <ei.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change to the structures below.  The loader
 * refuses a library built against another version. */
#define MOAT_ABI_VERSION 1

/* moat's own error codes live in one reserved range, below libuv's and far
 * from -errno; they are generated from this list (see moat_strerror). */
#define MOAT_ERRNO_MAP(XX)                                                  \
    XX(NOPROC, -20001, "no such process")                                  \
    XX(OVERLOADED, -20002, "run queue full")                               \
    XX(CLOSED, -20003, "pool stopped")                                     \
    XX(BADTERM, -20004, "malformed external term")                         \
    XX(TIMEDOUT, -20005, "timed out")                                      \
    XX(NOTASK, -20006, "no such task in the library")                      \
    XX(BADLIB, -20007, "not a moat task library")                          \
    XX(ABI, -20008, "task library built for another moat ABI version")    \
    XX(INVAL, -20009, "invalid argument")                                  \
    XX(DONE, -20010, "already completed")                                  \
    XX(DEAD, -20011, "the calling process is dead")                        \
    XX(NOCHILD, -20012, "no such child")                                   \
    XX(RUNNING, -20013, "child is running")                                \
    XX(EXISTS, -20014, "already exists")                                   \
    XX(NOSERVER, -20015, "no such server in the library")                  \
    XX(START, -20016, "failed to start")

enum moat_errno {
#define MOAT__ERR_ENUM(name, code, msg) MOAT_E##name = (code),
    MOAT_ERRNO_MAP(MOAT__ERR_ENUM)
#undef MOAT__ERR_ENUM
};

/* What a task or server callback returns. */
enum moat_status {
    MOAT_OK = 0,    /* `out` holds the result (or reply) term */
    MOAT_EXIT = 1,  /* `out` holds the exit reason term the task chose */
    MOAT_ERROR = 2  /* moat_error() was called: {native_error, Message} */
};

/* A native process id: a slot index in the low 32 bits and a generation in
 * the high 32 bits, so an id is never reused.  0 is no process. */
typedef uint64_t moat_pid_t;

typedef struct moat_ctx_s moat_ctx_t;

/* Flags for moat_spawn. */
#define MOAT_SPAWN_LINK 1u
#define MOAT_SPAWN_MONITOR 2u

/* Flags for moat_demonitor (as erlang:demonitor/2's options). */
#define MOAT_DEMONITOR_FLUSH 1u

/* The function table every context starts with.  Append-only within one
 * MOAT_ABI_VERSION; `size` tells a library which entries exist. */
typedef struct moat_api_s {
    size_t size;
    int (*should_stop)(moat_ctx_t *ctx);
    int (*verror)(moat_ctx_t *ctx, const char *fmt, va_list ap);
    moat_pid_t (*self)(moat_ctx_t *ctx);
    int (*spawn)(moat_ctx_t *ctx, const char *task, const char *args,
                 int args_len, unsigned flags, moat_pid_t *pid,
                 uint64_t *mref);
    int (*link)(moat_ctx_t *ctx, moat_pid_t pid);
    int (*unlink)(moat_ctx_t *ctx, moat_pid_t pid);
    int (*monitor)(moat_ctx_t *ctx, moat_pid_t pid, uint64_t *mref);
    int (*demonitor)(moat_ctx_t *ctx, uint64_t mref, unsigned flags);
    int (*trap_exit)(moat_ctx_t *ctx, int on);
    int (*send)(moat_ctx_t *ctx, moat_pid_t to, const char *msg, int len);
    int (*receive)(moat_ctx_t *ctx, int timeout_ms, ei_x_buff *msg);
    int (*exit)(moat_ctx_t *ctx, moat_pid_t pid, const char *reason,
                int len);
} moat_api_t;

/* The public head of every context; the rest of it is private to moat. */
struct moat_ctx_s {
    const moat_api_t *api;
};

/* Nonzero once the task should stop: it was cancelled (its owner died,
 * moat:shutdown/2, a halted stream), its deadline passed, or the pool is
 * stopping.  Cheap enough to call in every iteration of a loop. */
static inline int moat_should_stop(moat_ctx_t *ctx) {
    return ctx->api->should_stop(ctx);
}

/* Records a printf-style message and returns MOAT_ERROR, so a task can
 * `return moat_error(ctx, "bad size %d", n);`.  The outcome is
 * {native_error, <<Message>>}; the message is cut at 1023 bytes. */
static inline int moat_error(moat_ctx_t *ctx, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static inline int moat_error(moat_ctx_t *ctx, const char *fmt, ...) {
    va_list ap;
    int rc;
    va_start(ap, fmt);
    rc = ctx->api->verror(ctx, fmt, ap);
    va_end(ap);
    return rc;
}

/* Native processes, for tasks that spawn and watch children.  A task's own
 * id exists from its first call to any of these.  Messages received are
 * ETF terms: what moat_send sent, {'EXIT', Pid, Reason} for a trapped exit
 * signal, and {'DOWN', MRef, process, Pid, Reason} for a monitor, with pids
 * and monitor references as integers.  All return 0 or a negative error
 * code (MOAT_ENOPROC, MOAT_EDEAD, MOAT_ETIMEDOUT, ...). */
static inline moat_pid_t moat_self(moat_ctx_t *ctx) {
    return ctx->api->self(ctx);
}
static inline int moat_spawn(moat_ctx_t *ctx, const char *task,
                             const char *args, int args_len, unsigned flags,
                             moat_pid_t *pid, uint64_t *mref) {
    return ctx->api->spawn(ctx, task, args, args_len, flags, pid, mref);
}
static inline int moat_link(moat_ctx_t *ctx, moat_pid_t pid) {
    return ctx->api->link(ctx, pid);
}
static inline int moat_unlink(moat_ctx_t *ctx, moat_pid_t pid) {
    return ctx->api->unlink(ctx, pid);
}
static inline int moat_monitor(moat_ctx_t *ctx, moat_pid_t pid,
                               uint64_t *mref) {
    return ctx->api->monitor(ctx, pid, mref);
}
static inline int moat_demonitor(moat_ctx_t *ctx, uint64_t mref,
                                 unsigned flags) {
    return ctx->api->demonitor(ctx, mref, flags);
}
static inline int moat_trap_exit(moat_ctx_t *ctx, int on) {
    return ctx->api->trap_exit(ctx, on);
}
static inline int moat_send(moat_ctx_t *ctx, moat_pid_t to, const char *msg,
                            int len) {
    return ctx->api->send(ctx, to, msg, len);
}
/* Waits up to timeout_ms (-1: forever) for a message and encodes it into
 * `msg` (which the caller initialised).  Returns 0, MOAT_ETIMEDOUT, or
 * MOAT_EDEAD when an exit signal ended the calling task meanwhile. */
static inline int moat_receive(moat_ctx_t *ctx, int timeout_ms,
                               ei_x_buff *msg) {
    return ctx->api->receive(ctx, timeout_ms, msg);
}
/* exit(Pid, Reason) with Reason given as ETF (with version byte). */
static inline int moat_exit_signal(moat_ctx_t *ctx, moat_pid_t pid,
                                   const char *reason, int len) {
    return ctx->api->exit(ctx, pid, reason, len);
}

/*
 * A task: `args` is the ETF of the argument list (version byte first),
 * `args_len` its length; moat has checked that it is one well-formed term.
 * `out` is initialised with the version byte; the task encodes exactly one
 * term into it and returns:
 *   MOAT_OK     the term is the result;
 *   MOAT_EXIT   the term is the exit reason it chose (e.g. the atom badarg
 *               for arguments it rejects);
 *   MOAT_ERROR  via moat_error(); `out` is ignored.
 */
typedef int (*moat_task_fn)(moat_ctx_t *ctx, const char *args, int args_len,
                            ei_x_buff *out);

/*
 * A native server: long-lived state behind a mailbox, like a gen_server.
 * init gets the start args (a list) and sets *state; args and requests are
 * ETF with the version byte first.  init returns MOAT_OK, or
 * MOAT_EXIT / MOAT_ERROR to fail the start (reason in `out`).
 * handle_call replies by encoding into `out` and returning MOAT_OK; it stops
 * the server by returning MOAT_EXIT (reason in `out`, the caller gets that
 * reason) or MOAT_ERROR.  handle_cast encodes nothing on MOAT_OK.
 * terminate runs exactly once when the server stops, whatever stopped it
 * (after a brutal kill too, once no callback runs), with the reason as ETF;
 * it frees the state.
 */
typedef int (*moat_server_init_fn)(moat_ctx_t *ctx, const char *args,
                                   int args_len, void **state,
                                   ei_x_buff *out);
typedef int (*moat_server_call_fn)(moat_ctx_t *ctx, void *state,
                                   const char *req, int req_len,
                                   ei_x_buff *out);
typedef int (*moat_server_cast_fn)(moat_ctx_t *ctx, void *state,
                                   const char *req, int req_len,
                                   ei_x_buff *out);
typedef void (*moat_server_terminate_fn)(moat_ctx_t *ctx, void *state,
                                         const char *reason, int reason_len);

typedef struct moat_task_def_s {
    const char *name; /* the task's atom name, at most 255 bytes */
    moat_task_fn run;
} moat_task_def_t;

typedef struct moat_server_def_s {
    const char *name;
    moat_server_init_fn init;
    moat_server_call_fn handle_call;
    moat_server_cast_fn handle_cast; /* may be NULL: casts are dropped */
    moat_server_terminate_fn terminate; /* may be NULL */
} moat_server_def_t;

/* The table a library exports.  Both arrays end with an entry whose name is
 * NULL; `servers` may be NULL. */
typedef struct moat_library_s {
    uint32_t abi_version; /* MOAT_ABI_VERSION */
    uint32_t size;        /* sizeof(moat_library_t) */
    const char *name;     /* e.g. "moat_demo" */
    const moat_task_def_t *tasks;
    const moat_server_def_t *servers;
} moat_library_t;

/* The one symbol a library exports. */
#define MOAT_LIBRARY_ENTRY "moat_library"
typedef const moat_library_t *(*moat_library_fn)(void);

#if defined(__GNUC__)
#define MOAT_EXPORT __attribute__((visibility("default")))
#else
#define MOAT_EXPORT
#endif

/* Defines the entry point: MOAT_LIBRARY("mylib", tasks, servers); */
#define MOAT_LIBRARY(libname, task_table, server_table)                    \
    MOAT_EXPORT const moat_library_t *moat_library(void);                  \
    const moat_library_t *moat_library(void) {                             \
        static const moat_library_t lib = {MOAT_ABI_VERSION,               \
                                           sizeof(moat_library_t),         \
                                           (libname), (task_table),        \
                                           (server_table)};                \
        return &lib;                                                       \
    }

#ifdef __cplusplus
}
#endif
#endif /* MOAT_H */
