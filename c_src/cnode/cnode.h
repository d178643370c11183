/* cnode.h: private to c_src/cnode.  The parts of moat_cnode that the
 * main file (moat_cnode.c) puts together: the outbox, the only path to
 * stdout (outbox.c); the jobs, tasks in flight by tag (jobs.c); the
 * worker processes of process isolation (procs.c) and its servers'
 * worker (srvworker.c); and the forwarding of stderr to the VM
 * (errlog.c).  The protocol is doc/cnode.md. */
#ifndef MOAT_CNODE_H
#define MOAT_CNODE_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <uv.h>

#include "moat_core.h"

/* Exit statuses, below 128 so that the VM tells them from signals
 * (REFERENCE.md §6). */
#define MOAT_CNODE_EXIT_EOF 0      /* stdin closed: the pool was stopping */
#define MOAT_CNODE_EXIT_FAILURE 1  /* could not start, or stdin broke */
#define MOAT_CNODE_EXIT_HELLO 2    /* answered hello with {error, _} */
#define MOAT_CNODE_EXIT_NOMEM 3    /* an outcome could not be kept */
#define MOAT_CNODE_EXIT_WORKERS 4  /* process isolation: workers died on
                                      their own past the intensity */

/* ---------------------------------------------------------------- outbox */

/* Whole frames waiting in the outbox, each with its 4-byte length. */
typedef struct moat__blob_s {
    struct moat__blob_s *next;
    size_t len;
    char data[];
} moat__blob_t;

/* Where an outbox's frames go instead of its fd (moat__outbox_sink): one
 * whole frame, its 4-byte length first, in iov[0..n).  Returns 0 or a
 * negative error (then everything later is dropped).  Called by the
 * writer, whichever thread that is. */
typedef int (*moat__sink_fn)(void *data, struct iovec *iov, int n);

/* See outbox.c's DESIGN.  The fields are the outbox's own. */
typedef struct moat__outbox_s {
    int fd;                 /* or -1 with a sink */
    moat__sink_fn sink;     /* constant once set */
    void *sink_data;
    uv_mutex_t lock;        /* guards every field below, except that the
                               spare_* buffers belong to the writer while
                               `writing` is set */
    ei_x_buff done;         /* the next done frame's elements */
    size_t ndone;
    ei_x_buff stopped;      /* the next stopped frame's tags */
    size_t nstopped;
    moat__blob_t *frames;   /* other frames, oldest first */
    moat__blob_t **frames_tail;
    ei_x_buff spare_done;
    ei_x_buff spare_stopped;
    int writing;            /* a thread is writing and will write all */
    int discard;            /* stdout is gone or the node is ending */
} moat__outbox_t;

/* Prepares an outbox writing to fd (blocking or not), which it then owns
 * (moat__outbox_close closes it).  Returns 0 or UV_ENOMEM.  Before any
 * other thread exists. */
int moat__outbox_init(moat__outbox_t *ob, int fd);

/* Frees the buffers.  Only when no thread can use the outbox any more. */
void moat__outbox_close(moat__outbox_t *ob);

/* Makes an outbox initialised with fd -1 hand its frames to `sink`.
 * Before any other thread exists. */
void moat__outbox_sink(moat__outbox_t *ob, moat__sink_fn sink, void *data);

/*
 * Queues {Tag, ok | exit, Term} for the next done frame; `term` is the
 * outcome term's encoding without its version byte.  If no thread is
 * writing, the caller becomes the writer and writes until the outbox is
 * empty, so it may block while stdout is full.  Never fails: when no
 * memory is left for it the process exits with MOAT_CNODE_EXIT_NOMEM, for
 * an outcome must not be lost (the VM then ends every task with
 * cnode_down).  Any thread, including complete callbacks.
 */
void moat__outbox_done(moat__outbox_t *ob, uint64_t tag, int kind,
                       const char *term, size_t len);

/* As moat__outbox_done, for a {stopped, Tags} frame. */
void moat__outbox_stopped(moat__outbox_t *ob, const uint64_t *tags,
                          size_t n);

/* Queues one whole frame, etf[0..len) with its version byte (ready,
 * error).  Returns 0, or UV_ENOMEM when the frame was dropped.  Writes as
 * moat__outbox_done does; when this thread is the only one that writes,
 * the frame has been written (or stdout failed) when this returns. */
int moat__outbox_frame(moat__outbox_t *ob, const char *etf, size_t len);

/* The longest log message; longer ones are cut. */
#define MOAT__LOG_MAX 1023

/* Queues {log, Level, Message} (Level "error", "warning" or "info").
 * Logs are best effort: dropped when memory is short. */
void moat__outbox_log(moat__outbox_t *ob, const char *level, const char *msg,
                      size_t len);

/* As moat__outbox_log, with a printf format (cut at 1023 bytes). */
void moat__outbox_logf(moat__outbox_t *ob, const char *level,
                       const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* From now on, everything queued is dropped; a write in progress ends.
 * Returns 1 when a thread is writing at this moment (it may be blocked
 * on stdout), else 0. */
int moat__outbox_discard(moat__outbox_t *ob);

/* Makes the caller the writer until moat__outbox_release, if no thread is
 * writing: appends by other threads then only queue, and the holder
 * writes what they queued with moat__outbox_flush.  Returns 1 if it did,
 * 0 when another thread is writing (or the outbox discards). */
int moat__outbox_hold(moat__outbox_t *ob);

/* The holder writes everything queued so far.  Returns the outcomes
 * ({Tag, ok | exit, Term} entries) it wrote. */
size_t moat__outbox_flush(moat__outbox_t *ob);

/* The holder writes everything queued and stops being the writer. */
void moat__outbox_release(moat__outbox_t *ob);

/* ------------------------------------------------------------------ jobs */

/* One task in flight, known by the VM's tag.  See jobs.c's DESIGN. */
typedef struct moat__job_s {
    struct moat__job_s *next; /* in a map bucket (map lock), or in the
                                 cancelling list, or in the queue of
                                 tasks run here (loop thread) */
    uint64_t tag;             /* set before the job is shared; constant */
    moat_task_t *task;        /* map lock: the handle, once attached */
    int in_map;               /* map lock */
    int err;                  /* loop thread: why the pool refused it */
    moat_job_t spec;          /* run here: what to run */
    moat_here_t here;         /* run here: its stop flag */
    uint64_t seq;             /* run here: its rank among the runs the
                                 node was sent, from 1 */
} moat__job_t;

/* The signal that carries a cancel to a worker of process isolation
 * that runs its tasks on its loop thread: the parent queues it to the
 * worker's main thread, with the run's rank (moat__job_t.seq) as its
 * value, once the cancel frame is written (procs.c; jobs.c, Run here).
 * A realtime signal: each one queued is delivered, none merged. */
#define MOAT__CANCEL_SIGNAL (SIGRTMIN + 2)

typedef struct moat__jobs_s {
    moat_pool_t *pool;        /* set once the pool exists */
    moat__outbox_t *ob;
    uv_mutex_t lock;          /* the map lock: guards buckets, mask,
                                 count, and in_map and task of every job */
    moat__job_t **buckets;
    size_t mask;              /* buckets - 1; a power of two less one */
    size_t count;
    /* The rest is the loop thread's. */
    moat_job_t *pend;         /* jobs waiting for the next flush */
    moat_task_t **pend_tasks;
    size_t npend, cappend;
    moat__job_t *cancelling;  /* cancelled jobs whose bodies still run */
    uv_timer_t timer;         /* polls `cancelling` while it is not empty */
    int ordered;              /* set before the first submission, then
                                 read by pool threads: one thread, whose
                                 outcomes are written before it takes its
                                 next task (a worker of process isolation:
                                 procs.c relies on it) */
    /* Tasks run here, on the loop thread (moat__jobs_run_here). */
    int here;
    uint64_t nruns;           /* runs read so far, run here */
    uint64_t last_run;        /* uv_hrtime() when the last run ended */
    moat__job_t *queue, **queue_tail; /* waiting, oldest first */
    uv_idle_t idle;           /* armed while one waits */
    int idle_open;
    /* Watching (moat__jobs_watch). */
    int watching;
    uv_idle_t watch;          /* active while the loop holds the outbox */
    uint64_t watch_last;      /* uv_hrtime() of the last run or outcome */
    atomic_long unanswered;   /* submitted, outcome not queued yet; pool
                                 threads decrement it */
} moat__jobs_t;

/* Prepares the jobs of a node; the pool is attached later (jobs->pool),
 * before the first moat__jobs_add.  Returns 0 or a negative error.  Loop
 * thread. */
int moat__jobs_init(moat__jobs_t *jobs, uv_loop_t *loop, moat__outbox_t *ob);

/* Makes the loop thread poll, as the outbox's writer, for the outcomes of
 * the runs it submits (jobs.c, Watching).  Before the first submission;
 * not with `ordered` or `here`.  Returns 0 or a negative error.  Loop
 * thread. */
int moat__jobs_watch(moat__jobs_t *jobs, uv_loop_t *loop);

/* Stops the polling, if the loop is at it, and writes what is queued.
 * Before the node stops: the outbox counts a holder as a writer.  Loop
 * thread. */
void moat__jobs_unwatch(moat__jobs_t *jobs);

/* The pool's complete callback (moat_pool_opts_t.complete, with the jobs as
 * its data): sends the outcome and forgets the tag.  Pool threads, and the
 * thread that closes the pool. */
void moat__jobs_complete(moat_task_t *task, const moat_outcome_t *o,
                         void *data);

/* Takes a task to run: `args` (owned from now on) with `def` from `lib`.
 * It is submitted by the next moat__jobs_flush, which also comes first
 * when enough are waiting.  The tag is answered exactly once whatever
 * happens.  Loop thread. */
void moat__jobs_add(moat__jobs_t *jobs, uint64_t tag,
                    const moat_task_def_t *def, const moat_lib_t *lib,
                    moat_term_t *args);

/* Submits the waiting tasks, in one batch where the pool takes them;
 * those it refuses are answered `overloaded` (or `enomem`).  Loop
 * thread. */
void moat__jobs_flush(moat__jobs_t *jobs);

/* Sends `request` (borrowed) as a call to native server `server` of the
 * jobs' pool, known by `tag` from now on like a task: its outcome is
 * sent as a done entry, a cancel finds it, and a server that is not
 * alive answers `noproc` at once.  The VM keeps the deadline, so the
 * call has none here.  Loop thread. */
void moat__jobs_call(moat__jobs_t *jobs, uint64_t tag, moat_pid_t server,
                     moat_term_t *request);

/* The VM decided the outcome of task `tag`: ends it silently (after a
 * flush) and reports the tag in a stopped frame once its body is off its
 * thread, at once if it never started.  A tag that is not in flight (its
 * outcome already sent, or never known) is ignored.  Loop thread. */
void moat__jobs_cancel(moat__jobs_t *jobs, uint64_t tag, moat_atom_t reason);

/* From now on the node's tasks run on the loop thread, one at a time and
 * in order, and a cancel comes as MOAT__CANCEL_SIGNAL too, answered on
 * notice_fd for a run not begun (a forked worker of process isolation:
 * see jobs.c's DESIGN).  Installs the signal's handler.  Returns 0, or a
 * negative error (then nothing changed).  Loop thread, once the pool
 * exists, before any job. */
int moat__jobs_run_here(moat__jobs_t *jobs, uv_loop_t *loop,
                        int notice_fd);

/* A run frame's task is about to be answered without being added (a
 * bad entry, an unknown task).  Returns 1 when it must be answered, 0
 * when the parent has been told it never begins (jobs.c, Run here): runs
 * run here are known by their rank among the runs sent, so each one
 * counts.  Loop thread. */
int moat__jobs_answering(moat__jobs_t *jobs);

/* Forgets every job and closes the timer (uv_close: run the loop after).
 * Only once the pool is closed (every outcome decided), or never
 * created.  Loop thread. */
void moat__jobs_close(moat__jobs_t *jobs);

/* ------------------------------------------------------------------ wbuf */

/* A worker process's frames as they are read: see wbuf.c. */
typedef struct moat__wbuf_s {
    char *buf;
    size_t len, cap;
} moat__wbuf_t;

/* Handles one frame, buf[0..len) (its version byte first); returns 0 to
 * go on, anything else to stop: the worker is no longer listened to. */
typedef int (*moat__wbuf_fn)(void *data, const char *buf, size_t len);


/* A libuv alloc callback's work: room for a read, or an empty buffer
 * (the read then fails with UV_ENOBUFS). */
void moat__wbuf_alloc(moat__wbuf_t *b, uv_buf_t *buf);

/* Hands each whole frame in the buffer to fn, in order, and keeps the
 * incomplete rest.  Returns 0; UV_E2BIG when a frame's length is over
 * `max`, or UV_ECANCELED when fn stopped, and then drops everything still
 * in the buffer. */
int moat__wbuf_parse(moat__wbuf_t *b, uint32_t max, moat__wbuf_fn fn,
                     void *data);

/* Reads non-blocking fd to its end (a reaped worker's stdout, so that
 * what it wrote before it died counts), parsing as it goes.  Returns as
 * moat__wbuf_parse does, or UV_ENOMEM when the buffer cannot grow. */
int moat__wbuf_drain(moat__wbuf_t *b, int fd, uint32_t max, moat__wbuf_fn fn,
                     void *data);

void moat__wbuf_free(moat__wbuf_t *b);

/* ----------------------------------------------------------------- procs */

/* The workers of process isolation.  See procs.c's DESIGN. */
typedef struct moat__procs_s moat__procs_t;

struct moat__hello_s;
struct moat__frame_s;
struct moat__atom_s;

/* Called when the node must end (status MOAT_CNODE_EXIT_WORKERS or
 * MOAT_CNODE_EXIT_NOMEM).  Loop thread. */
typedef void (*moat__procs_fatal_cb)(void *data, int status);

/*
 * Starts the workers of hello `h`: size + spares processes of `exe` (this
 * executable), each told hello with one thread and the same libraries.
 * Returns 0 and the workers in *out, or a negative error (nothing is
 * left running).  The caller frees `h` afterwards; nothing of it is kept.
 * Loop thread, which must live as long as the workers (their parent-death
 * signal follows it).
 */
int moat__procs_start(uv_loop_t *loop, moat__outbox_t *ob, const char *exe,
                      const struct moat__hello_s *h, moat__procs_fatal_cb fatal,
                      void *data, moat__procs_t **out);

/* Runs task `task` (an atom, as the frame had it) with `args` (the list,
 * with its version byte) in a worker, or queues it, or answers
 * `overloaded`.  The tag is answered exactly once.  Loop thread. */
void moat__procs_run(moat__procs_t *p, uint64_t tag,
                     const struct moat__atom_s *task, const moat_term_t *args);

/* The VM decided task `tag`'s outcome: see procs.c's DESIGN.  A tag not
 * held is ignored.  Loop thread. */
void moat__procs_cancel(moat__procs_t *p, uint64_t tag, moat_atom_t reason);

/* Ends every worker: closes their stdins, SIGKILLs those still alive
 * after a short grace, and reaps them all before it returns; closes the
 * handles (uv_close: run the loop, then moat__procs_free).  Loop thread. */
void moat__procs_stop(moat__procs_t *p);

/* Frees what is left, after moat__procs_stop and a run of the loop. */
void moat__procs_free(moat__procs_t *p);

/* ---------------------------------------------------------------- forker */

/* The fork server of process isolation: see forker.c's DESIGN. */
typedef struct moat__forker_s moat__forker_t;

struct moat__frame_s;

/* Hears, in request order, each fork request's answer: the worker's pid
 * (> 0) or a negative error (UV_EPIPE: the server died first;
 * UV_ECANCELED: moat__forker_close came first).  Once the server is gone
 * it hears 0, after the answers of the requests left; it may then call
 * moat__forker_close.  Loop thread. */
typedef void (*moat__forker_cb)(void *data, int pid_or_error);

/* Spawns the fork server (`exe` --forker), sends it hello[0..len) (the
 * workers' hello with its version byte) and waits up to wait_ms for it to
 * accept it: blocks for the server's start, a few milliseconds.  Returns
 * 0 with the server in *out, or a negative error (*out NULL, nothing left
 * running; then `cb` is never called).  Loop thread, which must live as
 * long as the server. */
int moat__forker_start(uv_loop_t *loop, const char *exe, const char *hello,
                       size_t len, unsigned wait_ms, moat__forker_cb cb,
                       void *data, moat__forker_t **out);

/* A forked worker's notices to its parent, on a pipe of their own:
 * records of MOAT__NOTICE_LEN bytes, each written whole (a pipe write
 * below PIPE_BUF is never split nor mixed with another) by a signal
 * handler: a kind, then a big-endian value. */
#define MOAT__NOTICE_LEN 9
#define MOAT__NOTICE_FAULT 'F' /* dying of fault signal `value` (forker.c) */
#define MOAT__NOTICE_SKIP 'S'  /* the run sent `value`-th will never begin:
                                  its cancel's signal came before it did
                                  (jobs.c, Run here) */

/* Writes one notice to fd.  Async-signal-safe; errno is kept.  Returns 0
 * or -1. */
int moat__notice(int fd, int kind, uint64_t value);

/* The notice pipe's write end in a forked worker, else -1. */
int moat__forker_notice_fd(void);

/* Asks for a worker whose stdin reads in_fd, whose stdout writes out_fd
 * and who writes its notices (MOAT__NOTICE_LEN) to notice_fd, among them
 * the fault signal it dies of (MOAT_FAULT_SIGNALS) before it dies of
 * it; all three stay
 * the caller's (the server has its own copies once this returns).  The
 * answer comes through the callback.  Returns 0, or a negative error
 * (then no answer comes).  Never blocks.  Loop thread. */
int moat__forker_fork(moat__forker_t *f, int in_fd, int out_fd,
                      int notice_fd);

/* Whether the server may still answer requests (not known gone). */
int moat__forker_alive(const moat__forker_t *f);

/* Ends the server: waits up to wait_ms for the answers of the requests
 * left (each one delivered), answers the rest UV_ECANCELED, SIGKILLs and
 * reaps the server, and frees f once the loop has run (uv_close).  No
 * callback comes afterwards.  NULL is ignored.  Loop thread. */
void moat__forker_close(moat__forker_t *f, unsigned wait_ms);

/* moat__forker_main's answer in a worker it forked. */
#define MOAT__FORKED (-1)

/*
 * The fork server's body (moat_cnode --forker, stdin the socket): reads
 * hello into *hello and opens its libraries into (*libs)[0..*nlibs), then
 * forks a worker per request until the socket's end.  In the server it
 * returns the status to exit with, everything freed.  In a worker it
 * forked it returns MOAT__FORKED: stdin and stdout are the worker's
 * pipes, its parent is the C-node and its parent-death signal is armed;
 * the caller then owns *hello (moat__frame_free) and the libraries, and
 * starts the worker as a node that was sent that hello.
 */
int moat__forker_main(struct moat__frame_s *hello, moat_lib_t ***libs,
                      size_t *nlibs);

/* Starts `exe` with argv (posix_spawn, an empty signal mask, this
 * process's environment), its stdin on fd0 and, unless fd1 < 0, its
 * stdout on fd1 (the caller closes its own copies).  Returns 0 with its
 * pid in *pid, or a negative error.  Loop thread. */
int moat__spawn_exe(const char *exe, char *const argv[], int fd0, int fd1,
                    pid_t *pid);

/* Starts one process of `exe` (posix_spawn, an empty signal mask), its
 * stdin and stdout on pipes whose other ends (close-on-exec) go to
 * *in_fd and *out_fd, its stderr this process's.  Returns 0 with its pid
 * in *pid, or a negative error (then nothing was started).  The caller
 * reaps it.  Loop thread. */
int moat__spawn_worker(const char *exe, pid_t *pid, int *in_fd,
                       int *out_fd);

/* Limits this process's address space to what it maps now plus `bytes`
 * (RLIMIT_AS).  Returns 0 or a negative error. */
int moat__limit_memory(uint64_t bytes);

/* The lowercase name of signal `sig` ("sigsegv"; "signal_N" when it has
 * none) in out[0..cap). */
void moat__signal_name(int sig, char *out, size_t cap);

/* ------------------------------------------------------------- srvworker */

/* The native servers of process isolation, in a worker process of their
 * own.  See srvworker.c's DESIGN. */
typedef struct moat__srvw_s moat__srvw_t;

/* How its start went: ready (all NULL); hello refused with {error,
 * Reason}, `reason` its encoding without a version byte; or it ended
 * first, `why` saying how.  Loop thread. */
typedef void (*moat__srvw_ready_cb)(void *data, const char *reason,
                                    size_t len, const char *why);

/* Spawns the servers' worker of `exe` for hello's servers and sends it
 * their hello; `ready` is called once it answers or ends, and `fatal`
 * when an outcome it held could not be kept (no memory).  Returns 0, or
 * a negative error (then neither is ever called).  Either way *out is
 * set, for moat__srvw_stop and moat__srvw_free (NULL without memory).
 * Loop thread. */
int moat__srvw_start(uv_loop_t *loop, moat__outbox_t *ob, const char *exe,
                     const struct moat__hello_s *h, moat__srvw_ready_cb ready,
                     moat__procs_fatal_cb fatal, void *data,
                     moat__srvw_t **out);

/* Takes a frame from the VM that is the servers' (call, cast, the
 * queries, stop_servers, and a cancel of a tag it holds), well formed,
 * decoded in *f from buf[0..len): forwards or answers it and returns 1.
 * Returns 0 for any other frame.  Loop thread. */
int moat__srvw_frame(moat__srvw_t *s, const struct moat__frame_s *f,
                     const char *buf, size_t len);

/* Ends it: EOF on its stdin, SIGKILL after a short grace, reaped before
 * this returns; closes its handles (run the loop, then moat__srvw_free).
 * Loop thread. */
void moat__srvw_stop(moat__srvw_t *s);

void moat__srvw_free(moat__srvw_t *s);

/* ------------------------------------------------------------------ dist */

/* The distribution transport: see dist.c's DESIGN. */
typedef struct moat__dist_s {
    ei_cnode ec;
    uv_loop_t *loop;
    moat__outbox_t *ob;
    int lfd;               /* the listening socket, or -1 */
    int epmd;              /* keeps the name published while open, or -1 */
    uv_mutex_t lock;       /* the socket's: guards every write to fd,
                              fd, live, owner and tx */
    int lock_ready;
    int fd;                /* the connection to the pool's VM, or -1 */
    int live;              /* frames may be sent on fd */
    erlang_pid owner;      /* who sent the first frame: frames go there */
    int has_owner;         /* loop thread; set under the lock */
    int ended;             /* loop thread: the session is over */
    uv_poll_t lpoll, cpoll;
    int lpoll_open, cpoll_open;
    moat__wbuf_t rd;       /* loop thread: what was read, not yet a whole
                              packet */
    ei_x_buff tx;          /* {moat_cnode, Self, << ... the frame being sent */
    int prefix;            /* tx's constant start, up to the binary's length */
    /* What the node does with the session (data: the node). */
    void (*on_frame)(void *data, const char *frame, size_t len);
    void (*on_batch)(void *data);          /* after the frames of one read */
    void (*on_end)(void *data, const char *why);
    void *data;
} moat__dist_t;

/*
 * Joins as hidden node `node` ("alive@host") with `cookie`: listens on
 * an ephemeral port, publishes it to epmd, and makes `ob` (initialised
 * with fd -1) send each frame to the session's owner.  Returns 0 or a
 * negative error, with `why` set to a message.
 * The loop then accepts one connection; every later one is refused.
 * Loop thread, before any other thread exists.
 */
int moat__dist_start(moat__dist_t *d, uv_loop_t *loop, moat__outbox_t *ob,
                     const char *node, const char *cookie, const char **why);

/* Stops reading, closes the handles (uv_close: run the loop after), the
 * connection and the listening socket, and unpublishes.  Only when no
 * thread can still queue a frame.  Loop thread. */
void moat__dist_stop(moat__dist_t *d);

/* Frees the buffers, after moat__dist_stop and a run of the loop. */
void moat__dist_free(moat__dist_t *d);

/* ---------------------------------------------------------------- errlog */

/* A longer line is sent in pieces of this size, each one a whole log
 * message. */
#define MOAT__ERRLOG_LINE MOAT__LOG_MAX

typedef struct moat__errlog_s {
    uv_pipe_t pipe;           /* the read end of fd 2's pipe */
    int saved_fd;             /* the stderr we were given, or -1 */
    int open;                 /* pipe is initialised (needs uv_close) */
    moat__outbox_t *ob;
    size_t len;
    char line[MOAT__ERRLOG_LINE];
    char rbuf[4096];
} moat__errlog_t;

/* Points fds 1 and 2 at a pipe whose lines the loop sends as {log,
 * warning, Line} frames: whatever a library prints reaches the VM as
 * logs, and stdout (the outbox has its own copy of it) carries frames
 * only.  Returns 0 or a negative error (then fds 1 and 2 are unchanged).
 * Loop thread, before any other thread exists. */
int moat__errlog_start(moat__errlog_t *el, uv_loop_t *loop,
                       moat__outbox_t *ob);

/* Stops reading and closes the pipe (uv_close: run the loop after); fd 2
 * is the original stderr again, so that late reports (a sanitizer's) are
 * seen.  fd 1 stays the pipe's write end: stray prints then fail with
 * EPIPE, never reaching the VM's stdout.  Loop thread. */
void moat__errlog_stop(moat__errlog_t *el);

#endif
