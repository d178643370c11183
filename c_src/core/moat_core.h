/*
 * moat_core.h: the ERTS-free runtime's API, for the transports (c_src/nif,
 * c_src/cnode), the benchmarks and the tests.  Task authors use
 * include/moat.h only.
 *
 * The core knows nothing of the VM: terms are ETF blobs, processes are
 * native processes in a pool's table, threads and locks are libuv's.  Every
 * call returns 0 (or a count) on success or a negative error: -errno for
 * system errors, MOAT_E* (include/moat.h) for moat's own.  A call that takes
 * a callback and fails never runs the callback.
 */
#ifndef MOAT_CORE_H
#define MOAT_CORE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "moat.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- errors */

/* Any error code: moat's, libuv's or -errno.  Never NULL. */
const char *moat_strerror(int err);
const char *moat_err_name(int err);

/* ----------------------------------------------------------------- terms */

/*
 * An immutable, reference-counted ETF blob (version byte first).  Reasons,
 * messages, arguments and results are terms.  The well-known atoms are
 * static: ref/unref on them do nothing.  Any thread may use a term.
 */
typedef struct moat_term_s moat_term_t;

typedef enum {
    MOAT_A_NORMAL,
    MOAT_A_SHUTDOWN,
    MOAT_A_KILL,
    MOAT_A_KILLED,
    MOAT_A_NOPROC,
    MOAT_A_TIMEOUT,
    MOAT_A_OVERLOADED,
    MOAT_A_BADARG,
    MOAT_A_NOCONNECTION,
    MOAT_A_OK,
    MOAT_A_ENOMEM,
    MOAT_A__COUNT
} moat_atom_t;

moat_term_t *moat_atom(moat_atom_t a);

/* Copies `len` bytes of ETF after checking (moat_etf_check) that they are
 * exactly one well-formed term.  Returns NULL on a malformed term or on
 * out of memory; *err (if not NULL) says which. */
moat_term_t *moat_term_new(const char *etf, size_t len, int *err);

/* Wraps memory the caller owns without copying; `release(opaque)` runs when
 * the last reference goes, on whichever thread drops it.  The bytes must be
 * checked already. */
moat_term_t *moat_term_wrap(const char *etf, size_t len,
                            void (*release)(void *opaque), void *opaque);

/* Makes [T] (with the version byte) from the encoding of T alone (no
 * version byte), which must be one well-formed term: it is not checked
 * again.  One allocation.  NULL on out of memory. */
moat_term_t *moat_term_list1(const char *elem, size_t len);

/* Makes T (adding the version byte) from the encoding of T alone, which
 * must be one well-formed term, e.g. cut with ei_skip_term from a buffer
 * that moat_etf_check passed: it is not checked again.  One allocation.
 * NULL on out of memory. */
moat_term_t *moat_term_bare(const char *elem, size_t len);

/* Takes over an ei_x_buff's memory (x->buff becomes NULL).  The bytes are
 * not checked (run moat_etf_check first).  Returns NULL, leaving the buffer
 * to the caller, when x holds no buffer or on out of memory. */
moat_term_t *moat_term_from_x(ei_x_buff *x);

/* Encodes {Tag, <<Message>>}; e.g. {native_error, <<"bad size">>}. */
moat_term_t *moat_term_tagged_binary(const char *tag, const char *msg,
                                     size_t len);

moat_term_t *moat_term_ref(moat_term_t *t);
void moat_term_unref(moat_term_t *t);
const char *moat_term_data(const moat_term_t *t, size_t *len);

/* The one predicate for "abnormal": every reason except `normal`,
 * `shutdown` and `{shutdown, _}` (REFERENCE.md E9). */
int moat_term_is_abnormal(const moat_term_t *t);
/* Nonzero when the term is exactly the atom `a`. */
int moat_term_is(const moat_term_t *t, moat_atom_t a);
/* Nonzero when two terms have identical encodings (OTP 25 encodes atoms as
 * ATOM_EXT, ei as SMALL_ATOM_UTF8_EXT); compare atoms with moat_term_is. */
int moat_term_equal(const moat_term_t *a, const moat_term_t *b);

/* Checks, with bounds, that buf[0..len) is a version byte followed by
 * exactly one well-formed term, nesting at most 10000 deep.  Returns 0 or
 * MOAT_EBADTERM, or UV_ENOMEM when a term nests over 64 deep and the check
 * cannot allocate its stack.  Safe on any input. */
int moat_etf_check(const char *buf, size_t len);

/* --------------------------------------------------------- task libraries */

/*
 * A loaded task library.  moat_lib_open copies the file to a unique path
 * first, so a library rebuilt in place is loaded anew (dlopen would return
 * the copy already mapped for the same path), and opens it with
 * RTLD_NODELETE, so code a thread may still run is never unmapped.
 */
typedef struct moat_lib_s moat_lib_t;

/* Loads and checks a library (entry point, ABI version, table size, task
 * and server names present, unique and at most 255 bytes, functions set).
 * On failure returns MOAT_EBADLIB, MOAT_EABI or -errno and, when errmsg is
 * not NULL, sets *errmsg to a malloc'd sentence naming the path and the
 * fault (the caller frees it).  Never crashes on a bad file.  Any thread. */
int moat_lib_open(const char *path, moat_lib_t **lib, char **errmsg);
void moat_lib_close(moat_lib_t *lib);
const char *moat_lib_name(const moat_lib_t *lib);
/* The library's own table (checked), e.g. to list its tasks. */
const moat_library_t *moat_lib_def(const moat_lib_t *lib);
/* Look-ups by name (not NUL-terminated); NULL when absent.  O(1). */
const moat_task_def_t *moat_lib_task(const moat_lib_t *lib, const char *name,
                                     size_t len);
const moat_server_def_t *moat_lib_server(const moat_lib_t *lib,
                                         const char *name, size_t len);

/* ------------------------------------------------------------------ pool */

typedef struct moat_pool_s moat_pool_t;
typedef struct moat_task_s moat_task_t;

/* A task's one outcome.  `term` is the result (kind MOAT_OK) or the exit
 * reason (kind MOAT_EXIT); it is valid during the callback only (take a
 * reference to keep it). */
typedef struct moat_outcome_s {
    int kind;
    moat_term_t *term;
} moat_outcome_t;

/*
 * The completion interface: called exactly once per accepted task or
 * server call, on the thread that decided its outcome: a pool worker (the
 * body or handle_call returned), the housekeeping thread (a deadline), or
 * the thread that called moat_task_cancel, moat_pool_cancel_owner or
 * moat_pool_stop, or a moat_proc_* call whose exit signal killed a task
 * process or a server with a call in progress (unless MOAT_CANCEL_SILENT).
 * It must not block and must not call back into the pool except
 * moat_task_id, moat_task_data and moat_task_release (the pool holds a
 * reference of its own during the callback, so releasing the caller's
 * handle there never frees the task under it).
 */
typedef void (*moat_complete_cb)(moat_task_t *task, const moat_outcome_t *o,
                                 void *pool_data);

/* The signals a fault in native code raises on the faulting thread (an
 * initializer list: `int sigs[] = {MOAT_FAULT_SIGNALS};`, <signal.h>).
 * Pool threads block every signal but these: the kernel would reset a
 * blocked fault to its default action, bypassing whatever handler the
 * process has for it (a crash reporter, the C-node worker's crash notice),
 * and a raise() of one would stay pending. */
#define MOAT_FAULT_SIGNALS                                                    \
    SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP

typedef struct moat_pool_opts_s {
    unsigned nthreads;      /* 0: online CPUs */
    unsigned max_queue;     /* 0: 65536 tasks waiting beyond the threads */
    unsigned max_abandoned; /* replacement threads for workers stuck in
                               abandoned tasks; 0: nthreads */
    unsigned spin_us;       /* how long an idle worker spins before it
                               sleeps; 0: 50 */
    const char *name;       /* threads are named "<name>:w<n>" (workers)
                               and "<name>:hk0" (housekeeper), cut to 15
                               bytes */
    moat_complete_cb complete;
    void *data;             /* passed to every callback */
    /* Optional: run on each pool thread (workers and timer) as it starts
     * and before it exits, e.g. to make or free a per-thread message env. */
    void (*thread_start)(void *data);
    void (*thread_stop)(void *data);
    /* Nonzero: the pool runs no bodies.  It starts no workers and takes
     * tasks only through moat_pool_accept, for a transport that runs them
     * elsewhere (the C-node backend); nthreads still sizes admission. */
    int remote;
    /* Optional, for remote tasks: called once when a remote task's outcome
     * was decided here (cancel, deadline, owner, close), not by
     * moat_pool_remote_done, so that the transport tells the other side to
     * stop it.  On the deciding thread, just before the complete callback
     * (moat_task_data is still the transport's); the same rules as
     * complete. */
    void (*remote_cancel)(moat_task_t *task, moat_term_t *reason,
                          void *data);
    /* Nonzero: the worker threads start with the first task or native
     * process queued, not with the pool, for a pool whose tasks usually
     * run on their caller's thread (moat_pool_run_here): a C-node worker
     * of process isolation then has one thread, its loop. */
    int lazy_threads;
} moat_pool_opts_t;

/* Allocates a pool and starts its threads.  Any thread. */
int moat_pool_new(const moat_pool_opts_t *opts, moat_pool_t **pool);

/*
 * Stops accepting work (submits return MOAT_ECLOSED); every queued task
 * and every running one gets the outcome `shutdown` (running ones are
 * flagged and abandoned) and every native process exits with `shutdown`,
 * their callbacks running on this thread.  Waits for no pool thread, so a
 * scheduler may call it; threads keep running until moat_pool_stop.
 * Idempotent; a concurrent second caller returns once the first is done.
 * Never from a pool thread or a complete callback.
 */
void moat_pool_close(moat_pool_t *pool);

/*
 * Closes the pool (moat_pool_close) if needed, then waits until every
 * task body has returned and joins every thread.  A call after it
 * returned does nothing; one caller at a time.  Never from a pool thread.
 */
void moat_pool_stop(moat_pool_t *pool);

/* Stops the pool if needed and frees it.  No handle may be used after. */
void moat_pool_free(moat_pool_t *pool);

/* A unit of work for moat_pool_submit. */
typedef struct moat_job_s {
    moat_task_fn fn;
    const char *name;   /* for messages; must outlive the task */
    const moat_lib_t *lib; /* where moat_spawn finds tasks by name; may be
                              NULL; must outlive the task */
    moat_term_t *args;  /* the argument list; ownership passes to the pool
                           when the job is accepted */
    uint64_t owner;     /* 0: none; else moat_pool_cancel_owner's key */
    int64_t timeout_ms; /* < 0: no deadline; else the outcome is `timeout`
                           this long after submission */
    void *data;         /* the transport's, see moat_task_data */
} moat_job_t;

/*
 * Queues one job.  On success *task (when task is not NULL) is a handle the
 * caller must give back with moat_task_release.  Returns MOAT_EOVERLOADED
 * when size + max_queue tasks are already admitted, MOAT_ECLOSED when the
 * pool is stopping, MOAT_EINVAL on a remote pool; then the callback never
 * runs and the caller keeps job->args.  Any thread.
 */
int moat_pool_submit(moat_pool_t *pool, const moat_job_t *job,
                     moat_task_t **task);

/*
 * Remote tasks.  moat_pool_accept admits jobs like moat_pool_submit_batch
 * (size + max_queue, owners, deadlines, one claim each) but queues none:
 * their bodies run elsewhere, and the transport reports each one's end
 * with moat_pool_remote_done, by moat_task_id.  A remote task whose
 * outcome is decided here first (see remote_cancel) counts as abandoned
 * until the transport reports its body ended.  jobs[i].fn is ignored and
 * jobs[i].args may be NULL.  Returns how many were accepted (a prefix) or
 * a negative error, as moat_pool_submit_batch.  Any thread.
 */
int moat_pool_accept(moat_pool_t *pool, const moat_job_t *jobs, size_t n,
                     moat_task_t **tasks);

/* The body of remote task `id` ended: with the outcome `kind`/`term`
 * (borrowed), or, when term is NULL, without one (it was cancelled; an
 * outcome still open then becomes `killed`).  Returns 1 when this call
 * decided the outcome (the complete callback ran on this thread), 0 when
 * it was decided already (the report is dropped), MOAT_ENOPROC when the
 * pool holds no remote task `id` (a report that came twice).  Any thread
 * but a pool thread. */
int moat_pool_remote_done(moat_pool_t *pool, uint64_t id, int kind,
                          moat_term_t *term);

/* The other side is gone with every remote body in it: each remote task
 * still held ends, those with an open outcome with `reason` (borrowed),
 * and from now on new tasks are refused (MOAT_ECLOSED), as after
 * moat_pool_drain.  Returns how many outcomes it decided.  Any thread but
 * a pool thread. */
int moat_pool_remote_lost(moat_pool_t *pool, moat_term_t *reason);

/* Queues jobs[0..n) under one lock and wakes workers once.  Accepts a
 * prefix: returns how many were accepted (the rest are refused as above,
 * or for want of memory), or a negative error when none was.  tasks may be
 * NULL. */
int moat_pool_submit_batch(moat_pool_t *pool, const moat_job_t *jobs,
                           size_t n, moat_task_t **tasks);

/*
 * A task run on its caller's thread, as a pool thread would run it: the
 * pool's admission (size + max_queue), the one claim, the complete
 * callback (on this thread when the body's return decides the outcome),
 * moat_should_stop.  Meant for a transport whose own thread would
 * otherwise hand each task to a pool thread and sleep (the C-node's
 * process-isolation worker): the hand-off's wake-up is saved.  The body
 * cannot be preempted: while it runs, nothing else runs on this thread.
 */
typedef struct moat_here_s {
    _Atomic(moat_task_t *) task; /* the task while its body runs */
    atomic_int stop;             /* moat_here_stop was called */
} moat_here_t;

/* Zero it before moat_pool_run_here; then moat_here_stop may be called. */
#define MOAT_HERE_INIT {NULL, 0}

/*
 * Runs job's body on the calling thread now, with `here` (initialised
 * with MOAT_HERE_INIT, its stop possibly set already) as its handle for
 * moat_here_stop.  job->owner must be 0 and job->timeout_ms negative: the
 * caller keeps those itself.  Returns 0 once the body has returned and
 * the outcome is delivered (by this call, or by a close that came
 * first); else MOAT_EOVERLOADED, MOAT_ECLOSED or MOAT_EINVAL, as
 * moat_pool_submit, or -ENOMEM: then the body never ran, no callback
 * runs and the caller keeps job->args.  Not from a complete callback; a
 * task body may call it (the nested task runs inside it).
 */
int moat_pool_run_here(moat_pool_t *pool, const moat_job_t *job,
                       moat_here_t *here);

/* Makes moat_should_stop true for the task `here` stands for, from now
 * on, whether its body has begun or not.  Async-signal-safe: a signal
 * handler on the thread that called moat_pool_run_here may call it (from
 * any other thread, `here` could be gone under it). */
void moat_here_stop(moat_here_t *here);

#define MOAT_CANCEL_SILENT 1u /* decide the outcome, do not call back */

/*
 * Ends a task with `reason` (MOAT_A_SHUTDOWN, MOAT_A_KILLED, MOAT_A_TIMEOUT):
 * a queued task is removed at once, a running one is flagged
 * (moat_should_stop) and abandoned.  Returns 1 when this call decided the
 * outcome, 0 when the task had already completed: then its callback has
 * returned before this call returns.  Any thread.
 */
int moat_task_cancel(moat_task_t *task, moat_atom_t reason, unsigned flags);

/* 1 while the task's body is on a thread (for a remote task: until the
 * transport reports it ended), abandoned or not.  Meant for a
 * caller that decided the outcome with moat_task_cancel and wants to know
 * whether the body has stopped since: the flag moat_should_stop reads is
 * set, and a body that heeds it returns soon.  Any thread. */
int moat_task_running(moat_task_t *task);

uint64_t moat_task_id(const moat_task_t *task);   /* unique in the pool */
/* When the task (or server call) was accepted, in uv_hrtime()'s
 * nanoseconds: its latency is the time from then to its outcome. */
uint64_t moat_task_submitted(const moat_task_t *task);
void *moat_task_data(const moat_task_t *task);
void moat_task_release(moat_task_t *task);

/* The first half of a close: from now on new tasks are refused
 * (MOAT_ECLOSED), and every queued and running one ends with `reason`, as
 * moat_task_cancel ends it; native processes, server calls and task
 * processes go on.  Freeing a busy pool's threads this way lets its
 * servers run, e.g. to stop them in order before moat_pool_close.  Not
 * from a pool thread. */
void moat_pool_drain(moat_pool_t *pool, moat_atom_t reason);

/* Cancels every task submitted with this owner, as moat_task_cancel does.
 * Returns how many outcomes it decided. */
int moat_pool_cancel_owner(moat_pool_t *pool, uint64_t owner,
                           moat_atom_t reason, unsigned flags);

typedef struct moat_pool_stats_s {
    uint64_t queued;    /* waiting for a thread now */
    uint64_t running;   /* on a thread now, abandoned ones excluded */
    uint64_t completed; /* ended with a result */
    uint64_t failed;    /* ended with an exit reason of their own */
    uint64_t cancelled; /* ended by cancellation or pool stop */
    uint64_t timeouts;  /* ended by their deadline */
    uint64_t rejected;  /* refused: overloaded */
    uint64_t abandoned; /* still running after their outcome, now */
    uint64_t threads;   /* worker threads alive, now */
    uint64_t restarts;  /* native supervisor restarts */
} moat_pool_stats_t;

/* A snapshot; each counter is exact once its events are over, but a
 * monitor's DOWN for a task process can arrive just before the counter
 * that task bumps. */
void moat_pool_stats(moat_pool_t *pool, moat_pool_stats_t *stats);

/* -------------------------------------------------- processes and signals */

/*
 * Native processes mirror BEAM processes (REFERENCE.md §1).  Three kinds:
 * an external process is driven by a thread outside the pool (a test, or a
 * transport standing for a BEAM process) that calls moat_proc_receive; a task
 * process is a task that used its own id; a server is callback-driven and
 * runs on pool threads only while it has messages.
 *
 * Calls naming a `self` act as that process would (its trap_exit flag
 * decides E1, it is the sender of exit/2).  Any thread may call them.
 */

typedef enum {
    MOAT_MSG_USER = 1, /* term: the message */
    MOAT_MSG_EXIT,     /* {'EXIT', from, term} */
    MOAT_MSG_DOWN,     /* {'DOWN', ref, process, from, term} */
    MOAT_MSG_CALL,     /* internal: server mailboxes only */
    MOAT_MSG_CAST,     /* internal: server mailboxes only */
    MOAT_MSG_SYS       /* internal: a supervisor's notes to itself */
} moat_msg_kind_t;

typedef struct moat_msg_s {
    struct moat_msg_s *next;
    moat_msg_kind_t kind;
    moat_pid_t from;
    uint64_t ref;
    moat_term_t *term;
    moat_task_t *call; /* internal: a server call's task, else NULL */
} moat_msg_t;

void moat_msg_free(moat_msg_t *msg);

/* Makes an external process.  It lives until moat_proc_close or an exit
 * signal ends it. */
int moat_proc_open(moat_pool_t *pool, moat_pid_t *pid);

/* The process ends itself with `reason` (exit/1).  A process is freed the
 * moment it dies, whatever killed it; closing one that is already dead
 * returns MOAT_EDEAD and does nothing. */
int moat_proc_close(moat_pool_t *pool, moat_pid_t self, moat_term_t *reason);

/* 1 if alive, 0 if not. */
int moat_proc_alive(moat_pool_t *pool, moat_pid_t pid);

/* Waits up to timeout_ms (-1: forever, 0: poll) for the first message of an
 * external process.  Returns 0 and *msg (free it with moat_msg_free),
 * MOAT_ETIMEDOUT, or MOAT_EDEAD when the process is dead (its remaining
 * messages are discarded). */
int moat_proc_receive(moat_pool_t *pool, moat_pid_t self, int timeout_ms,
                 moat_msg_t **msg);

/* Spawns a task process running `fn(args)` on the pool, optionally linked
 * to (MOAT_SPAWN_LINK) and/or monitored by (MOAT_SPAWN_MONITOR) `parent`
 * atomically: there is no window in which it runs unlinked.  Its exit
 * reason is `normal` when fn returns MOAT_OK, else its outcome's reason.
 * On success the args belong to the pool; on failure the caller keeps
 * them.  Counts toward max_queue like a submitted task. */
int moat_proc_spawn(moat_pool_t *pool, moat_pid_t parent, moat_task_fn fn,
               moat_term_t *args, unsigned flags, moat_pid_t *pid,
               uint64_t *mref);

int moat_proc_link(moat_pool_t *pool, moat_pid_t self, moat_pid_t other);
int moat_proc_unlink(moat_pool_t *pool, moat_pid_t self, moat_pid_t other);
int moat_proc_monitor(moat_pool_t *pool, moat_pid_t self, moat_pid_t target,
                 uint64_t *mref);
/* Returns 1 when the monitor was still active, 0 when not (E7 `info`). */
int moat_proc_demonitor(moat_pool_t *pool, moat_pid_t self, uint64_t mref,
                   unsigned flags);
/* Sets the flag; returns its old value (0 or 1). */
int moat_proc_trap_exit(moat_pool_t *pool, moat_pid_t self, int on);
/* exit(to, reason) sent by `self` (0 for "from outside": seen as pid 0). */
int moat_proc_exit(moat_pool_t *pool, moat_pid_t self, moat_pid_t to,
              moat_term_t *reason);
int moat_proc_send(moat_pool_t *pool, moat_pid_t self, moat_pid_t to,
              moat_term_t *msg);

/* ---------------------------------------------------------- native servers */

/*
 * A native server is a process whose state lives behind a mailbox, driven
 * by the callbacks of a moat_server_def_t (include/moat.h).  It owns no
 * thread: it runs on a pool thread while it has messages, one message at a
 * time, so its callbacks never run concurrently.
 *
 * Exit signals: `kill` ends it at once (links and monitors see `killed`);
 * any other signal that would end a BEAM process (an abnormal link exit,
 * exit/2 with a reason other than normal) is queued as a stop request: in
 * mailbox order, terminate runs, then the process exits with that reason.
 * terminate runs exactly once whatever ends the server, because it owns the
 * state (after a kill, once the callback in progress has returned).  Calls
 * still queued when it ends get its exit reason as their outcome.
 */

/* Starts a server: runs init on the calling thread, and only if it
 * succeeds links it to `parent` (MOAT_SPAWN_LINK) and makes it reachable.
 * On an init failure returns MOAT_ESTART and sets *reason (the caller owns
 * it); the process never existed for anyone.  args: the start argument
 * list, borrowed.  `lib` (may be NULL) is where its spawns find tasks. */
int moat_server_start(moat_pool_t *pool, moat_pid_t parent,
                      const moat_server_def_t *def, const moat_lib_t *lib,
                      moat_term_t *args, unsigned flags, moat_pid_t *pid,
                      moat_term_t **reason);

/*
 * Sends a call; its one outcome arrives through the pool's complete
 * callback like a task's: MOAT_OK with the reply, or MOAT_EXIT with the
 * reason the server ended with (`timeout` past timeout_ms, which then
 * also makes a late reply impossible).  `owner` and `data` are as for a
 * job; *task (may be NULL) is a handle for moat_task_cancel.  Returns
 * MOAT_ENOPROC when no such server is alive (no callback).  The request
 * is borrowed.
 */
int moat_server_call(moat_pool_t *pool, moat_pid_t server,
                     moat_term_t *request, uint64_t owner, int64_t timeout_ms,
                     void *data, moat_task_t **task);

/* Queues a cast; to a dead server it is dropped, as gen_server:cast is. */
int moat_server_cast(moat_pool_t *pool, moat_pid_t server,
                     moat_term_t *request);

/* ------------------------------------------------------ native supervisor */

typedef enum {
    MOAT_ONE_FOR_ONE,
    MOAT_ONE_FOR_ALL,
    MOAT_REST_FOR_ONE
} moat_strategy_t;

typedef enum { MOAT_PERMANENT, MOAT_TRANSIENT, MOAT_TEMPORARY } moat_restart_t;

typedef enum { MOAT_WORKER, MOAT_SUPERVISOR } moat_child_type_t;

#define MOAT_SHUTDOWN_BRUTAL (-1)   /* exit(child, kill) at once */
#define MOAT_SHUTDOWN_INFINITY (-2) /* wait for as long as it takes */

/* Starts one child linked to `sup` (moat_server_start with
 * MOAT_SPAWN_LINK, say).  Runs on the supervisor's thread.  Returns 0 and
 * *pid, or an error and *reason (which the supervisor then owns). */
typedef int (*moat_child_start_cb)(moat_pool_t *pool, moat_pid_t sup,
                                   void *arg, moat_pid_t *pid,
                                   moat_term_t **reason);

typedef struct moat_child_spec_s {
    moat_term_t *id;           /* any term, unique; borrowed */
    moat_child_start_cb start;
    void *arg;
    void (*arg_free)(void *arg); /* when the spec goes; may be NULL */
    moat_restart_t restart;
    int shutdown_ms; /* >= 0, MOAT_SHUTDOWN_BRUTAL or _INFINITY */
    moat_child_type_t type;
} moat_child_spec_t;

/* A ready-made start callback for native server children: arg is a
 * moat_server_child_t that must outlive the spec (arg_free may free it). */
typedef struct moat_server_child_s {
    const moat_server_def_t *def;
    const moat_lib_t *lib;
    moat_term_t *args;
} moat_server_child_t;
int moat_server_child_start(moat_pool_t *pool, moat_pid_t sup, void *arg,
                            moat_pid_t *pid, moat_term_t **reason);

typedef struct moat_sup_opts_s {
    moat_strategy_t strategy;
    int intensity; /* restarts allowed within `period`; 0 allows none */
    int period;    /* seconds, >= 1 */
    /* Called once, on a pool thread, when the supervisor gives up (its
     * intensity reached) after it stopped its children, with the reason it
     * exits with (`shutdown`).  May be NULL.  Must not block. */
    void (*escalate)(moat_pid_t sup, moat_term_t *reason, void *data);
    /* Whole seconds of a monotonic clock; NULL: the real one.  Tests pass
     * their own to walk the intensity window without sleeping. */
    int64_t (*now_sec)(void *data);
    void *data;
    /* Called on the supervisor's thread for every child that ended with
     * an abnormal reason (what OTP reports as child_terminated), with the
     * child's id, before the supervisor acts on it.  May be NULL.  Must
     * not block. */
    void (*child_crashed)(moat_pid_t sup, moat_term_t *id,
                          moat_term_t *reason, void *data);
} moat_sup_opts_t;

/*
 * Starts a supervisor process and its children in list order, each start
 * on the calling thread (not a pool thread).  On success *pid is the
 * supervisor, linked to `parent` if that is not 0.  When child k fails to
 * start, returns MOAT_ESTART with *reason {shutdown, {failed_to_start_child,
 * Id, Reason}}: the supervisor then stops the children it started, in
 * reverse order, and exits with that reason (monitor *pid to see it end).
 * The specs are copied (their ids referenced).  Each spec's arg belongs
 * to the supervisor once this is called, whatever it returns (arg_free
 * runs when it is done with it), except MOAT_EINVAL and MOAT_EEXISTS:
 * specs refused as invalid are left to the caller.
 */
int moat_sup_start(moat_pool_t *pool, moat_pid_t parent,
                   const moat_sup_opts_t *opts, const moat_child_spec_t *specs,
                   size_t n, moat_pid_t *pid, moat_term_t **reason);

typedef enum {
    MOAT_CHILD_RUNNING,
    MOAT_CHILD_RESTARTING, /* a restart is pending (after a give-up: the
                              tree above's, every child shows it) */
    MOAT_CHILD_UNDEFINED   /* not running (transient that ended normally) */
} moat_child_state_t;

typedef struct moat_child_info_s {
    moat_term_t *id; /* a reference: moat_sup_children_free drops it */
    moat_child_state_t state;
    moat_pid_t pid; /* 0 unless running */
    moat_child_type_t type;
} moat_child_info_t;

/* which_children, in start order.  Returns the count (>= 0) and *out
 * (free it with moat_sup_children_free), or MOAT_ENOPROC. */
int moat_sup_which_children(moat_pool_t *pool, moat_pid_t sup,
                            moat_child_info_t **out);
void moat_sup_children_free(moat_child_info_t *children, int n);

typedef struct moat_child_counts_s {
    int specs, active, supervisors, workers;
} moat_child_counts_t;

int moat_sup_count_children(moat_pool_t *pool, moat_pid_t sup,
                            moat_child_counts_t *counts);

/* The pid of the running child with this id (compared by value), for
 * calls and casts to it: MOAT_ENOPROC when the supervisor is gone or the
 * child is not running (restarting, ended, or no such id). */
int moat_sup_child_pid(moat_pool_t *pool, moat_pid_t sup,
                       const moat_term_t *id, moat_pid_t *pid);

#ifdef __cplusplus
}
#endif
#endif /* MOAT_CORE_H */
