/*
 * forker.c: the fork server of `isolation => process`.  A worker spawned
 * with posix_spawn pays for exec, dynamic linking, the loader's copy and
 * dlopen of every library and the decoding of hello before it can serve:
 * most of the 1.4 to 2.2 ms of CPU a worker cost (doc/cnode.md,
 * "Measured").  All of that is the same for every worker of a node, so one
 * process, the fork server, does it once, and each worker is a fork of it.
 *
 * DESIGN
 *
 * Processes.  The parent (procs.c) spawns the fork server once, as this
 * executable with the argument --forker, its stdin one end of a
 * SOCK_SEQPACKET socketpair and its stdout and stderr the parent's own
 * (so what it prints reaches the VM as logs).  The parent sends the
 * workers' hello as the first message; the server decodes it, opens the
 * libraries and answers 0, or a negative error before exiting.  The
 * parent waits for that answer (a few milliseconds, once), so that the
 * server it keeps is known to serve and to have named itself moat_forker
 * (meanwhile the parent's loop does not read the errlog pipe: a server
 * that printed more than a pipe holds first would stall until the wait
 * times out, and workers would be spawned).  Then each
 * message is a fork request carrying, with SCM_RIGHTS, the three pipe ends
 * a worker needs (its stdin's read end, its stdout's write end, and the
 * write end of its notices: the parent made the pipes and keeps the
 * other ends).  The worker handles the faults a task can raise
 * (MOAT_FAULT_SIGNALS) by writing the signal's number to the notice pipe,
 * then dying of it (procs.c, Deaths), unless a library already handles
 * one; its cancel signal's handler writes there too (jobs.c, Run
 * here).  Each request is answered, in
 * order, with the new worker's pid or a negative error.  The server exits
 * when the socket reaches its end, and dies with the parent (its
 * parent-death signal, set in main like any node's).
 *
 * Whose child.  The parent must reap each worker by pid and see the
 * signal it died of, so a worker must be the parent's child, not the
 * server's.  The parent is a child subreaper (PR_SET_CHILD_SUBREAPER) and
 * the server forks twice: an intermediate process (a vfork child, which
 * copies nothing) forks the worker, answers the request with its pid and
 * exits at once, so that the worker is re-parented to the parent.  The
 * server waits for the intermediate before it reads the next request, so
 * answers stay in request order.
 * The worker waits (yielding) until its parent is the C-node, then sets
 * its parent-death signal (SIGKILL) and checks its parent again: a C-node
 * that died before the signal was armed leaves it another parent, and it
 * exits.  So no worker outlives the C-node, and with it the VM.
 *
 * What a worker shares with the server.  Only what the server has once
 * its libraries are open: no thread (the server checks, after the
 * libraries' constructors ran, that it is alone, and refuses to serve
 * otherwise, for a fork copies only the thread that forks), no libuv loop
 * (the worker makes its loop after the fork, in moat_cnode.c's usual
 * start, and runs its tasks on it: its pool starts a thread only for a
 * native process a task spawns; it needs no errlog pipe, its stderr being
 * the parent's already), no descriptor but its standard ones and the
 * request's pipes (fresh for each worker).  max_memory is
 * applied by the worker once its pool exists, relative to what it maps
 * then, as for a spawned worker.  A forked worker sends ready without
 * waiting for a hello: the server's decoded hello is its own.
 *
 * Threads.  The parent side runs on the parent's loop thread only: a fork
 * request is one non-blocking sendmsg; the answers are read when a
 * uv_poll_t says the socket is readable.  A server that leaves a request
 * unanswered for ANSWER_MS is killed (a stopped process would otherwise
 * leave the parent without workers for ever).  When the server is gone
 * (the socket's end), each request still unanswered is answered
 * UV_EPIPE, then the callback hears 0.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cnode.h"
#include "frame.h"

/* The workers' hello is a few hundred bytes and a socketpair's datagram
 * can be some hundred kilobytes: this bounds what the server reads. */
#define HELLO_MAX (1u << 20)

/* A request unanswered this long means a server that no longer forks
 * (stopped, say): it is killed, and its death is handled as any other.
 * A fork takes well under a millisecond; this leaves room for a machine
 * under heavy load, where a false alarm would cost counted spawns. */
#define ANSWER_MS 5000

/* A request's descriptors: the worker's stdin, its stdout (the frames)
 * and its crash notice's pipe. */
#define REQUEST_FDS 3

/* The faults a forked worker reports on its notice pipe. */
static const int faults[] = {MOAT_FAULT_SIGNALS};

/* ------------------------------------------------------- parent side */

struct moat__forker_s {
    uv_poll_t poll;
    uv_timer_t watch;    /* runs while a request waits: ANSWER_MS */
    int poll_open, watch_open;
    int nopen;           /* handles not closed yet */
    int fd;              /* our end of the socket, or -1 */
    pid_t pid;           /* the server; 0 once reaped */
    int gone;            /* it ended */
    unsigned npending;   /* fork requests not answered yet */
    moat__forker_cb cb;
    void *data;
};

static void on_closed(uv_handle_t *h) {
    moat__forker_t *f = h->data;

    if (--f->nopen == 0)
        free(f);
}

static void on_watch(uv_timer_t *h) {
    moat__forker_t *f = h->data;

    if (f->pid > 0 && !f->gone)
        kill(f->pid, SIGKILL); /* not reaped yet: the pid is its own */
}

/* Watches the oldest request left, if any. */
static void watch(moat__forker_t *f) {
    if (!f->watch_open)
        return;
    if (f->npending > 0 && !f->gone)
        uv_timer_start(&f->watch, on_watch, ANSWER_MS, 0);
    else
        uv_timer_stop(&f->watch);
}

/* The server is gone: every request left is answered UV_EPIPE, then the
 * callback hears 0.  f may be closed by the callback. */
static void gone(moat__forker_t *f) {
    if (f->gone)
        return;
    f->gone = 1;
    if (f->poll_open)
        uv_poll_stop(&f->poll);
    watch(f);
    while (f->npending > 0) {
        f->npending--;
        f->cb(f->data, UV_EPIPE);
    }
    f->cb(f->data, 0);
}

/* Reads every answer waiting.  Returns 1 when the server is gone. */
static int read_answers(moat__forker_t *f) {
    for (;;) {
        int32_t v;
        ssize_t r = recv(f->fd, &v, sizeof v, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (r != (ssize_t)sizeof v)
            return 1; /* its end, or a broken socket */
        if (f->npending == 0)
            return 1; /* an answer nobody asked for: trust it no more */
        f->npending--;
        watch(f);
        f->cb(f->data, v > 0 ? v : v < 0 ? v : UV_EPROTO);
        if (f->gone)
            return 0;
    }
}

static void on_poll(uv_poll_t *h, int status, int events) {
    moat__forker_t *f = h->data;

    (void)events;
    if (status < 0 || read_answers(f))
        gone(f);
}

/* Waits up to wait_ms for the answer to hello.  Returns 0 when the
 * server accepted it, else a negative error. */
static int await_hello(moat__forker_t *f, unsigned wait_ms) {
    uint64_t deadline = uv_hrtime() + (uint64_t)wait_ms * 1000000u;
    struct pollfd pfd = {f->fd, POLLIN, 0};
    int32_t v;
    ssize_t r;

    for (;;) {
        uint64_t now = uv_hrtime();
        if (now >= deadline)
            return UV_ETIMEDOUT;
        r = poll(&pfd, 1, (int)((deadline - now) / 1000000u) + 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            continue;
        r = recv(f->fd, &v, sizeof v, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r != (ssize_t)sizeof v)
            return UV_EPIPE; /* it ended first */
        return v == 0 ? 0 : v;
    }
}

int moat__forker_start(uv_loop_t *loop, const char *exe, const char *hello,
                       size_t len, unsigned wait_ms, moat__forker_cb cb,
                       void *data, moat__forker_t **out) {
    char *argv[3] = {(char *)exe, "--forker", NULL};
    int sv[2] = {-1, -1}, rc;
    moat__forker_t *f = calloc(1, sizeof *f);

    *out = NULL;
    if (f == NULL)
        return UV_ENOMEM;
    f->fd = -1;
    f->cb = cb;
    f->data = data;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        rc = -errno;
        goto fail;
    }
    rc = moat__spawn_exe(exe, argv, sv[1], -1, &f->pid);
    if (rc != 0)
        goto fail;
    close(sv[1]);
    sv[1] = -1;
    f->fd = sv[0];
    sv[0] = -1;
    /* A fresh socket has room for hello: this does not block. */
    if (send(f->fd, hello, len, MSG_NOSIGNAL) != (ssize_t)len ||
        fcntl(f->fd, F_SETFL, fcntl(f->fd, F_GETFL) | O_NONBLOCK) < 0) {
        rc = errno != 0 ? -errno : UV_EIO;
        goto fail;
    }
    rc = await_hello(f, wait_ms);
    if (rc != 0)
        goto fail;
    rc = uv_timer_init(loop, &f->watch);
    if (rc != 0)
        goto fail;
    f->watch_open = 1;
    f->nopen++;
    f->watch.data = f;
    rc = uv_poll_init(loop, &f->poll, f->fd);
    if (rc != 0)
        goto fail;
    f->poll_open = 1;
    f->nopen++;
    f->poll.data = f;
    rc = uv_poll_start(&f->poll, UV_READABLE, on_poll);
    if (rc != 0)
        goto fail;
    *out = f;
    return 0;

fail:
    for (int i = 0; i < 2; i++)
        if (sv[i] >= 0)
            close(sv[i]);
    f->gone = 1; /* no callback from here on */
    moat__forker_close(f, 0);
    return rc;
}

int moat__forker_fork(moat__forker_t *f, int in_fd, int out_fd,
                      int notice_fd) {
    char one = 'f';
    struct iovec iov = {&one, 1};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(REQUEST_FDS * sizeof(int))];
    } u;
    struct msghdr m;
    struct cmsghdr *c;
    int fds[REQUEST_FDS] = {in_fd, out_fd, notice_fd};
    ssize_t r;

    if (f->gone)
        return UV_EPIPE;
    memset(&u, 0, sizeof u);
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.b;
    m.msg_controllen = sizeof u.b;
    c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    do
        r = sendmsg(f->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r != 1)
        return r < 0 ? -errno : UV_EIO;
    if (f->npending++ == 0)
        watch(f);
    return 0;
}

int moat__forker_alive(const moat__forker_t *f) {
    return f != NULL && !f->gone;
}

void moat__forker_close(moat__forker_t *f, unsigned wait_ms) {
    uint64_t deadline = uv_hrtime() + (uint64_t)wait_ms * 1000000u;
    int st;

    if (f == NULL)
        return;
    if (f->fd >= 0 && !f->gone) {
        /* Its end of input: it answers what it was asked, then exits. */
        shutdown(f->fd, SHUT_WR);
        while (f->npending > 0 && !f->gone) {
            struct pollfd pfd = {f->fd, POLLIN, 0};
            uint64_t now = uv_hrtime();
            if (now >= deadline)
                break;
            if (poll(&pfd, 1, (int)((deadline - now) / 1000000u) + 1) < 0 &&
                errno != EINTR)
                break;
            if (read_answers(f))
                break;
        }
    }
    f->gone = 1;
    while (f->npending > 0) {
        f->npending--;
        f->cb(f->data, UV_ECANCELED);
    }
    if (f->pid > 0) {
        kill(f->pid, SIGKILL); /* not reaped yet: the pid is its own */
        while (waitpid(f->pid, &st, 0) < 0 && errno == EINTR)
            ;
        f->pid = 0;
    }
    if (f->poll_open)
        uv_poll_stop(&f->poll); /* not polled once closed */
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    if (f->nopen == 0) {
        free(f);
        return;
    }
    if (f->poll_open) {
        f->poll_open = 0;
        uv_close((uv_handle_t *)&f->poll, on_closed);
    }
    if (f->watch_open) {
        f->watch_open = 0;
        uv_close((uv_handle_t *)&f->watch, on_closed);
    }
}

/* ------------------------------------------------------- server side */

/* How many threads this process has (/proc/self/stat's 20th field), or
 * 0 when it cannot be read. */
static long count_threads(void) {
    char buf[1024], *p;
    long n = 0;
    FILE *fp = fopen("/proc/self/stat", "r");

    if (fp == NULL)
        return 0;
    p = fgets(buf, sizeof buf, fp);
    fclose(fp);
    if (p == NULL || (p = strrchr(buf, ')')) == NULL)
        return 0;
    /* after the name: state (3), then fields 4..19, then num_threads */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u "
                      "%*d %*d %*d %*d %ld",
               &n) != 1)
        return 0;
    return n;
}

/* Answers on the socket (fd 0).  Returns 0 or -1. */
static int answer(int32_t v) {
    ssize_t r;

    do
        r = send(0, &v, sizeof v, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)sizeof v ? 0 : -1;
}

static void close_request(int fds[REQUEST_FDS]) {
    for (int i = 0; i < REQUEST_FDS; i++)
        close(fds[i]);
}

/* Reads the next request's descriptors.  Returns 1, 0 at the socket's
 * end, or -1 on a broken request (its descriptors closed). */
static int take_request(int fds[REQUEST_FDS]) {
    char one;
    struct iovec iov = {&one, 1};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(REQUEST_FDS * sizeof(int))];
    } u;
    struct msghdr m;
    struct cmsghdr *c;
    ssize_t r;

    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.b;
    m.msg_controllen = sizeof u.b;
    do
        r = recvmsg(0, &m, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    if (r <= 0)
        return 0;
    c = CMSG_FIRSTHDR(&m);
    if (c == NULL || c->cmsg_level != SOL_SOCKET ||
        c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(REQUEST_FDS * sizeof(int)))
        return -1; /* our parent sends exactly three; nothing to close */
    memcpy(fds, CMSG_DATA(c), REQUEST_FDS * sizeof(int));
    if (r != 1 || (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) {
        close_request(fds);
        return -1;
    }
    return 1;
}

/* The crash notice's descriptor, in a forked worker. */
static int crash_fd = -1;

/* A fault ends the worker: say which first, then die of it (SA_RESETHAND
 * made its action the default again, and SA_NODEFER leaves it
 * unblocked).  The process (its main thread, whose name ps shows) is
 * named moat_dying first, so that whoever lists the C-node's children
 * (ps, the tests) can tell the dying worker from the live ones until
 * the kernel has torn it down: its main thread is then either named so
 * or a zombie.  Async-signal-safe calls only: open, write, close,
 * raise. */
static void on_fault(int sig) {
    static const char dying[] = "moat_dying";
    int saved = errno, fd;

    if (crash_fd < 0) { /* the fork server itself: just die of it */
        raise(sig);
        return;
    }
    fd = open("/proc/self/comm", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t r = write(fd, dying, sizeof dying - 1);
        (void)r;
        close(fd);
    }
    (void)moat__notice(crash_fd, MOAT__NOTICE_FAULT, (uint64_t)sig);
    errno = saved;
    raise(sig);
}

int moat__notice(int fd, int kind, uint64_t value) {
    unsigned char b[MOAT__NOTICE_LEN];
    int saved = errno;
    ssize_t r;

    b[0] = (unsigned char)kind;
    moat__put_be64(b + 1, value);
    do
        r = write(fd, b, sizeof b);
    while (r < 0 && errno == EINTR);
    errno = saved;
    return r == (ssize_t)sizeof b ? 0 : -1;
}

int moat__forker_notice_fd(void) { return crash_fd; }

/* Handles the faults a task can raise, unless a library has claimed one
 * already (its handler is left alone: the parent then learns of the
 * crash when it reaps the worker).  The server does this once, with its
 * libraries open, and each worker inherits the handlers through fork and
 * only sets crash_fd: sixteen system calls fewer per worker.  There is
 * no alternate stack: a task that overflows its stack leaves the handler
 * none, the kernel kills the worker with SIGSEGV, and again the reap
 * tells. */
static void claim_faults(void) {
    struct sigaction sa, old;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_RESETHAND | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
        if (sigaction(faults[i], NULL, &old) == 0 &&
            !(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL)
            sigaction(faults[i], &sa, NULL);
}

/* In the new worker: stdin and stdout become the request's pipes, and
 * once it is the C-node's child it dies with it.  Returns 0, or -1 when
 * the C-node is already gone or a call failed. */
static int become_worker(int fds[REQUEST_FDS], pid_t mid, pid_t cnode) {
    pid_t pp;

    if (dup2(fds[0], 0) < 0 || dup2(fds[1], 1) < 0)
        return -1;
    close(fds[0]);
    close(fds[1]);
    crash_fd = fds[2];
    prctl(PR_SET_NAME, "moat_cnode", 0, 0, 0);
    /* The intermediate exits right after it answers: until then it is
     * the parent, and a parent-death signal armed now would fire when it
     * exits. */
    while ((pp = getppid()) != cnode) {
        if (pp != mid)
            return -1; /* the C-node died: re-parented to someone else */
        sched_yield();
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != cnode)
        return -1;
    return 0;
}

/* Decodes hello from the first message and opens its libraries.  Returns
 * 0, or an exit status once it has said why on stderr. */
static int load(moat__frame_t *f, moat_lib_t ***libs, size_t *nlibs) {
    struct sigaction old;
    char *buf;
    ssize_t len, r;
    int rc;

    do
        len = recv(0, NULL, 0, MSG_PEEK | MSG_TRUNC);
    while (len < 0 && errno == EINTR);
    if (len <= 0 || (size_t)len > HELLO_MAX)
        return len == 0 ? MOAT_CNODE_EXIT_EOF : MOAT_CNODE_EXIT_FAILURE;
    buf = malloc((size_t)len);
    if (buf == NULL)
        return MOAT_CNODE_EXIT_NOMEM;
    do
        r = recv(0, buf, (size_t)len, 0);
    while (r < 0 && errno == EINTR);
    rc = r == len ? moat__frame_decode(buf, (size_t)len, f) : UV_EIO;
    free(buf);
    if (rc != 0 || f->kind != MOAT__FRAME_HELLO) {
        fprintf(stderr, "moat_cnode: fork server: a bad hello\n");
        return MOAT_CNODE_EXIT_HELLO;
    }
    *libs = calloc(f->hello.nlibraries > 0 ? f->hello.nlibraries : 1,
                   sizeof **libs);
    if (*libs == NULL)
        return MOAT_CNODE_EXIT_NOMEM;
    for (size_t i = 0; i < f->hello.nlibraries; i++) {
        char *err = NULL;
        rc = moat_lib_open(f->hello.libraries[i], &(*libs)[*nlibs], &err);
        if (rc != 0) {
            fprintf(stderr, "moat_cnode: fork server: %s: %s\n",
                    f->hello.libraries[i],
                    err != NULL ? err : moat_strerror(rc));
            free(err);
            return MOAT_CNODE_EXIT_HELLO;
        }
        (*nlibs)++;
    }
    /* A library's constructor may have started a thread: a fork would
     * copy only this one, and whatever the others held (a lock) would
     * stay held in the worker for ever. */
    if (count_threads() != 1) {
        fprintf(stderr, "moat_cnode: fork server: not the only thread once "
                        "the libraries are open; workers are spawned "
                        "instead\n");
        return MOAT_CNODE_EXIT_HELLO;
    }
    /* A forked worker takes the cancel signal for itself (jobs.c, Run
     * here): a library that handles it keeps it, and workers are spawned
     * (they run their tasks on a pool thread and need no signal). */
    if (sigaction(MOAT__CANCEL_SIGNAL, NULL, &old) != 0 ||
        (old.sa_flags & SA_SIGINFO) || old.sa_handler != SIG_DFL) {
        fprintf(stderr, "moat_cnode: fork server: a library handles signal "
                        "%d; workers are spawned instead\n",
                MOAT__CANCEL_SIGNAL);
        return MOAT_CNODE_EXIT_HELLO;
    }
    return 0;
}

/* The intermediate's pid, written by it before it forks the worker: the
 * worker's copy of memory has it. */
static pid_t intermediate;

/*
 * Forks a worker through an intermediate process that answers the
 * request with the worker's pid and exits.  The intermediate is a vfork
 * child: it borrows this process's memory instead of copying it, so that
 * only the worker pays for a copy.  It calls nothing but getpid, fork,
 * send and _exit, and never returns from here; the worker, a true fork
 * with memory of its own, does.  Returns the intermediate's pid (it has
 * exited by then: vfork waits for it) or -errno in the server, 0 in the
 * worker.
 */
static pid_t __attribute__((noinline)) fork_twice(void) {
    pid_t mid = vfork();

    if (mid == 0) {
        pid_t w;
        intermediate = getpid();
        w = fork();
        if (w == 0)
            return 0;
        _exit(answer(w > 0 ? (int32_t)w : -errno) == 0 ? 0 : 1);
    }
    return mid >= 0 ? mid : -errno;
}

int moat__forker_main(moat__frame_t *hello, moat_lib_t ***libs,
                      size_t *nlibs) {
    pid_t cnode = getppid();
    int status, fds[REQUEST_FDS], r;
    pid_t mid;

    memset(hello, 0, sizeof *hello);
    *libs = NULL;
    *nlibs = 0;
    prctl(PR_SET_NAME, "moat_forker", 0, 0, 0);
    status = load(hello, libs, nlibs);
    if (status != 0) {
        answer(UV_EINVAL);
        goto out;
    }
    claim_faults();
    if (answer(0) != 0)
        goto out;
    while ((r = take_request(fds)) != 0) {
        int st;
        if (r < 0) {
            answer(UV_EPROTO);
            continue;
        }
        mid = fork_twice();
        if (mid == 0) {
            if (become_worker(fds, intermediate, cnode) != 0)
                _exit(MOAT_CNODE_EXIT_FAILURE);
            return MOAT__FORKED;
        }
        close_request(fds);
        if (mid < 0) {
            answer(mid);
            continue;
        }
        while (waitpid(mid, &st, 0) < 0 && errno == EINTR)
            ;
        /* It answers before it exits 0; otherwise it never did. */
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            answer(-ECHILD);
    }
    status = MOAT_CNODE_EXIT_EOF;
out:
    for (size_t i = 0; i < *nlibs; i++)
        moat_lib_close((*libs)[i]);
    free(*libs);
    *libs = NULL;
    *nlibs = 0;
    moat__frame_free(hello);
    return status;
}
