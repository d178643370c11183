/*
 * test_cnode.c: moat_cnode driven over its stdio as the VM drives it, frame
 * by frame (doc/cnode.md).
 *
 * Each test spawns the executable named by MOAT_CNODE (the variant's
 * build) with posix_spawn, its stdin and stdout on pipes and its stderr
 * ours, and speaks the protocol with ei.  Libraries: the demo
 * (MOAT_DEMO_SO) and the tests' own cnode_lib.c (MOAT_CNODE_LIB), whose
 * tasks write to stderr and stdout.  When MOAT_CNODE_RUNNER is set (the valgrind
 * stage sets it to its valgrind command), the C-node runs under it, so
 * its leaks and errors fail its exit status.
 *
 * The first group shares one node, started by the group's setup; its
 * teardown closes stdin and expects exit status 0, which a leak under
 * ASan or valgrind would change.  The other tests each start their own
 * node, for a configuration or an ending of their own.  Every test reaps
 * its child.  Tests wait for events, never for time, except where a body
 * must be running before it is cancelled.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>

#include <cmocka.h>
#include <ei.h>

#include "cnode_test.h"

extern char **environ;

/* Generous bounds for the slowest runs (valgrind on both ends): the tests
 * wait for events and only fail when one never comes. */
#define WAIT_MS 60000

/* Tasks in the 10,000-task runs frame. */
#define BATCH 10000

/* Long enough that no test outlives it by accident. */
#define FOREVER_MS 120000


/* ------------------------------------------------------------- helpers */

/* Erlang-like text of the term at *i, e.g. {native_error,<<"boom">>}. */
static void fmt_at(const char *b, int *i, char *o, size_t cap, size_t *n) {
    int type, size, arity;
    long long v;
    unsigned long long u;
    double d;

    assert_int_equal(ei_get_type(b, i, &type, &size), 0);
    switch (type) {
    case ERL_SMALL_INTEGER_EXT:
    case ERL_INTEGER_EXT:
    case ERL_SMALL_BIG_EXT:
    case ERL_LARGE_BIG_EXT:
        if (ei_decode_longlong(b, &(int){*i}, &v) == 0) {
            ei_decode_longlong(b, i, &v);
            put(o, cap, n, "%lld", v);
        } else {
            assert_int_equal(ei_decode_ulonglong(b, i, &u), 0);
            put(o, cap, n, "%llu", u);
        }
        return;
    case ERL_ATOM_EXT:
    case ERL_SMALL_ATOM_EXT:
    case ERL_ATOM_UTF8_EXT:
    case ERL_SMALL_ATOM_UTF8_EXT: {
        char a[MAXATOMLEN_UTF8];
        assert_int_equal(ei_decode_atom(b, i, a), 0);
        put(o, cap, n, "%s", a);
        return;
    }
    case ERL_FLOAT_EXT:
    case NEW_FLOAT_EXT:
        assert_int_equal(ei_decode_double(b, i, &d), 0);
        put(o, cap, n, "%g", d);
        return;
    case ERL_BINARY_EXT: {
        char *bin = malloc((size_t)size + 1);
        long len;
        int printable = 1;
        assert_non_null(bin);
        assert_int_equal(ei_decode_binary(b, i, bin, &len), 0);
        for (long k = 0; k < len; k++)
            printable &= bin[k] >= 0x20 && bin[k] < 0x7f && bin[k] != '"';
        if (printable) {
            put(o, cap, n, "<<\"%.*s\">>", (int)len, bin);
        } else {
            put(o, cap, n, "<<");
            for (long k = 0; k < len; k++)
                put(o, cap, n, "%s%u", k ? "," : "", (unsigned char)bin[k]);
            put(o, cap, n, ">>");
        }
        free(bin);
        return;
    }
    case ERL_STRING_EXT: {
        char *s = malloc((size_t)size + 1);
        assert_non_null(s);
        assert_int_equal(ei_decode_string(b, i, s), 0);
        put(o, cap, n, "\"%s\"", s);
        free(s);
        return;
    }
    case ERL_NIL_EXT:
        *i += 1;
        put(o, cap, n, "[]");
        return;
    case ERL_LIST_EXT:
        assert_int_equal(ei_decode_list_header(b, i, &arity), 0);
        put(o, cap, n, "[");
        for (int k = 0; k < arity; k++) {
            if (k)
                put(o, cap, n, ",");
            fmt_at(b, i, o, cap, n);
        }
        assert_int_equal(ei_get_type(b, i, &type, &size), 0);
        if (type == ERL_NIL_EXT) {
            *i += 1;
        } else {
            put(o, cap, n, "|");
            fmt_at(b, i, o, cap, n);
        }
        put(o, cap, n, "]");
        return;
    case ERL_MAP_EXT:
        assert_int_equal(ei_decode_map_header(b, i, &arity), 0);
        put(o, cap, n, "#{");
        for (int k = 0; k < arity; k++) {
            if (k)
                put(o, cap, n, ",");
            fmt_at(b, i, o, cap, n);
            put(o, cap, n, "=>");
            fmt_at(b, i, o, cap, n);
        }
        put(o, cap, n, "}");
        return;
    case ERL_SMALL_TUPLE_EXT:
    case ERL_LARGE_TUPLE_EXT:
        assert_int_equal(ei_decode_tuple_header(b, i, &arity), 0);
        put(o, cap, n, "{");
        for (int k = 0; k < arity; k++) {
            if (k)
                put(o, cap, n, ",");
            fmt_at(b, i, o, cap, n);
        }
        put(o, cap, n, "}");
        return;
    default:
        fail_msg("unexpected term type %d", type);
    }
}

/* The text of a term with its version byte; a few rotating buffers. */
static const char *fmt(const char *etf) {
    static char bufs[4][4096];
    static int next;
    char *o = bufs[next++ % 4];
    size_t n = 0;
    int i = 0, version;

    assert_int_equal(ei_decode_version(etf, &i, &version), 0);
    fmt_at(etf, &i, o, sizeof bufs[0], &n);
    return o;
}

/* ------------------------------------------------------- events (frames) */

enum { EV_READY, EV_ERROR, EV_DONE, EV_STOPPED, EV_LOG, EV_REPORT };

typedef struct {
    int kind;
    uint64_t tag;    /* done, stopped */
    int ok;          /* done: 1 for ok, 0 for exit */
    char *term;      /* done: the outcome term; ready, error: the frame;
                        with the version byte */
    char level[16];  /* log; report: the frame's kind */
    char *msg;       /* log, NUL-terminated */
} ev_t;

typedef struct {
    pid_t pid;
    int to, from;   /* its stdin (ours to write), its stdout (ours to read) */
    char *buf;      /* bytes read from its stdout, not yet a whole frame */
    size_t len, cap;
    ev_t *ev;
    size_t nev, capev;
    size_t ndone_frames;
    int eof;
    int reaped;
    int status;
} node_t;

static void ev_free(ev_t *e) {
    free(e->term);
    free(e->msg);
}

static void ev_push(node_t *n, ev_t e) {
    if (n->nev == n->capev) {
        n->capev = n->capev ? n->capev * 2 : 64;
        n->ev = realloc(n->ev, n->capev * sizeof *n->ev);
        assert_non_null(n->ev);
    }
    n->ev[n->nev++] = e;
}

/* A copy of the term at buf[i..end) with a version byte before it. */
static char *term_copy(const char *buf, int start, int end) {
    char *t = malloc((size_t)(end - start) + 1);
    assert_non_null(t);
    t[0] = (char)131;
    memcpy(t + 1, buf + start, (size_t)(end - start));
    return t;
}

/* Turns one frame from the C-node into events; anything that is not a
 * frame of the protocol fails the test (stdout carries frames only). */
static void parse_frame(node_t *n, const char *b, size_t len) {
    char kind[MAXATOMLEN_UTF8];
    int i = 0, version, arity, k, start;

    assert_true(len >= 2);
    assert_int_equal(ei_decode_version(b, &i, &version), 0);
    assert_int_equal(ei_decode_tuple_header(b, &i, &arity), 0);
    assert_int_equal(ei_decode_atom(b, &i, kind), 0);
    if (strcmp(kind, "done") == 0 || strcmp(kind, "stopped") == 0) {
        int done = kind[0] == 'd';
        assert_int_equal(arity, 2);
        assert_int_equal(ei_decode_list_header(b, &i, &k), 0);
        assert_true(k > 0); /* never an empty frame */
        n->ndone_frames += done;
        for (int e = 0; e < k; e++) {
            ev_t ev = {0};
            unsigned long long tag;
            ev.kind = done ? EV_DONE : EV_STOPPED;
            if (done) {
                char status[MAXATOMLEN_UTF8];
                assert_int_equal(ei_decode_tuple_header(b, &i, &arity), 0);
                assert_int_equal(arity, 3);
                assert_int_equal(ei_decode_ulonglong(b, &i, &tag), 0);
                assert_int_equal(ei_decode_atom(b, &i, status), 0);
                assert_true(strcmp(status, "ok") == 0 ||
                            strcmp(status, "exit") == 0);
                ev.ok = strcmp(status, "ok") == 0;
                start = i;
                assert_int_equal(ei_skip_term(b, &i), 0);
                ev.term = term_copy(b, start, i);
            } else {
                assert_int_equal(ei_decode_ulonglong(b, &i, &tag), 0);
            }
            ev.tag = tag;
            ev_push(n, ev);
        }
        assert_int_equal(ei_decode_list_header(b, &i, &k), 0);
        assert_int_equal(k, 0);
    } else if (strcmp(kind, "log") == 0) {
        ev_t ev = {0};
        int type, size;
        long mlen;
        assert_int_equal(arity, 3);
        ev.kind = EV_LOG;
        assert_int_equal(ei_decode_atom(b, &i, ev.level), 0);
        assert_int_equal(ei_get_type(b, &i, &type, &size), 0);
        assert_int_equal(type, ERL_BINARY_EXT);
        ev.msg = malloc((size_t)size + 1);
        assert_non_null(ev.msg);
        assert_int_equal(ei_decode_binary(b, &i, ev.msg, &mlen), 0);
        ev.msg[mlen] = '\0';
        ev_push(n, ev);
    } else if (strcmp(kind, "ready") == 0 || strcmp(kind, "error") == 0) {
        ev_t ev = {0};
        ev.kind = kind[0] == 'r' ? EV_READY : EV_ERROR;
        ev.term = malloc(len);
        assert_non_null(ev.term);
        memcpy(ev.term, b, len);
        i = 0;
        assert_int_equal(ei_decode_version(b, &i, &version), 0);
        assert_int_equal(ei_skip_term(b, &i), 0);
        ev_push(n, ev);
    } else if (strcmp(kind, "restarts") == 0 ||
               strcmp(kind, "crashed") == 0 ||
               strcmp(kind, "gave_up") == 0 ||
               strcmp(kind, "servers_stopped") == 0) {
        /* the native supervisor's reports: the whole frame */
        ev_t ev = {0};
        ev.kind = EV_REPORT;
        assert_true(strlen(kind) < sizeof ev.level);
        memcpy(ev.level, kind, strlen(kind) + 1);
        ev.term = malloc(len);
        assert_non_null(ev.term);
        memcpy(ev.term, b, len);
        i = 0;
        assert_int_equal(ei_decode_version(b, &i, &version), 0);
        assert_int_equal(ei_skip_term(b, &i), 0);
        ev_push(n, ev);
    } else {
        fail_msg("unknown frame %s", kind);
    }
    assert_int_equal((size_t)i, len); /* exactly one term */
}

/* Reads what is there (at most one read), and parses whole frames. */
static void read_some(node_t *n) {
    ssize_t r;
    size_t off = 0;

    if (n->cap - n->len < 65536) {
        n->cap = n->cap ? n->cap * 2 : 65536;
        n->buf = realloc(n->buf, n->cap);
        assert_non_null(n->buf);
    }
    r = read(n->from, n->buf + n->len, n->cap - n->len);
    if (r < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    assert_true(r >= 0);
    if (r == 0) {
        n->eof = 1;
        return;
    }
    n->len += (size_t)r;
    while (n->len - off >= 4) {
        const unsigned char *p = (const unsigned char *)n->buf + off;
        size_t flen = (size_t)p[0] << 24 | (size_t)p[1] << 16 |
                      (size_t)p[2] << 8 | p[3];
        if (n->len - off - 4 < flen)
            break;
        parse_frame(n, n->buf + off + 4, flen);
        off += 4 + flen;
    }
    memmove(n->buf, n->buf + off, n->len - off);
    n->len -= off;
}

/* Waits up to ms for output and reads it.  Returns 0 on a timeout. */
static int pump(node_t *n, int ms) {
    struct pollfd p = {n->from, POLLIN, 0};
    int rc = poll(&p, 1, ms < 0 ? 0 : ms);
    if (rc < 0 && errno == EINTR)
        return 1;
    assert_true(rc >= 0);
    if (rc == 0)
        return 0;
    read_some(n);
    return 1;
}

/* The index of the first event of this kind (and tag, for done and
 * stopped), or -1. */
static long ev_find(node_t *n, int kind, uint64_t tag) {
    for (size_t i = 0; i < n->nev; i++)
        if (n->ev[i].kind == kind &&
            ((kind != EV_DONE && kind != EV_STOPPED) || n->ev[i].tag == tag))
            return (long)i;
    return -1;
}

static ev_t ev_take(node_t *n, size_t i) {
    ev_t e = n->ev[i];
    memmove(n->ev + i, n->ev + i + 1, (n->nev - i - 1) * sizeof *n->ev);
    n->nev--;
    return e;
}

/* Fails saying what the node logged before its output ended. */
static void fail_eof(node_t *n) {
    for (size_t i = 0; i < n->nev; i++)
        if (n->ev[i].kind == EV_LOG)
            print_message("   the node logged (%s): %s\n", n->ev[i].level,
                          n->ev[i].msg);
    fail_msg("the node's output ended");
}

/* The first event of this kind (and tag), waiting for it. */
static ev_t node_wait(node_t *n, int kind, uint64_t tag) {
    int64_t deadline = now_ms() + WAIT_MS;
    long i;

    while ((i = ev_find(n, kind, tag)) < 0) {
        if (n->eof)
            fail_eof(n);
        assert_true(now_ms() < deadline);
        pump(n, (int)(deadline - now_ms()));
    }
    return ev_take(n, (size_t)i);
}

/* ------------------------------------------------------ the child node */

/* environ, with each of `extra` (NAME=VALUE) replacing or added. */
static char **make_env(const char *const *extra) {
    size_t n = 0, k = 0;
    char **env;

    while (environ[n] != NULL)
        n++;
    while (extra != NULL && extra[k] != NULL)
        k++;
    env = calloc(n + k + 1, sizeof *env);
    assert_non_null(env);
    n = 0;
    for (char **e = environ; *e != NULL; e++) {
        int replaced = 0;
        for (size_t j = 0; j < k; j++) {
            size_t nl = strcspn(extra[j], "=") + 1;
            replaced |= strncmp(*e, extra[j], nl) == 0;
        }
        if (!replaced)
            env[n++] = *e;
    }
    for (size_t j = 0; j < k; j++)
        env[n++] = (char *)extra[j];
    return env;
}

/* Starts a C-node: under MOAT_CNODE_RUNNER when `use_runner`, with the
 * environment changed by `extra` (may be NULL). */
static void node_spawn(node_t *n, int use_runner, const char *const *extra) {
    posix_spawn_file_actions_t fa;
    char *argv[40], **env;
    int in[2], out[2], a = 0;

    memset(n, 0, sizeof *n);
    assert_int_equal(pipe2(in, O_CLOEXEC), 0);
    assert_int_equal(pipe2(out, O_CLOEXEC), 0);
    assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
    assert_int_equal(posix_spawn_file_actions_adddup2(&fa, in[0], 0), 0);
    assert_int_equal(posix_spawn_file_actions_adddup2(&fa, out[1], 1), 0);
    if (use_runner)
        for (int i = 0; i < nrunner; i++)
            argv[a++] = runner[i];
    argv[a++] = (char *)cnode_path;
    argv[a] = NULL;
    env = make_env(extra);
    assert_int_equal(posix_spawnp(&n->pid, argv[0], &fa, NULL, argv, env),
                     0);
    free(env);
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    close(out[1]);
    n->to = in[1];
    n->from = out[0];
    /* Writes never block, so that sending a large frame can read what the
     * node answers meanwhile (it could otherwise fill stdout and stall). */
    assert_int_equal(fcntl(n->to, F_SETFL, O_NONBLOCK), 0);
}

/* Sends one packet: the 4-byte length, then `len` bytes. */
static void node_send(node_t *n, const char *data, size_t len) {
    unsigned char head[4] = {(unsigned char)(len >> 24),
                             (unsigned char)(len >> 16),
                             (unsigned char)(len >> 8), (unsigned char)len};
    int64_t deadline = now_ms() + WAIT_MS;
    size_t sent = 0, total = 4 + len;

    while (sent < total) {
        struct pollfd p[2] = {{n->to, POLLOUT, 0}, {n->from, POLLIN, 0}};
        assert_true(now_ms() < deadline);
        assert_true(poll(p, n->eof ? 1 : 2, 1000) >= 0);
        if (!n->eof && (p[1].revents & (POLLIN | POLLHUP)))
            read_some(n);
        if (p[0].revents & (POLLERR | POLLHUP))
            fail_msg("the C-node closed its stdin");
        if (p[0].revents & POLLOUT) {
            ssize_t w;
            if (sent < 4)
                w = write(n->to, head + sent, 4 - sent);
            else
                w = write(n->to, data + (sent - 4), total - sent);
            if (w < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            assert_true(w > 0);
            sent += (size_t)w;
        }
    }
}

static void node_send_x(node_t *n, ei_x_buff *x) {
    node_send(n, x->buff, (size_t)x->index);
    ei_x_free(x);
}

/* Waits for the node to end (stdout at EOF, then reaped) and returns its
 * wait status. */
static int node_reap(node_t *n) {
    int64_t deadline = now_ms() + WAIT_MS;
    pid_t r;

    while (!n->eof) {
        assert_true(now_ms() < deadline);
        pump(n, (int)(deadline - now_ms()));
    }
    while ((r = waitpid(n->pid, &n->status, WNOHANG)) == 0) {
        if (now_ms() >= deadline) {
            kill(n->pid, SIGKILL);
            waitpid(n->pid, &n->status, 0);
            n->reaped = 1;
            fail_msg("the C-node did not exit");
        }
        sleep_ms(1);
    }
    assert_int_equal(r, n->pid);
    n->reaped = 1;
    return n->status;
}

/* Closes its stdin, as the VM does when it closes the port, and reaps. */
static int node_close(node_t *n) {
    if (n->to >= 0) {
        close(n->to);
        n->to = -1;
    }
    return node_reap(n);
}

/* Frees what the test kept; kills and reaps a node a failed test left. */
static void node_free(node_t *n) {
    if (n->to >= 0)
        close(n->to);
    if (!n->reaped && n->pid > 0) {
        kill(n->pid, SIGKILL);
        waitpid(n->pid, &n->status, 0);
    }
    close(n->from);
    for (size_t i = 0; i < n->nev; i++)
        ev_free(&n->ev[i]);
    free(n->ev);
    free(n->buf);
    memset(n, 0, sizeof *n);
    n->to = n->from = -1;
}

static void assert_exited(int status, int code) {
    if (!WIFEXITED(status))
        fail_msg("the C-node ended on signal %d, not exit %d",
                 WIFSIGNALED(status) ? WTERMSIG(status) : -1, code);
    assert_int_equal(WEXITSTATUS(status), code);
}

/* ------------------------------------------------------------- frames */

/* {hello, #{size, max_queue, libraries, isolation, name}} plus, when not
 * negative, spares, and when not 0, max_memory; libs ends with NULL. */
static void send_hello_opts(node_t *n, long size, long max_queue,
                            const char *isolation, const char *const *libs,
                            long spares, unsigned long long max_memory) {
    ei_x_buff x;
    int nlibs = 0;

    while (libs[nlibs] != NULL)
        nlibs++;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "hello");
    ei_x_encode_map_header(&x, 6 + (spares >= 0) + (max_memory > 0));
    if (spares >= 0) {
        ei_x_encode_atom(&x, "spares");
        ei_x_encode_long(&x, spares);
    }
    if (max_memory > 0) {
        ei_x_encode_atom(&x, "max_memory");
        ei_x_encode_ulonglong(&x, max_memory);
    }
    ei_x_encode_atom(&x, "size");
    ei_x_encode_long(&x, size);
    ei_x_encode_atom(&x, "max_queue");
    ei_x_encode_long(&x, max_queue);
    ei_x_encode_atom(&x, "libraries");
    ei_x_encode_list_header(&x, nlibs);
    for (int i = 0; i < nlibs; i++)
        ei_x_encode_binary(&x, libs[i], (long)strlen(libs[i]));
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "isolation");
    ei_x_encode_atom(&x, isolation);
    ei_x_encode_atom(&x, "name");
    ei_x_encode_atom(&x, "test");
    ei_x_encode_atom(&x, "an_option_from_the_future");
    ei_x_encode_long(&x, 1);
    node_send_x(n, &x);
}

static void send_hello(node_t *n, long size, long max_queue,
                       const char *isolation, const char *const *libs) {
    send_hello_opts(n, size, max_queue, isolation, libs, -1, 0);
}

/* Starts a node, says hello with the demo library, expects ready. */
static void node_start(node_t *n, long size, long max_queue) {
    const char *libs[] = {demo_path, NULL};
    ev_t e;
    node_spawn(n, 1, NULL);
    send_hello(n, size, max_queue, "thread", libs);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
}

/* {run, Tag, Task, Args}: args is the argument list's encoding without a
 * version byte. */
static void send_run(node_t *n, uint64_t tag, const char *task,
                     const ei_x_buff *args) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 4);
    ei_x_encode_atom(&x, "run");
    ei_x_encode_ulonglong(&x, tag);
    ei_x_encode_atom(&x, task);
    ei_x_append_buf(&x, args->buff, args->index);
    node_send_x(n, &x);
}

static void run_long(node_t *n, uint64_t tag, const char *task, long v) {
    ei_x_buff a = args_long(v);
    send_run(n, tag, task, &a);
    ei_x_free(&a);
}

static void send_cancel_reason(node_t *n, uint64_t tag, const char *reason) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_atom(&x, "cancel");
    ei_x_encode_ulonglong(&x, tag);
    ei_x_encode_atom(&x, reason);
    node_send_x(n, &x);
}

static void send_cancel(node_t *n, uint64_t tag) {
    send_cancel_reason(n, tag, "shutdown");
}

/* Waits for tag's outcome and checks it: ok says which kind, `text` the
 * term as fmt writes it. */
static void expect_done(node_t *n, uint64_t tag, int ok, const char *text) {
    ev_t e = node_wait(n, EV_DONE, tag);
    assert_int_equal(e.ok, ok);
    assert_string_equal(fmt(e.term), text);
    ev_free(&e);
}

static void expect_stopped(node_t *n, uint64_t tag) {
    ev_t e = node_wait(n, EV_STOPPED, tag);
    ev_free(&e);
}

/* The next log frame: checks its level and that its message holds
 * `part`. */
static void expect_log(node_t *n, const char *level, const char *part) {
    ev_t e = node_wait(n, EV_LOG, 0);
    assert_string_equal(e.level, level);
    if (strstr(e.msg, part) == NULL)
        fail_msg("log \"%s\" does not say \"%s\"", e.msg, part);
    ev_free(&e);
}

/* A round trip: once it is back, the node has handled every frame sent
 * before it. */
static void ping(node_t *n, uint64_t tag) {
    run_long(n, tag, "echo", 7);
    expect_done(n, tag, 1, "7");
}

static void expect_no_event(node_t *n, int kind, uint64_t tag) {
    assert_int_equal(ev_find(n, kind, tag), -1);
}

/* ------------------------------------------------- the shared node */

static node_t shared = {.to = -1, .from = -1};
static char *shared_ready; /* its ready frame */

static int shared_setup(void **state) {
    const char *libs[] = {demo_path, lib_path, NULL};
    ev_t e;
    (void)state;
    node_spawn(&shared, 1, NULL);
    send_hello(&shared, 2, 2 * BATCH, "thread", libs);
    e = node_wait(&shared, EV_READY, 0);
    shared_ready = e.term;
    return 0;
}

/* Ends the shared node as a VM does: its exit status must be 0, which
 * a leak or an error under ASan or valgrind would change. */
static int shared_teardown(void **state) {
    int status;
    (void)state;
    free(shared_ready);
    shared_ready = NULL;
    status = node_close(&shared);
    node_free(&shared);
    assert_exited(status, 0);
    return 0;
}

/* ready carries the node's OS pid and every task of its libraries, in
 * library order. */
static void test_cnode_ready_lists_every_task(void **state) {
    char want[256];
    (void)state;
    snprintf(want, sizeof want,
             "{ready,%d,[echo,sleep,spin,fail,exit,segfault,abort,alloc,fib,"
             "sum,say,print,close_frames,fault_big]}",
             (int)shared.pid);
    assert_string_equal(fmt(shared_ready), want);
}

/* echo returns its argument byte for byte, under the largest tag. */
static void test_cnode_echo_returns_its_argument(void **state) {
    const uint64_t tag = UINT64_MAX;
    ei_x_buff a, t;
    ev_t e;
    (void)state;
    ei_x_new(&t);
    ei_x_encode_tuple_header(&t, 4);
    ei_x_encode_atom(&t, "a");
    ei_x_encode_string(&t, "text");
    ei_x_encode_long(&t, -5);
    ei_x_encode_binary(&t, "\1\2\3", 3);
    ei_x_new(&a);
    ei_x_encode_list_header(&a, 1);
    ei_x_append_buf(&a, t.buff, t.index);
    ei_x_encode_empty_list(&a);
    send_run(&shared, tag, "echo", &a);
    e = node_wait(&shared, EV_DONE, tag);
    assert_int_equal(e.ok, 1);
    assert_memory_equal(e.term + 1, t.buff, (size_t)t.index);
    assert_string_equal(fmt(e.term), "{a,\"text\",-5,<<1,2,3>>}");
    ev_free(&e);
    ei_x_free(&a);
    ei_x_free(&t);
}

/* fail raises {native_error, Message}; exit ends with its reason; a
 * task's own refusal of its arguments is its own reason. */
static void test_cnode_failures_are_exit_outcomes(void **state) {
    ei_x_buff a = args_binary("boom"), r, none = args_none();
    (void)state;
    send_run(&shared, 101, "fail", &a);
    expect_done(&shared, 101, 0, "{native_error,<<\"boom\">>}");

    ei_x_new(&r);
    ei_x_encode_list_header(&r, 1);
    ei_x_encode_tuple_header(&r, 2);
    ei_x_encode_atom(&r, "shutdown");
    ei_x_encode_atom(&r, "because");
    ei_x_encode_empty_list(&r);
    send_run(&shared, 102, "exit", &r);
    expect_done(&shared, 102, 0, "{shutdown,because}");

    send_run(&shared, 103, "echo", &none);
    expect_done(&shared, 103, 0, "badarg");
    ei_x_free(&a);
    ei_x_free(&r);
    ei_x_free(&none);
}

/* A task no library has is {unknown_task, Task}, and the node serves
 * on. */
static void test_cnode_unknown_task(void **state) {
    ei_x_buff none = args_none();
    (void)state;
    send_run(&shared, 201, "no_such_task", &none);
    expect_done(&shared, 201, 0, "{unknown_task,no_such_task}");
    ping(&shared, 202);
    ei_x_free(&none);
}

/* A runs frame of 10,000 tasks: each tag comes back exactly once, with
 * its own result. */
static void test_cnode_runs_batch_answers_each_tag_once(void **state) {
    const uint64_t base = 1000000;
    unsigned char *seen = calloc(BATCH, 1);
    size_t got = 0, frames0 = shared.ndone_frames;
    int64_t deadline = now_ms() + WAIT_MS;
    ei_x_buff x;
    (void)state;

    assert_non_null(seen);
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "runs");
    ei_x_encode_list_header(&x, BATCH);
    for (long i = 0; i < BATCH; i++) {
        ei_x_encode_tuple_header(&x, 3);
        ei_x_encode_ulonglong(&x, base + (uint64_t)i);
        ei_x_encode_atom(&x, "echo");
        ei_x_encode_list_header(&x, 1);
        ei_x_encode_long(&x, i);
        ei_x_encode_empty_list(&x);
    }
    ei_x_encode_empty_list(&x);
    node_send_x(&shared, &x);

    while (got < BATCH) {
        size_t keep = 0;
        for (size_t i = 0; i < shared.nev; i++) {
            ev_t *e = &shared.ev[i];
            long v;
            int k = 1, version;
            if (e->kind != EV_DONE || e->tag < base ||
                e->tag >= base + BATCH) {
                shared.ev[keep++] = *e;
                continue;
            }
            assert_int_equal(e->ok, 1);
            assert_int_equal(ei_decode_version(e->term, &(int){0}, &version),
                             0);
            assert_int_equal(ei_decode_long(e->term, &k, &v), 0);
            assert_int_equal((uint64_t)v, e->tag - base);
            assert_int_equal(seen[e->tag - base]++, 0);
            got++;
            ev_free(e);
        }
        shared.nev = keep;
        if (got < BATCH) {
            assert_false(shared.eof);
            assert_true(now_ms() < deadline);
            pump(&shared, (int)(deadline - now_ms()));
        }
    }
    /* Nothing more for those tags after a round trip. */
    ping(&shared, 301);
    for (size_t i = 0; i < shared.nev; i++)
        assert_false(shared.ev[i].kind == EV_DONE &&
                     shared.ev[i].tag >= base &&
                     shared.ev[i].tag < base + BATCH);
    print_message("   %d outcomes came in %zu done frames\n", BATCH,
                  shared.ndone_frames - frames0);
    free(seen);
}

/* After a batch of runs the loop writes their outcomes itself while it
 * polls (jobs.c, Watching), and lets go after a quiet 50 us: an outcome
 * that comes later, to a loop asleep, is written by its pool thread.
 * Both kinds arrive, once each, in either order of completion. */
static void test_cnode_outcomes_after_the_loop_stops_polling(void **state) {
    (void)state;
    run_long(&shared, 601, "sleep", 20);
    expect_done(&shared, 601, 1, "ok");
    run_long(&shared, 602, "sleep", 20);
    run_long(&shared, 603, "echo", 3);
    expect_done(&shared, 603, 1, "3");
    expect_done(&shared, 602, 1, "ok");
    for (uint64_t tag = 604; tag < 614; tag++) /* round trips, polled */
        ping(&shared, tag);
    expect_no_event(&shared, EV_DONE, 601);
    expect_no_event(&shared, EV_DONE, 602);
}

/* Waits until every task sent before this marker has been taken by a
 * thread: the pool's queue is FIFO, and `say` (cnode_lib.c) writes the
 * marker to stderr once it runs, which reaches us as a log frame.  It
 * needs a free thread. */
static void barrier(node_t *n, uint64_t tag, const char *marker) {
    ei_x_buff a = args_binary(marker);
    send_run(n, tag, "say", &a);
    ei_x_free(&a);
    expect_log(n, "warning", marker);
    expect_done(n, tag, 1, "ok");
}

/* Cancelled while queued: stopped at once.  Cancelled while running (a
 * sleep, which heeds it): stopped once it has returned.  Neither gets a
 * done entry.  (The shared pool has two threads.) */
static void test_cnode_cancel_gives_stopped_not_done(void **state) {
    (void)state;
    run_long(&shared, 401, "sleep", FOREVER_MS);
    barrier(&shared, 402, "sleep 401 runs");
    run_long(&shared, 403, "sleep", FOREVER_MS);
    run_long(&shared, 404, "echo", 3); /* queued behind both sleeps */
    send_cancel(&shared, 404);
    expect_stopped(&shared, 404);
    send_cancel(&shared, 401);
    expect_stopped(&shared, 401);
    send_cancel(&shared, 403);
    expect_stopped(&shared, 403);
    /* A cancel for a tag the node no longer holds is ignored. */
    send_cancel(&shared, 401);
    send_cancel(&shared, 999999);
    ping(&shared, 405);
    expect_no_event(&shared, EV_DONE, 401);
    expect_no_event(&shared, EV_DONE, 403);
    expect_no_event(&shared, EV_DONE, 404);
    expect_no_event(&shared, EV_STOPPED, 401);
    expect_no_event(&shared, EV_STOPPED, 999999);
}

/* The first of a done and a stopped event for `tag`, waiting for it. */
static ev_t node_wait_end(node_t *n, uint64_t tag) {
    int64_t deadline = now_ms() + WAIT_MS;
    long i;

    while ((i = ev_find(n, EV_STOPPED, tag)) < 0 &&
           (i = ev_find(n, EV_DONE, tag)) < 0) {
        assert_false(n->eof);
        assert_true(now_ms() < deadline);
        pump(n, (int)(deadline - now_ms()));
    }
    return ev_take(n, (size_t)i);
}

/* A spin ignores cancellation: its tag is stopped only once the body has
 * returned, and the node serves other tasks meanwhile.  On a loaded
 * machine (the sanitizers, valgrind) the cancel can reach the node after
 * the 1 s spin has returned: its outcome is then done and no stopped
 * follows, and the case tries again with new tags. */
static void test_cnode_cancel_of_spin_waits_for_the_body(void **state) {
    const long spin_ms = 1000;
    (void)state;
    for (uint64_t tag = 501; tag < 551; tag += 10) {
        int64_t t0 = now_ms();
        ev_t e;
        run_long(&shared, tag, "spin", spin_ms * 1000);
        barrier(&shared, tag + 1, "spin runs");
        send_cancel(&shared, tag);
        ping(&shared, tag + 2); /* served while the spin runs */
        e = node_wait_end(&shared, tag);
        if (e.kind == EV_DONE) {
            print_message("   the cancel of %llu came after its spin\n",
                          (unsigned long long)tag);
            ev_free(&e);
            continue;
        }
        ev_free(&e);
        assert_true(now_ms() - t0 >= spin_ms);
        ping(&shared, tag + 3);
        expect_no_event(&shared, EV_DONE, tag);
        return;
    }
    fail_msg("every cancel came after its spin had returned");
}

/* What a task library writes to stderr reaches the VM as log frames; so
 * does what it prints to stdout, which would otherwise break the frames
 * there. */
static void test_cnode_task_output_reaches_the_vm_as_logs(void **state) {
    ei_x_buff a = args_binary("a line from a task"),
              b = args_binary("printed by a task");
    (void)state;
    send_run(&shared, 601, "say", &a);
    expect_done(&shared, 601, 1, "ok");
    expect_log(&shared, "warning", "a line from a task");
    send_run(&shared, 602, "print", &b);
    expect_done(&shared, 602, 1, "ok");
    expect_log(&shared, "warning", "printed by a task");
    ping(&shared, 603);
    ei_x_free(&a);
    ei_x_free(&b);
}

/* Raw packet bytes. */
static void send_raw(node_t *n, const void *bytes, size_t len) {
    node_send(n, bytes, len);
}

/* A frame whose term is built by the caller in x (version byte first). */
static ei_x_buff frame_start(void) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    return x;
}

/* Malformed frames never end the node: each one is logged, a tag that can
 * be read from it is answered badarg, and the node serves on. */
static void test_cnode_malformed_frames_are_logged(void **state) {
    ei_x_buff x;
    (void)state;

    send_raw(&shared, "\x83garbage!", 9);
    expect_log(&shared, "error", "well-formed");
    send_raw(&shared, "", 0);
    expect_log(&shared, "error", "empty");
    send_raw(&shared, "\x83", 1);
    expect_log(&shared, "error", "malformed");

    /* truncated: the tag is still readable */
    x = frame_start();
    ei_x_encode_tuple_header(&x, 4);
    ei_x_encode_atom(&x, "run");
    ei_x_encode_ulonglong(&x, 701);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_binary(&x, "0123456789", 10);
    ei_x_encode_empty_list(&x);
    send_raw(&shared, x.buff, (size_t)x.index - 6);
    ei_x_free(&x);
    expect_log(&shared, "error", "well-formed");
    expect_done(&shared, 701, 0, "badarg");

    /* shapes: an unknown kind, not a tuple, a run without its parts */
    x = frame_start();
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "foo");
    ei_x_encode_long(&x, 1);
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "unknown kind");
    x = frame_start();
    ei_x_encode_atom(&x, "run");
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "not a tuple");
    x = frame_start();
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "run");
    ei_x_encode_ulonglong(&x, 702);
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "{Tag, Task, Args}");
    expect_done(&shared, 702, 0, "badarg");

    /* a readable tag with bad arguments, a bad task name, a bad tag */
    x = frame_start();
    ei_x_encode_tuple_header(&x, 4);
    ei_x_encode_atom(&x, "run");
    ei_x_encode_ulonglong(&x, 703);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_atom(&x, "not_a_list");
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "703");
    expect_done(&shared, 703, 0, "badarg");
    x = frame_start();
    ei_x_encode_tuple_header(&x, 4);
    ei_x_encode_atom(&x, "run");
    ei_x_encode_ulonglong(&x, 704);
    ei_x_encode_string(&x, "echo");
    ei_x_encode_empty_list(&x);
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "not an atom");
    expect_done(&shared, 704, 0, "badarg");
    x = frame_start();
    ei_x_encode_tuple_header(&x, 4);
    ei_x_encode_atom(&x, "run");
    ei_x_encode_long(&x, -1);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_empty_list(&x);
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "tag");

    /* runs: good, untagged and bad elements together */
    x = frame_start();
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "runs");
    ei_x_encode_list_header(&x, 3);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_ulonglong(&x, 705);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_atom(&x, "fine");
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "garbage");
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_ulonglong(&x, 706);
    ei_x_encode_atom(&x, "echo");
    ei_x_encode_atom(&x, "not_a_list");
    ei_x_encode_empty_list(&x);
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "runs");
    expect_done(&shared, 705, 1, "fine");
    expect_done(&shared, 706, 0, "badarg");

    /* a bad cancel, and a second hello */
    x = frame_start();
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_atom(&x, "cancel");
    ei_x_encode_atom(&x, "not_a_tag");
    ei_x_encode_atom(&x, "shutdown");
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "cancel");
    x = frame_start();
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "hello");
    ei_x_encode_map_header(&x, 0);
    node_send_x(&shared, &x);
    expect_log(&shared, "error", "second hello");

    ping(&shared, 707);
    assert_int_equal(ev_find(&shared, EV_LOG, 0), -1); /* one log each */
}

/* ------------------------------------------------------ own nodes */

/* Each of these tests starts a node of its own in *state; the teardown
 * kills and reaps it if the test failed before it ended. */
static int own_setup(void **state) {
    node_t *n = calloc(1, sizeof *n);
    assert_non_null(n);
    n->to = n->from = -1;
    *state = n;
    return 0;
}

static int own_teardown(void **state) {
    node_free(*state);
    free(*state);
    return 0;
}

/* A node with one thread and one queue slot refuses a third task as
 * overloaded. */
static void test_cnode_overloaded(void **state) {
    node_t *n = *state;
    node_start(n, 1, 1);
    run_long(n, 1, "sleep", FOREVER_MS);
    run_long(n, 2, "sleep", FOREVER_MS);
    run_long(n, 3, "echo", 3);
    expect_done(n, 3, 0, "overloaded");
    send_cancel(n, 2);
    send_cancel(n, 1);
    expect_stopped(n, 2);
    expect_stopped(n, 1);
    assert_exited(node_close(n), 0);
}

/* Any frame before hello is answered {error, {bad_hello, _}}, then the
 * node exits with status 2. */
static void test_cnode_frame_before_hello_is_bad_hello(void **state) {
    node_t *n = *state;
    ev_t e;
    node_spawn(n, 1, NULL);
    run_long(n, 1, "echo", 1);
    e = node_wait(n, EV_ERROR, 0);
    assert_string_equal(
        fmt(e.term),
        "{error,{bad_hello,<<\"the first frame is not {hello, Opts}\">>}}");
    ev_free(&e);
    assert_exited(node_reap(n), 2);
    expect_no_event(n, EV_DONE, 1);
}

/* A library that cannot be loaded is {error, {bad_library, Message}},
 * then exit status 2. */
static void test_cnode_bad_library(void **state) {
    const char *libs[] = {demo_path, "/nonexistent/moat_lib.so", NULL};
    node_t *n = *state;
    ev_t e;
    node_spawn(n, 1, NULL);
    send_hello(n, 2, 10, "thread", libs);
    e = node_wait(n, EV_ERROR, 0);
    assert_non_null(strstr(fmt(e.term), "{error,{bad_library,<<\""));
    assert_non_null(strstr(fmt(e.term), "/nonexistent/moat_lib.so"));
    ev_free(&e);
    assert_exited(node_reap(n), 2);
}

/* stdin's end ends the node with status 0 at once, without waiting for a
 * body that ignores cancellation. */
static void test_cnode_eof_exits_0_with_a_spin_running(void **state) {
    node_t *n = *state;
    node_start(n, 2, 10);
    run_long(n, 1, "spin", (long)FOREVER_MS * 1000);
    sleep_ms(100);
    /* node_reap's bound, WAIT_MS, is well under the spin */
    assert_exited(node_close(n), 0);
    expect_no_event(n, EV_DONE, 1);
}

/* A segfault in a task ends the whole node on SIGSEGV: in thread
 * isolation nothing survives a hard fault, by design.  The node runs
 * without MOAT_CNODE_RUNNER here, and with the sanitizers' own SIGSEGV
 * handlers off, so that the signal is the kernel's.  In the ASan build,
 * UBSan (built in with it, without recovery) sees the null store first
 * and ends the node with status 1 after its report (which reaches the VM
 * as a log frame only if the errlog thread forwards it in time). */
static void test_cnode_segfault_kills_the_node(void **state) {
    const char *libs[] = {demo_path, NULL};
    const char *env[] = {"ASAN_OPTIONS=detect_leaks=0:handle_segv=0",
                         "TSAN_OPTIONS=handle_segv=0", NULL};
    ei_x_buff none = args_none();
    node_t *n = *state;
    ev_t e;
    int status;
    node_spawn(n, 0, env);
    send_hello(n, 2, 10, "thread", libs);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    send_run(n, 1, "segfault", &none);
    ei_x_free(&none);
    status = node_reap(n);
#if defined(__SANITIZE_ADDRESS__)
    /* UBSan's report may die with the node before its errlog thread
     * forwards it (they are the same process): only the status is
     * certain. */
    assert_exited(status, 1);
#else
    if (!WIFSIGNALED(status))
        fail_msg("the node exited with %d, not on a signal",
                 WEXITSTATUS(status));
    assert_int_equal(WTERMSIG(status), SIGSEGV);
#endif
    expect_no_event(n, EV_DONE, 1);
}

/* ------------------------------------------------- process isolation */

/* The outcome a segfault task gets.  In the ASan build UBSan (built in,
 * without recovery) sees the null store before the kernel does and ends
 * the worker with status 1 (UBSan takes abort_on_error from
 * UBSAN_OPTIONS, which does not set it). */
#if defined(__SANITIZE_ADDRESS__)
#define SEGFAULT_REASON "{native_crash,{exit_status,1}}"
#else
#define SEGFAULT_REASON "{native_crash,sigsegv}"
#endif

/* The sanitizers' own SIGSEGV handlers off, so that a worker's segfault
 * is the kernel's signal; leak checks stay on for the parent. */
static const char *const process_env[] = {
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:handle_segv=0",
    "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:handle_segv=0",
    NULL};

/* Starts a node in process isolation with the demo library. */
static void process_start(node_t *n, long size, long spares,
                          unsigned long long max_memory) {
    const char *libs[] = {demo_path, NULL};
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_opts(n, size, 1000, "process", libs, spares, max_memory);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
}

/* The live (not zombie) children of `parent` named `name`
 * (NULL: any name), their pids in pids[0..cap). */
static int children_named(pid_t parent, const char *name, pid_t *pids,
                          int cap) {
    DIR *d = opendir("/proc");
    struct dirent *de;
    int n = 0;

    assert_non_null(d);
    while ((de = readdir(d)) != NULL) {
        char path[300], buf[512], *rp, state;
        int ppid;
        FILE *f;
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        f = fopen(path, "r");
        if (f == NULL)
            continue;
        buf[0] = '\0';
        if (fgets(buf, sizeof buf, f) == NULL)
            buf[0] = '\0';
        fclose(f);
        rp = strrchr(buf, ')'); /* the name may hold anything */
        if (rp == NULL || sscanf(rp + 1, " %c %d", &state, &ppid) != 2)
            continue;
        if (ppid != parent || state == 'Z')
            continue;
        *rp = '\0';
        if (name != NULL && (strchr(buf, '(') == NULL ||
                             strcmp(strchr(buf, '(') + 1, name) != 0))
            continue;
        if (n < cap)
            pids[n] = (pid_t)atoi(de->d_name);
        n++;
    }
    closedir(d);
    return n;
}

/* The workers of a node in process isolation: its children but the fork
 * server (forker.c), which names itself moat_forker. */
static int children(pid_t parent, pid_t *pids, int cap) {
    return children_named(parent, "moat_cnode", pids, cap);
}

/* Fails unless every one of pids[0..n) is gone (reaped by its parent). */
static void expect_gone(const pid_t *pids, int n) {
    for (int i = 0; i < n; i++)
        if (kill(pids[i], 0) == 0 || errno != ESRCH)
            fail_msg("worker %d outlived the parent", (int)pids[i]);
}

/* Waits until the node has exactly `want` live workers. */
static void expect_workers(node_t *n, int want) {
    int64_t deadline = now_ms() + WAIT_MS;
    pid_t pids[64];
    int got;

    while ((got = children(n->pid, pids, 64)) != want) {
        if (now_ms() >= deadline)
            fail_msg("%d workers, not %d", got, want);
        pump(n, 5);
    }
}

/* Fewer iterations when the node runs under valgrind. */
static int slow(void) { return nrunner > 0; }

/* ready carries the parent's pid and the libraries' tasks, and the parent
 * keeps size + spares worker processes. */
static void test_cnode_process_ready(void **state) {
    const char *libs[] = {demo_path, NULL};
    node_t *n = *state;
    char want[256];
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_opts(n, 2, 10, "process", libs, 1, 0);
    e = node_wait(n, EV_READY, 0);
    snprintf(want, sizeof want,
             "{ready,%d,[echo,sleep,spin,fail,exit,segfault,abort,alloc,fib,"
             "sum]}",
             (int)n->pid);
    assert_string_equal(fmt(e.term), want);
    ev_free(&e);
    expect_workers(n, 3);
    assert_exited(node_close(n), 0);
}

/* echo and the task's own failures come back as in thread isolation. */
static void test_cnode_process_echo(void **state) {
    ei_x_buff a = args_binary("boom"), none = args_none();
    node_t *n = *state;
    process_start(n, 2, -1, 0); /* spares: the default */
    for (uint64_t t = 1; t <= 20; t++) {
        run_long(n, t, "echo", (long)t * 3);
        char want[32];
        snprintf(want, sizeof want, "%ld", (long)t * 3);
        expect_done(n, t, 1, want);
    }
    send_run(n, 21, "fail", &a);
    expect_done(n, 21, 0, "{native_error,<<\"boom\">>}");
    send_run(n, 22, "echo", &none);
    expect_done(n, 22, 0, "badarg");
    send_run(n, 23, "nope", &none);
    expect_done(n, 23, 0, "{unknown_task,nope}");
    expect_workers(n, 3);
    ei_x_free(&a);
    ei_x_free(&none);
    assert_exited(node_close(n), 0);
}

/* A segfault ends its task with {native_crash, sigsegv}, the worker is
 * replaced, and the node serves the next task. */
static void test_cnode_process_segfault_ends_only_its_task(void **state) {
    ei_x_buff none = args_none();
    node_t *n = *state;
    process_start(n, 1, 1, 0);
    send_run(n, 1, "segfault", &none);
    expect_done(n, 1, 0, SEGFAULT_REASON);
    ping(n, 2);
    expect_workers(n, 2);
    send_run(n, 3, "segfault", &none);
    expect_done(n, 3, 0, SEGFAULT_REASON);
    ping(n, 4);
    expect_workers(n, 2);
    ei_x_free(&none);
    assert_exited(node_close(n), 0);
}

/* abort ends its task with {native_crash, sigabrt}. */
static void test_cnode_process_abort_is_sigabrt(void **state) {
    ei_x_buff none = args_none();
    node_t *n = *state;
    process_start(n, 1, 1, 0);
    send_run(n, 1, "abort", &none);
    expect_done(n, 1, 0, "{native_crash,sigabrt}");
    ping(n, 2);
    ei_x_free(&none);
    assert_exited(node_close(n), 0);
}

/* 200 tasks in one runs frame, every tenth a segfault: each tag comes
 * back exactly once, the crashes with their signal, the others ok; the
 * crashes never count toward the intensity. */
static void test_cnode_process_every_tenth_crashes(void **state) {
    const uint64_t base = 5000;
    const int total = slow() ? 40 : 200;
    unsigned char seen[200] = {0};
    int got = 0;
    int64_t deadline = now_ms() + WAIT_MS;
    node_t *n = *state;
    ei_x_buff x;
    process_start(n, 2, 1, 0);

    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "runs");
    ei_x_encode_list_header(&x, total);
    for (int i = 0; i < total; i++) {
        ei_x_encode_tuple_header(&x, 3);
        ei_x_encode_ulonglong(&x, base + (uint64_t)i);
        if (i % 10 == 0) {
            ei_x_encode_atom(&x, "segfault");
            ei_x_encode_empty_list(&x);
        } else {
            ei_x_encode_atom(&x, "echo");
            ei_x_encode_list_header(&x, 1);
            ei_x_encode_long(&x, i);
            ei_x_encode_empty_list(&x);
        }
    }
    ei_x_encode_empty_list(&x);
    node_send_x(n, &x);

    while (got < total) {
        size_t keep = 0;
        for (size_t i = 0; i < n->nev; i++) {
            ev_t *e = &n->ev[i];
            uint64_t k;
            char want[32];
            if (e->kind != EV_DONE || e->tag < base ||
                e->tag >= base + (uint64_t)total) {
                n->ev[keep++] = *e;
                continue;
            }
            k = e->tag - base;
            assert_int_equal(seen[k]++, 0);
            if (k % 10 == 0) {
                assert_int_equal(e->ok, 0);
                assert_string_equal(fmt(e->term), SEGFAULT_REASON);
            } else {
                snprintf(want, sizeof want, "%d", (int)k);
                assert_int_equal(e->ok, 1);
                assert_string_equal(fmt(e->term), want);
            }
            got++;
            ev_free(e);
        }
        n->nev = keep;
        if (got < total) {
            assert_false(n->eof);
            assert_true(now_ms() < deadline);
            pump(n, (int)(deadline - now_ms()));
        }
    }
    ping(n, 1);
    for (size_t i = 0; i < n->nev; i++)
        assert_false(n->ev[i].kind == EV_DONE && n->ev[i].tag >= base);
    expect_workers(n, 3);
    assert_exited(node_close(n), 0);
}

/* A cancel `killed` of a spin, which ignores cancellation, SIGKILLs its
 * worker: stopped comes long before the spin would end, never a done,
 * and the worker is replaced. */
static void test_cnode_process_cancel_killed_kills(void **state) {
    node_t *n = *state;
    int64_t t0;
    process_start(n, 1, 1, 0);
    run_long(n, 1, "spin", (long)FOREVER_MS * 1000);
    sleep_ms(50); /* let the body start: not needed for the kill */
    t0 = now_ms();
    send_cancel_reason(n, 1, "killed");
    expect_stopped(n, 1);
    assert_true(now_ms() - t0 < FOREVER_MS / 4);
    run_long(n, 2, "spin", (long)FOREVER_MS * 1000);
    send_cancel_reason(n, 2, "timeout");
    expect_stopped(n, 2);
    ping(n, 3);
    expect_workers(n, 2);
    expect_no_event(n, EV_DONE, 1);
    expect_no_event(n, EV_DONE, 2);
    assert_exited(node_close(n), 0);
}

/* A cancel `shutdown` is the worker's to heed: a sleep stops, its tag is
 * stopped, and the worker serves on (no kill, no replacement needed). */
static void test_cnode_process_cancel_shutdown_of_sleep(void **state) {
    node_t *n = *state;
    pid_t before[8], after[8];
    int nb, na;
    process_start(n, 1, 0, 0);
    expect_workers(n, 1);
    nb = children(n->pid, before, 8);
    run_long(n, 1, "sleep", FOREVER_MS);
    sleep_ms(20);
    send_cancel(n, 1);
    expect_stopped(n, 1);
    ping(n, 2);
    na = children(n->pid, after, 8);
    assert_int_equal(nb, 1);
    assert_int_equal(na, 1);
    assert_int_equal(before[0], after[0]); /* the same worker */
    expect_no_event(n, EV_DONE, 1);
    assert_exited(node_close(n), 0);
}

/* A run waiting for a worker is dropped by its cancel, stopped at once;
 * past size + max_queue a run is overloaded. */
static void test_cnode_process_cancel_queued(void **state) {
    const char *libs[] = {demo_path, NULL};
    node_t *n = *state;
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_opts(n, 1, 1, "process", libs, 1, 0);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    run_long(n, 1, "sleep", FOREVER_MS);
    run_long(n, 2, "echo", 2); /* queued: one worker may be busy */
    run_long(n, 3, "echo", 3);
    expect_done(n, 3, 0, "overloaded");
    send_cancel(n, 2);
    expect_stopped(n, 2);
    send_cancel_reason(n, 1, "killed");
    expect_stopped(n, 1);
    ping(n, 4);
    expect_no_event(n, EV_DONE, 1);
    expect_no_event(n, EV_DONE, 2);
    assert_exited(node_close(n), 0);
}

/* With max_memory, an allocation within it works, and one far past it
 * has exactly one outcome, a failure (the demo's alloc raises "out of
 * memory" when malloc fails; a worker that dies of it is a native
 * crash); the node serves on. */
static void test_cnode_process_max_memory(void **state) {
    const unsigned long long limit = 64ull << 20;
    node_t *n = *state;
    ev_t e;
    const char *text;
    process_start(n, 1, 1, limit);
    run_long(n, 1, "alloc", 4L << 20);
    expect_done(n, 1, 1, "ok");
    run_long(n, 2, "alloc", 1L << 30);
    e = node_wait(n, EV_DONE, 2);
    assert_int_equal(e.ok, 0);
    text = fmt(e.term);
    print_message("   alloc past max_memory: %s\n", text);
    if (strcmp(text, "{native_error,<<\"out of memory\">>}") != 0 &&
        strncmp(text, "{native_crash,", 14) != 0)
        fail_msg("alloc past max_memory gave %s", text);
    ev_free(&e);
    ping(n, 3);
    expect_no_event(n, EV_DONE, 2);
    expect_workers(n, 2);
    assert_exited(node_close(n), 0);
}

/* What a crash costs the next task: with a spare, and without one (the
 * next task then waits for a new worker).  Printed, never asserted
 * (tests do not assert speed). */
static void test_cnode_process_replacement_cost(void **state) {
    ei_x_buff none = args_none();
    node_t *n = *state;
    const int rounds = slow() ? 3 : 20;
    struct timespec t0, t1, t2;
    double crash_us = 0, next_us = 0;
    for (int spares = 1; spares >= 0; spares--) {
        process_start(n, 1, spares, 0);
        crash_us = next_us = 0;
        for (int i = 0; i < rounds; i++) {
            uint64_t tag = 10 + 2 * (uint64_t)i;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            send_run(n, tag, "segfault", &none);
            expect_done(n, tag, 0, SEGFAULT_REASON);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            ping(n, tag + 1);
            clock_gettime(CLOCK_MONOTONIC, &t2);
            crash_us += (t1.tv_sec - t0.tv_sec) * 1e6 +
                        (t1.tv_nsec - t0.tv_nsec) / 1e3;
            next_us += (t2.tv_sec - t1.tv_sec) * 1e6 +
                       (t2.tv_nsec - t1.tv_nsec) / 1e3;
            expect_workers(n, 1 + spares);
        }
        print_message("   spares %d: segfault submit -> its outcome %.0f us, "
                      "-> next echo's outcome %.0f us more (mean of %d)\n",
                      spares, crash_us / rounds, next_us / rounds, rounds);
        assert_exited(node_close(n), 0);
        node_free(n);
    }
    ei_x_free(&none);
}

/* {runs, [{Tag, Task, Args}]} of n runs, tags base.., run i being
 * tasks[i] with args[i] (argument lists without a version byte). */
static void send_runs(node_t *n, uint64_t base, int count,
                      const char *const *tasks, const ei_x_buff *args) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "runs");
    ei_x_encode_list_header(&x, count);
    for (int i = 0; i < count; i++) {
        ei_x_encode_tuple_header(&x, 3);
        ei_x_encode_ulonglong(&x, base + (uint64_t)i);
        ei_x_encode_atom(&x, tasks[i]);
        ei_x_append_buf(&x, args[i].buff, args[i].index);
    }
    ei_x_encode_empty_list(&x);
    node_send_x(n, &x);
}

/* How many log events so far say exactly `line`. */
static int count_logs(node_t *n, const char *line) {
    int c = 0;
    for (size_t i = 0; i < n->nev; i++)
        c += n->ev[i].kind == EV_LOG && strcmp(n->ev[i].msg, line) == 0;
    return c;
}

/* A worker holds several runs at once; when it segfaults, only the run
 * it was running ends {native_crash, sigsegv}: the ones sent behind it
 * run elsewhere, each exactly once (each `say` prints its line once,
 * never twice), and every tag comes back exactly once. */
static void test_cnode_process_crash_requeues_pipelined_runs(void **state) {
    /* Enough that the parent pipelines: it sends a worker several runs
     * only while many wait (procs.c, DEEP_QUEUE). */
    enum { RUNS = 40, CRASH_AT = 5 };
    const char *libs[] = {demo_path, lib_path, NULL};
    const int rounds = slow() ? 3 : 20;
    node_t *n = *state;
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_opts(n, 1, 1000, "process", libs, 1, 0);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    for (int r = 0; r < rounds; r++) {
        const uint64_t base = 1000 * (uint64_t)(r + 1);
        const char *tasks[RUNS];
        ei_x_buff args[RUNS];
        char line[RUNS][32];
        int64_t deadline = now_ms() + WAIT_MS;
        for (int i = 0; i < RUNS; i++) {
            snprintf(line[i], sizeof line[i], "round %d run %d", r, i);
            tasks[i] = i == CRASH_AT ? "segfault" : "say";
            args[i] = i == CRASH_AT ? args_none() : args_binary(line[i]);
        }
        send_runs(n, base, RUNS, tasks, args);
        for (int i = 0; i < RUNS; i++) {
            e = node_wait(n, EV_DONE, base + (uint64_t)i);
            if (i == CRASH_AT) {
                assert_int_equal(e.ok, 0);
                assert_string_equal(fmt(e.term), SEGFAULT_REASON);
            } else if (!e.ok) {
                fail_msg("round %d run %d: %s", r, i, fmt(e.term));
            }
            ev_free(&e);
            ei_x_free(&args[i]);
        }
        /* The lines of runs behind the crash come from a live worker:
         * wait for them.  One before it may be lost with its worker's
         * stderr, but none may come twice. */
        for (int i = CRASH_AT + 1; i < RUNS; i++)
            while (count_logs(n, line[i]) == 0) {
                assert_true(now_ms() < deadline);
                pump(n, 5);
            }
        ping(n, base + RUNS);
        for (int i = 0; i < RUNS; i++)
            if (count_logs(n, line[i]) > 1)
                fail_msg("\"%s\" ran %d times", line[i],
                         count_logs(n, line[i]));
        for (int i = 0; i <= RUNS; i++) {
            expect_no_event(n, EV_DONE, base + (uint64_t)i);
            expect_no_event(n, EV_STOPPED, base + (uint64_t)i);
        }
    }
    expect_workers(n, 2);
    assert_exited(node_close(n), 0);
}

/* Runs 1..RUNS: run 1 is `first` with argument v, the others echo their
 * tag; enough that the parent sends the worker several at once (a deep
 * queue), after a few echoes first, so that it knows the worker answers
 * fast (procs.c, Turns). */
enum { BEHIND_RUNS = 40 };
static void send_behind(node_t *n, const char *first, long v) {
    const char *tasks[BEHIND_RUNS];
    ei_x_buff args[BEHIND_RUNS];
    for (uint64_t t = 200; t < 205; t++)
        ping(n, t);
    for (int i = 0; i < BEHIND_RUNS; i++) {
        tasks[i] = i == 0 ? first : "echo";
        args[i] = args_long(i == 0 ? v : i + 1);
    }
    send_runs(n, 1, BEHIND_RUNS, tasks, args);
    for (int i = 0; i < BEHIND_RUNS; i++)
        ei_x_free(&args[i]);
}

/* The echoes of send_behind, 2..BEHIND_RUNS, each done once with its tag
 * (tag `skip` excepted). */
static void expect_behind(node_t *n, uint64_t skip) {
    for (uint64_t t = 2; t <= BEHIND_RUNS; t++) {
        char want[32];
        if (t == skip)
            continue;
        snprintf(want, sizeof want, "%d", (int)t);
        expect_done(n, t, 1, want);
    }
}

/* A kill (cancel `killed`) of the run a worker is running SIGKILLs that
 * worker; the runs it held behind it had not begun: they complete
 * elsewhere, not {native_crash, sigkill}. */
static void test_cnode_process_kill_of_head_spares_runs_behind(void **state) {
    node_t *n = *state;
    process_start(n, 1, 1, 0);
    send_behind(n, "spin", (long)FOREVER_MS * 1000);
    sleep_ms(50); /* the spin is running: the echoes wait behind it */
    send_cancel_reason(n, 1, "killed");
    expect_stopped(n, 1);
    expect_behind(n, 0);
    ping(n, 100);
    expect_no_event(n, EV_DONE, 1);
    expect_workers(n, 2);
    assert_exited(node_close(n), 0);
}

/* A cancel, even `killed`, of a run still queued inside a worker (behind
 * a running one) does not kill the worker: the run is stopped, never
 * begun, and the same worker serves on. */
static void test_cnode_process_cancel_in_worker_keeps_it(void **state) {
    node_t *n = *state;
    pid_t before[8], after[8];
    process_start(n, 1, 0, 0);
    expect_workers(n, 1);
    assert_int_equal(children(n->pid, before, 8), 1);
    send_behind(n, "sleep", FOREVER_MS);
    sleep_ms(20);
    send_cancel_reason(n, 2, "killed");
    expect_stopped(n, 2);
    send_cancel(n, 1);
    expect_stopped(n, 1);
    expect_behind(n, 2);
    ping(n, 100);
    assert_int_equal(children(n->pid, after, 8), 1);
    assert_int_equal(before[0], after[0]); /* the same worker */
    expect_no_event(n, EV_DONE, 1);
    expect_no_event(n, EV_DONE, 2);
    assert_exited(node_close(n), 0);
}

/* The threads of process `pid` whose name holds `part`. */
static int threads_with(pid_t pid, const char *part) {
    char dir[64];
    DIR *d;
    struct dirent *de;
    int n = 0;

    snprintf(dir, sizeof dir, "/proc/%d/task", (int)pid);
    assert_non_null(d = opendir(dir));
    while ((de = readdir(d)) != NULL) {
        char path[400], comm[32] = "";
        FILE *f;
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "%s/%.256s/comm", dir, de->d_name);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        if (fgets(comm, sizeof comm, f) != NULL && strstr(comm, part))
            n++;
        fclose(f);
    }
    closedir(d);
    return n;
}

/* A sleep cancelled with an echo sent behind it: the sleep stops and
 * the echo answers, whether the worker reads the cancel between tasks
 * or while the sleep runs. */
static void cancel_with_a_run_behind(node_t *n, uint64_t sleep_tag,
                                     uint64_t echo_tag) {
    char want[32];
    run_long(n, sleep_tag, "sleep", FOREVER_MS);
    run_long(n, echo_tag, "echo", (long)echo_tag);
    sleep_ms(20);
    send_cancel(n, sleep_tag);
    expect_stopped(n, sleep_tag);
    snprintf(want, sizeof want, "%ld", (long)echo_tag);
    expect_done(n, echo_tag, 1, want);
}

/* A forked worker runs its tasks on its loop thread: after tasks, a
 * cooperative cancel and a run behind it, it has no pool thread (they
 * are named "<pool>:w<n>"), and it is the same worker throughout. */
static void test_cnode_process_worker_has_no_pool_thread(void **state) {
    node_t *n = *state;
    pid_t before[8], after[8];
    process_start(n, 1, 0, 0);
    expect_workers(n, 1);
    assert_int_equal(children(n->pid, before, 8), 1);
    ping(n, 1);
    cancel_with_a_run_behind(n, 2, 3);
    ping(n, 4);
    assert_int_equal(children(n->pid, after, 8), 1);
    assert_int_equal(before[0], after[0]);
    assert_int_equal(threads_with(after[0], ":w"), 0);
    expect_no_event(n, EV_DONE, 2);
    assert_exited(node_close(n), 0);
}

/* A library that the fork server cannot serve (forker.c): its
 * constructor starts a thread, or handles the cancel signal.  Workers are
 * then spawned, each running its tasks on a pool thread, and serve as
 * forked ones do: echo, a segfault costing only its task, a cancel, the
 * library's own task; and no fork server is left running. */
static void spawned_workers_serve(node_t *n, const char *fixture,
                                  const char *task, const char *want) {
    const char *dir = getenv("MOAT_FIXTURES_DIR");
    char path[1024];
    const char *libs[] = {demo_path, path, NULL};
    ei_x_buff none = args_none();
    pid_t pids[8];
    ev_t e;

    if (dir == NULL)
        fail_msg("set MOAT_FIXTURES_DIR (make test-c does)");
    snprintf(path, sizeof path, "%s/%s.so", dir, fixture);
    node_spawn(n, 1, process_env);
    send_hello_opts(n, 1, 100, "process", libs, 1, 0);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    ping(n, 1);
    send_run(n, 2, task, &none);
    expect_done(n, 2, 1, want);
    send_run(n, 3, "segfault", &none);
    expect_done(n, 3, 0, SEGFAULT_REASON);
    ping(n, 4);
    cancel_with_a_run_behind(n, 5, 6);
    send_run(n, 7, task, &none); /* after the cancel too */
    expect_done(n, 7, 1, want);
    expect_workers(n, 2);
    assert_int_equal(children(n->pid, pids, 8), 2);
    assert_true(threads_with(pids[0], ":w") + threads_with(pids[1], ":w") >=
                1);
    assert_int_equal(children_named(n->pid, "moat_forker", NULL, 0), 0);
    expect_no_event(n, EV_DONE, 5);
    ei_x_free(&none);
    assert_exited(node_close(n), 0);
}

static void test_cnode_process_library_with_a_thread(void **state) {
    spawned_workers_serve(*state, "ctor_thread", "thread_started", "true");
}

/* The library's handler keeps the signal: moat's cancel does not use it
 * in a spawned worker, so the handler has not run, before the cancel or
 * after it. */
static void test_cnode_process_library_handling_the_signal(void **state) {
    spawned_workers_serve(*state, "ctor_signal", "signals_seen", "0");
}

/* What a node costs to start: hello -> ready, and ready -> the first
 * echo's outcome (which waits for a worker to start).  Printed, never
 * asserted. */
static void test_cnode_process_startup_cost(void **state) {
    const char *libs[] = {demo_path, NULL};
    const int rounds = slow() ? 2 : 10;
    node_t *n = *state;
    double ready_us = 0, first_us = 0;
    for (int i = 0; i < rounds; i++) {
        struct timespec t0, t1, t2;
        ev_t e;
        node_spawn(n, 1, process_env);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        send_hello_opts(n, 2, 1000, "process", libs, 1, 0);
        e = node_wait(n, EV_READY, 0);
        ev_free(&e);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ping(n, 1);
        clock_gettime(CLOCK_MONOTONIC, &t2);
        ready_us += (t1.tv_sec - t0.tv_sec) * 1e6 +
                    (t1.tv_nsec - t0.tv_nsec) / 1e3;
        first_us += (t2.tv_sec - t1.tv_sec) * 1e6 +
                    (t2.tv_nsec - t1.tv_nsec) / 1e3;
        assert_exited(node_close(n), 0);
        node_free(n);
    }
    print_message("   hello -> ready %.0f us, ready -> first echo's outcome "
                  "%.0f us more (mean of %d, 2 workers + 1 spare)\n",
                  ready_us / rounds, first_us / rounds, rounds);
}

/* A task that closes the descriptor its worker's frames go out on
 * leaves a worker that can never answer: once its output has ended and
 * it lives on past the grace (procs.c, EOF_GRACE_MS), it is killed and
 * the run ends {native_crash, protocol}; the node serves on. */
static void test_cnode_process_closed_output_kills_the_worker(void **state) {
    const char *libs[] = {demo_path, lib_path, NULL};
    ei_x_buff none = args_none();
    node_t *n = *state;
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_opts(n, 1, 1000, "process", libs, 1, 0);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    send_run(n, 1, "close_frames", &none);
    expect_done(n, 1, 0, "{native_crash,protocol}");
    expect_log(n, "error", "its output ended but it lives on");
    ping(n, 2);
    ei_x_free(&none);
    assert_exited(node_close(n), 0);
}

/* A forked worker that faults says so before it dies (its crash
 * notice): the run's outcome comes while the kernel still tears the
 * worker down (256 MiB of it here, tens of milliseconds), not after its
 * reaping, and the worker is reaped later all the same. */
static void test_cnode_process_fault_answered_before_teardown(void **state) {
    const char *libs[] = {demo_path, lib_path, NULL};
    int64_t deadline = now_ms() + WAIT_MS;
    node_t *n = *state;
    pid_t pid;
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_opts(n, 1, 1000, "process", libs, 0, 0);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    expect_workers(n, 1);
    assert_int_equal(children(n->pid, &pid, 1), 1);
    run_long(n, 1, "fault_big", 256);
    expect_done(n, 1, 0, "{native_crash,sigsegv}");
    /* Not reaped yet: its pid is still its own (alive, or a zombie). */
    assert_int_equal(kill(pid, 0), 0);
    while (kill(pid, 0) == 0) {
        if (now_ms() >= deadline)
            fail_msg("worker %d was never reaped", (int)pid);
        pump(n, 5);
    }
    ping(n, 2);
    expect_no_event(n, EV_LOG, 0); /* no kill for overstaying */
    assert_exited(node_close(n), 0);
}

/* stdin's end ends the parent with status 0, and no worker outlives it,
 * not even one running a spin. */
static void test_cnode_process_eof_ends_every_worker(void **state) {
    node_t *n = *state;
    pid_t pids[16];
    int np;
    process_start(n, 2, 1, 0);
    run_long(n, 1, "spin", (long)FOREVER_MS * 1000);
    run_long(n, 2, "sleep", FOREVER_MS);
    sleep_ms(20);
    expect_workers(n, 3);
    np = children(n->pid, pids, 16);
    assert_int_equal(np, 3);
    assert_exited(node_close(n), 0);
    expect_gone(pids, np);
    expect_no_event(n, EV_DONE, 1);
}

/* {hello, #{size, spares, libraries, isolation => process, name,
 * max_restarts, max_seconds => 60}}; libs ends with NULL. */
static void send_hello_restarts(node_t *n, long size, long spares,
                                const char *const *libs, long max_restarts) {
    ei_x_buff x;
    int nlibs = 0;

    while (libs[nlibs] != NULL)
        nlibs++;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "hello");
    ei_x_encode_map_header(&x, 7);
    ei_x_encode_atom(&x, "size");
    ei_x_encode_long(&x, size);
    ei_x_encode_atom(&x, "spares");
    ei_x_encode_long(&x, spares);
    ei_x_encode_atom(&x, "libraries");
    ei_x_encode_list_header(&x, nlibs);
    for (int i = 0; i < nlibs; i++)
        ei_x_encode_binary(&x, libs[i], (long)strlen(libs[i]));
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "isolation");
    ei_x_encode_atom(&x, "process");
    ei_x_encode_atom(&x, "name");
    ei_x_encode_atom(&x, "test");
    ei_x_encode_atom(&x, "max_restarts");
    ei_x_encode_long(&x, max_restarts);
    ei_x_encode_atom(&x, "max_seconds");
    ei_x_encode_long(&x, 60);
    node_send_x(n, &x);
}

/* Whether process pid is alive: not gone, and not a zombie (the
 * workers of a killed node are reaped by whoever inherits them). */
static int os_alive(pid_t pid) {
    char path[64], buf[512], *rp, state;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return 0;
    buf[0] = '\0';
    if (fgets(buf, sizeof buf, f) == NULL)
        buf[0] = '\0';
    fclose(f);
    rp = strrchr(buf, ')');
    return rp != NULL && sscanf(rp + 1, " %c", &state) == 1 && state != 'Z';
}

/* Waits until the node has `want` fork servers (procs.c, forker.c) and
 * returns the pid of the first. */
static pid_t expect_forker(node_t *n, int want) {
    int64_t deadline = now_ms() + WAIT_MS;
    pid_t pid[4] = {0};
    int got;

    while ((got = children_named(n->pid, "moat_forker", pid, 4)) != want) {
        if (now_ms() >= deadline)
            fail_msg("%d fork servers, not %d", got, want);
        pump(n, 5);
    }
    return pid[0];
}

/* Starts a node in process isolation, one worker, `spares` spares and
 * max_restarts in 60 s, and returns its fork server's pid. */
static pid_t forker_start(node_t *n, long spares, long max_restarts) {
    const char *libs[] = {demo_path, NULL};
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_restarts(n, 1, spares, libs, max_restarts);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    return expect_forker(n, 1);
}

/* Workers are forked by the fork server yet are the parent's own
 * children, reaped with the signal they died of; when the fork server
 * dies, workers are still made (and a new server started), and a death
 * without a request in flight does not count toward the intensity (the
 * hello allows none). */
static void test_cnode_process_forker_death_keeps_workers_coming(
    void **state) {
    ei_x_buff none = args_none();
    node_t *n = *state;
    pid_t zygote = forker_start(n, 1, 0), again;
    expect_workers(n, 2);
    send_run(n, 1, "segfault", &none);
    expect_done(n, 1, 0, SEGFAULT_REASON);
    expect_workers(n, 2);
    assert_int_equal(kill(zygote, SIGKILL), 0);
    while (os_alive(zygote)) /* its socket closed: no request is lost */
        sleep_ms(1);
    for (uint64_t tag = 2; tag < 8; tag += 2) {
        send_run(n, tag, "segfault", &none);
        expect_done(n, tag, 0, SEGFAULT_REASON);
        ping(n, tag + 1);
    }
    expect_workers(n, 2);
    again = expect_forker(n, 1);
    assert_int_not_equal(again, zygote);
    expect_no_event(n, EV_DONE, 1);
    assert_exited(node_close(n), 0);
    ei_x_free(&none);
}

/* A fork server that stops answering (stopped here) is killed once a
 * request has waited 5 s for it (forker.c, ANSWER_MS): the request counts
 * as a failed spawn, a new server is started and the worker it was for
 * is made after all. */
static void test_cnode_process_stuck_forker_is_replaced(void **state) {
    ei_x_buff none = args_none();
    node_t *n = *state;
    pid_t zygote = forker_start(n, 0, 10), again;
    expect_workers(n, 1);
    assert_int_equal(kill(zygote, SIGSTOP), 0);
    send_run(n, 1, "segfault", &none);
    expect_done(n, 1, 0, SEGFAULT_REASON);
    ping(n, 2); /* waits for a worker */
    again = expect_forker(n, 1);
    assert_int_not_equal(again, zygote);
    expect_workers(n, 1);
    assert_exited(node_close(n), 0);
    ei_x_free(&none);
}

/* A worker that holds only a cancelled run (a spin that ignores its
 * cancel) is abandoned work, not one of the `size` busy ones: a short run
 * sent after it goes to the spare, not behind a long task (the
 * stream_element_not_held_back flake of moat_task_SUITE). */
static void test_cnode_process_cancelled_run_frees_its_slot(void **state) {
    enum { RUNS = 42 };
    const char *tasks[RUNS];
    ei_x_buff args[RUNS];
    node_t *n = *state;
    process_start(n, 2, 1, 0);
    expect_workers(n, 3);
    run_long(n, 1, "spin", (long)FOREVER_MS * 1000);
    sleep_ms(20);
    send_cancel(n, 1); /* forwarded; a spin never stops */
    for (int i = 0; i < RUNS; i++) {
        tasks[i] = i == 1 ? "echo" : "sleep";
        args[i] = i == 1 ? args_long(7) : args_long(FOREVER_MS);
    }
    send_runs(n, 10, RUNS, tasks, args);
    expect_done(n, 11, 1, "7");
    for (int i = 0; i < RUNS; i++)
        ei_x_free(&args[i]);
    expect_no_event(n, EV_STOPPED, 1);
    assert_exited(node_close(n), 0);
}

/* A node killed outright (as with the VM) leaves no worker and no fork
 * server: each has its parent-death signal. */
static void test_cnode_process_sigkill_leaves_nothing(void **state) {
    node_t *n = *state;
    pid_t pids[16];
    int np;
    process_start(n, 2, 1, 0);
    run_long(n, 1, "spin", (long)FOREVER_MS * 1000);
    expect_forker(n, 1);
    expect_workers(n, 3);
    np = children_named(n->pid, NULL, pids, 16);
    assert_int_equal(np, 4);
    assert_int_equal(kill(n->pid, SIGKILL), 0);
    node_reap(n);
    for (int i = 0; i < np; i++) {
        int64_t deadline = now_ms() + WAIT_MS;
        while (os_alive(pids[i])) {
            if (now_ms() >= deadline)
                fail_msg("process %d outlived the node", (int)pids[i]);
            sleep_ms(5);
        }
    }
}

/* ------------------------------------------------------ native servers */

/* One server of a hello: {{s, Index}, Lib, Server, Args, permanent, 5000},
 * Args [Initial] or, with a terminate delay, [Initial, DelayMs]; a
 * `bad' server gets [bad] and fails its init with badarg. */
typedef struct {
    const char *server;
    long initial;
    long delay;  /* > 0: the counter's terminate takes this long */
    int bad;
    long lib;    /* 0: the demo library, 1: cnode_lib */
} srv_t;

/* {hello, #{size => 2, libraries => [demo, cnode_lib], isolation, name, servers,
 * strategy, max_restarts, max_seconds => 60}}. */
static void send_hello_servers(node_t *n, const char *isolation,
                               const srv_t *s, int ns, const char *strategy,
                               long max_restarts) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "hello");
    ei_x_encode_map_header(&x, 8);
    ei_x_encode_atom(&x, "servers");
    ei_x_encode_list_header(&x, ns);
    for (int i = 0; i < ns; i++) {
        ei_x_encode_tuple_header(&x, 6);
        ei_x_encode_tuple_header(&x, 2);
        ei_x_encode_atom(&x, "s");
        ei_x_encode_long(&x, i);
        ei_x_encode_long(&x, s[i].lib);
        ei_x_encode_atom(&x, s[i].server);
        ei_x_encode_list_header(&x, s[i].delay > 0 ? 2 : 1);
        if (s[i].bad)
            ei_x_encode_atom(&x, "bad");
        else
            ei_x_encode_long(&x, s[i].initial);
        if (s[i].delay > 0)
            ei_x_encode_long(&x, s[i].delay);
        ei_x_encode_empty_list(&x);
        ei_x_encode_atom(&x, "permanent");
        ei_x_encode_long(&x, 5000);
    }
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "strategy");
    ei_x_encode_atom(&x, strategy);
    ei_x_encode_atom(&x, "max_restarts");
    ei_x_encode_long(&x, max_restarts);
    ei_x_encode_atom(&x, "max_seconds");
    ei_x_encode_long(&x, 60);
    ei_x_encode_atom(&x, "size");
    ei_x_encode_long(&x, 2);
    ei_x_encode_atom(&x, "libraries");
    ei_x_encode_list_header(&x, 2);
    ei_x_encode_binary(&x, demo_path, (long)strlen(demo_path));
    ei_x_encode_binary(&x, lib_path, (long)strlen(lib_path));
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "isolation");
    ei_x_encode_atom(&x, isolation);
    ei_x_encode_atom(&x, "name");
    ei_x_encode_atom(&x, "srv");
    node_send_x(n, &x);
}

/* Sends `text' as the request's encoding: an atom, or {add, N}. */
static void encode_request(ei_x_buff *x, const char *req, long n) {
    if (strcmp(req, "add") == 0 || strcmp(req, "sleep") == 0) {
        ei_x_encode_tuple_header(x, 2);
        ei_x_encode_atom(x, req);
        ei_x_encode_long(x, n);
    } else {
        ei_x_encode_atom(x, req);
    }
}

/* {call, Tag, Child, Request} */
static void send_call(node_t *n, uint64_t tag, long child, const char *req,
                      long v) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 4);
    ei_x_encode_atom(&x, "call");
    ei_x_encode_ulonglong(&x, tag);
    ei_x_encode_long(&x, child);
    encode_request(&x, req, v);
    node_send_x(n, &x);
}

/* {cast, Child, Request} */
static void send_cast(node_t *n, long child, const char *req, long v) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_atom(&x, "cast");
    ei_x_encode_long(&x, child);
    encode_request(&x, req, v);
    node_send_x(n, &x);
}

/* {Kind, Tag} or, with tag 0 and no_tag, {Kind}. */
static void send_kind(node_t *n, const char *kind, uint64_t tag,
                      int no_tag) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, no_tag ? 1 : 2);
    ei_x_encode_atom(&x, kind);
    if (!no_tag)
        ei_x_encode_ulonglong(&x, tag);
    node_send_x(n, &x);
}

/* Waits for the next report frame of this kind; checks its text. */
static void expect_report(node_t *n, const char *kind, const char *text) {
    int64_t deadline = now_ms() + WAIT_MS;
    for (;;) {
        for (size_t i = 0; i < n->nev; i++)
            if (n->ev[i].kind == EV_REPORT &&
                strcmp(n->ev[i].level, kind) == 0) {
                ev_t e = ev_take(n, i);
                assert_string_equal(fmt(e.term), text);
                ev_free(&e);
                return;
            }
        assert_false(n->eof);
        assert_true(now_ms() < deadline);
        pump(n, (int)(deadline - now_ms()));
    }
}

/* Calls get until the server at `child' answers (it may be restarting);
 * returns the count. */
static long wait_get(node_t *n, uint64_t *tag, long child) {
    int64_t deadline = now_ms() + WAIT_MS;
    for (;;) {
        ev_t e;
        long v;
        int i = 1;
        send_call(n, ++*tag, child, "get", 0);
        e = node_wait(n, EV_DONE, *tag);
        if (e.ok) {
            assert_int_equal(ei_decode_long(e.term, &i, &v), 0);
            ev_free(&e);
            return v;
        }
        assert_string_equal(fmt(e.term), "noproc");
        ev_free(&e);
        assert_true(now_ms() < deadline);
        sleep_ms(2);
    }
}

/* Starts a node with these servers: in thread isolation, or in process
 * isolation, where they run in a worker of their own (srvworker.c). */
static void servers_start(node_t *n, const char *isolation, const srv_t *s,
                          int ns, const char *strategy, long max_restarts) {
    ev_t e;
    node_spawn(n, 1, strcmp(isolation, "process") == 0 ? process_env : NULL);
    send_hello_servers(n, isolation, s, ns, strategy, max_restarts);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
}

/* Servers start before ready and keep their state across calls and
 * casts; a crash is the caller's outcome and the server comes back from
 * its initial state, with a restarts and a crashed report; an index that
 * names no server, and a malformed call, are answered; a call cancelled
 * while the server handles it comes back stopped, and the server serves
 * on; which_children and count_children answer in start order;
 * stop_servers stops them (calls are then noproc) and is answered, each
 * time.  The same in both isolations. */
static void servers_calls_and_children(node_t *n, const char *isolation) {
    const srv_t s[] = {{"counter", 0, 0, 0, 0}, {"counter", 10, 0, 0, 0}};
    uint64_t tag = 100;
    ei_x_buff x;
    servers_start(n, isolation, s, 2, "one_for_one", 10);
    send_call(n, 1, 0, "add", 5);
    expect_done(n, 1, 1, "5");
    send_cast(n, 0, "add", 10);
    send_call(n, 2, 0, "get", 0);
    expect_done(n, 2, 1, "15");
    send_call(n, 3, 1, "get", 0);
    expect_done(n, 3, 1, "10");
    send_kind(n, "which_children", 4, 0);
    expect_done(n, 4, 1, "[{{s,0},running,worker},{{s,1},running,worker}]");
    send_kind(n, "count_children", 5, 0);
    expect_done(n, 5, 1,
                "#{specs=>2,active=>2,supervisors=>0,workers=>2}");
    /* no such server, and casts to it dropped */
    send_call(n, 6, 2, "get", 0);
    expect_done(n, 6, 0, "noproc");
    send_cast(n, 7, "add", 1);
    /* a malformed call with a readable tag: badarg, and a log */
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_atom(&x, "call");
    ei_x_encode_ulonglong(&x, 8);
    ei_x_encode_long(&x, 0);
    node_send_x(n, &x);
    expect_done(n, 8, 0, "badarg");
    expect_log(n, "error", "malformed call frame");
    /* a crash */
    send_call(n, 9, 1, "crash", 0);
    expect_done(n, 9, 0, "{native_error,<<\"crash\">>}");
    expect_report(n, "crashed", "{crashed,1,{s,1},{native_error,<<\"crash\">>}}");
    expect_report(n, "restarts", "{restarts,1}");
    assert_int_equal(wait_get(n, &tag, 1), 10);
    send_call(n, ++tag, 0, "get", 0);
    expect_done(n, tag, 1, "15");
    /* a call cancelled while it is handled */
    send_call(n, 10, 0, "sleep", 300);
    sleep_ms(50);
    send_cancel_reason(n, 10, "timeout");
    expect_stopped(n, 10);
    send_call(n, 11, 0, "add", 1);
    expect_done(n, 11, 1, "16");
    expect_no_event(n, EV_DONE, 10);
    /* stop_servers, then nothing is running */
    send_kind(n, "stop_servers", 0, 1);
    expect_report(n, "servers_stopped", "{servers_stopped}");
    send_call(n, 12, 0, "get", 0);
    expect_done(n, 12, 0, "noproc");
    send_kind(n, "stop_servers", 0, 1);
    expect_report(n, "servers_stopped", "{servers_stopped}");
    assert_exited(node_close(n), 0);
}

static void test_cnode_servers_calls_and_children(void **state) {
    servers_calls_and_children(*state, "thread");
}

static void test_cnode_process_servers_calls_and_children(void **state) {
    servers_calls_and_children(*state, "process");
}

/* A server that fails to start fails hello with OTP's reason, after the
 * ones started are stopped; so does a server its library lacks; in both
 * isolations.  Each exits with status 2, leaving no process behind. */
static void test_cnode_servers_failed_start(void **state) {
    const srv_t bad[] = {{"counter", 0, 0, 0, 0}, {"counter", 0, 0, 1, 0}};
    const srv_t unknown[] = {{"counter", 0, 0, 0, 0}, {"nope", 0, 0, 0, 0}};
    const struct {
        const srv_t *s;
        const char *isolation, *want;
    } cases[] = {
        {bad, "thread",
         "{error,{shutdown,{failed_to_start_child,{s,1},badarg}}}"},
        {unknown, "thread",
         "{error,{shutdown,{failed_to_start_child,{s,1},"
         "{unknown_server,nope}}}}"},
        {bad, "process",
         "{error,{shutdown,{failed_to_start_child,{s,1},badarg}}}"},
        {unknown, "process",
         "{error,{shutdown,{failed_to_start_child,{s,1},"
         "{unknown_server,nope}}}}"},
    };
    node_t *n = *state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ev_t e;
        node_spawn(n, 1, NULL);
        send_hello_servers(n, cases[i].isolation, cases[i].s, 2,
                           "one_for_one", 3);
        pid_t pids[16];
        int np;
        e = node_wait(n, EV_ERROR, 0);
        assert_string_equal(fmt(e.term), cases[i].want);
        ev_free(&e);
        np = children(n->pid, pids, 16);
        assert_exited(node_reap(n), 2);
        expect_gone(pids, np < 16 ? np : 16);
        node_free(n);
    }
}

/* Past its intensity the supervisor gives up: a gave_up report, every
 * server restarting, calls noproc; stop_servers is still answered.  The
 * same in both isolations. */
static void servers_give_up(node_t *n, const char *isolation) {
    const srv_t s[] = {{"counter", 0, 0, 0, 0}, {"counter", 10, 0, 0, 0}};
    servers_start(n, isolation, s, 2, "one_for_all", 0);
    send_call(n, 1, 0, "crash", 0);
    expect_done(n, 1, 0, "{native_error,<<\"crash\">>}");
    expect_report(n, "gave_up", "{gave_up,shutdown}");
    send_kind(n, "which_children", 2, 0);
    expect_done(n, 2, 1,
                "[{{s,0},restarting,worker},{{s,1},restarting,worker}]");
    send_kind(n, "count_children", 3, 0);
    expect_done(n, 3, 1,
                "#{specs=>2,active=>0,supervisors=>0,workers=>2}");
    send_call(n, 4, 1, "get", 0);
    expect_done(n, 4, 0, "noproc");
    send_kind(n, "stop_servers", 0, 1);
    expect_report(n, "servers_stopped", "{servers_stopped}");
    assert_exited(node_close(n), 0);
}

static void test_cnode_servers_give_up(void **state) {
    servers_give_up(*state, "thread");
}

static void test_cnode_process_servers_give_up(void **state) {
    servers_give_up(*state, "process");
}

/* Process isolation: a server that closes the descriptor its worker's
 * frames go out on leaves a worker that can never answer; once its
 * output has ended and it lives on past the grace (srvworker.c), it is
 * killed: its calls end {native_crash, protocol} and the VM is told the
 * supervisor gave up. */
static void test_cnode_process_servers_closed_output(void **state) {
    const srv_t s[] = {{"closer", 0, 0, 0, 1}};
    node_t *n = *state;
    servers_start(n, "process", s, 1, "one_for_one", 10);
    send_call(n, 1, 0, "get", 0);
    expect_done(n, 1, 0, "{native_crash,protocol}");
    expect_report(n, "gave_up", "{gave_up,{native_crash,protocol}}");
    expect_log(n, "error", "lives on after its output ended");
    assert_exited(node_close(n), 0);
}

/* Process isolation answers hello once its servers' worker has started
 * the servers: a second hello sent before that is logged and ignored,
 * not served twice, and ready comes once. */
static void test_cnode_process_servers_second_hello(void **state) {
    const srv_t s[] = {{"counter", 0, 0, 0, 0}};
    node_t *n = *state;
    ev_t e;
    node_spawn(n, 1, process_env);
    send_hello_servers(n, "process", s, 1, "one_for_one", 10);
    send_hello_servers(n, "process", s, 1, "one_for_one", 10);
    e = node_wait(n, EV_READY, 0);
    ev_free(&e);
    expect_log(n, "error", "a second hello frame was ignored");
    send_call(n, 1, 0, "add", 2);
    expect_done(n, 1, 1, "2");
    expect_no_event(n, EV_READY, 0);
    expect_workers(n, 4); /* 2 + 1 spare + the servers' worker, once */
    assert_exited(node_close(n), 0);
}

/* Process isolation: a task's hard fault leaves the servers as they are,
 * in their worker (size 2 + 1 spare + the servers' worker are the
 * parent's children).  A server's hard fault ends the servers' worker:
 * the calls it held end with the crash, the VM is told the supervisor
 * gave up with it, and later calls and queries are noproc, stop_servers
 * answered at once; the tasks carry on.  No process outlives stdin's
 * end. */
static void test_cnode_process_servers_fault(void **state) {
    const srv_t s[] = {{"counter", 0, 0, 0, 0}, {"counter", 10, 0, 0, 0}};
    ei_x_buff none = args_none();
    node_t *n = *state;
    pid_t pids[16];
    int np;
    servers_start(n, "process", s, 2, "one_for_one", 10);
    expect_workers(n, 4);
    send_call(n, 1, 0, "add", 5);
    expect_done(n, 1, 1, "5");
    send_run(n, 2, "segfault", &none);
    expect_done(n, 2, 0, SEGFAULT_REASON);
    send_call(n, 3, 0, "get", 0);
    expect_done(n, 3, 1, "5");
    expect_no_event(n, EV_REPORT, 0);
    /* one call in flight (held by the parent from the moment it is
     * forwarded, begun or not), then the server's own segfault */
    send_call(n, 4, 1, "sleep", FOREVER_MS);
    send_call(n, 5, 0, "segfault", 0);
    expect_done(n, 5, 0, SEGFAULT_REASON);
    expect_done(n, 4, 0, SEGFAULT_REASON);
    expect_report(n, "gave_up", "{gave_up," SEGFAULT_REASON "}");
    send_call(n, 6, 1, "get", 0);
    expect_done(n, 6, 0, "noproc");
    send_kind(n, "which_children", 7, 0);
    expect_done(n, 7, 0, "noproc");
    send_kind(n, "stop_servers", 0, 1);
    expect_report(n, "servers_stopped", "{servers_stopped}");
    ping(n, 8);
    ei_x_free(&none);
    expect_workers(n, 3); /* the segfault's replacement may still be on
                           * its way from the fork server */
    np = children(n->pid, pids, 16);
    assert_int_equal(np, 3);
    assert_exited(node_close(n), 0);
    expect_gone(pids, np);
}

int main(void) {
    const struct CMUnitTest shared_tests[] = {
        cmocka_unit_test(test_cnode_ready_lists_every_task),
        cmocka_unit_test(test_cnode_echo_returns_its_argument),
        cmocka_unit_test(test_cnode_failures_are_exit_outcomes),
        cmocka_unit_test(test_cnode_unknown_task),
        cmocka_unit_test(test_cnode_runs_batch_answers_each_tag_once),
        cmocka_unit_test(test_cnode_outcomes_after_the_loop_stops_polling),
        cmocka_unit_test(test_cnode_cancel_gives_stopped_not_done),
        cmocka_unit_test(test_cnode_cancel_of_spin_waits_for_the_body),
        cmocka_unit_test(test_cnode_task_output_reaches_the_vm_as_logs),
        cmocka_unit_test(test_cnode_malformed_frames_are_logged),
    };
    const struct CMUnitTest process_tests[] = {
        cmocka_unit_test_setup_teardown(test_cnode_process_ready, own_setup,
                                        own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_echo, own_setup,
                                        own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_segfault_ends_only_its_task,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_abort_is_sigabrt,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_every_tenth_crashes,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_cancel_killed_kills,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_cancel_shutdown_of_sleep,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_cancel_queued,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_max_memory,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_replacement_cost,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_closed_output_kills_the_worker,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(
            test_cnode_process_fault_answered_before_teardown, own_setup,
            own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_eof_ends_every_worker,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(
            test_cnode_process_forker_death_keeps_workers_coming, own_setup,
            own_teardown),
        cmocka_unit_test_setup_teardown(
            test_cnode_process_sigkill_leaves_nothing, own_setup,
            own_teardown),
        cmocka_unit_test_setup_teardown(
            test_cnode_process_stuck_forker_is_replaced, own_setup,
            own_teardown),
        cmocka_unit_test_setup_teardown(
            test_cnode_process_cancelled_run_frees_its_slot, own_setup,
            own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_crash_requeues_pipelined_runs,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_kill_of_head_spares_runs_behind,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_cancel_in_worker_keeps_it,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_worker_has_no_pool_thread,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_library_with_a_thread,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(
            test_cnode_process_library_handling_the_signal, own_setup,
            own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_startup_cost,
                                        own_setup, own_teardown),
    };
    const struct CMUnitTest own_tests[] = {
        cmocka_unit_test_setup_teardown(test_cnode_overloaded, own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_frame_before_hello_is_bad_hello, own_setup,
                                        own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_bad_library, own_setup,
                                        own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_eof_exits_0_with_a_spin_running, own_setup,
                                        own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_segfault_kills_the_node, own_setup,
                                        own_teardown),
    };
    const struct CMUnitTest server_tests[] = {
        cmocka_unit_test_setup_teardown(test_cnode_servers_calls_and_children,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_servers_failed_start,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_servers_give_up,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_servers_calls_and_children,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_servers_give_up,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_servers_fault,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_servers_second_hello,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_cnode_process_servers_closed_output,
                                        own_setup, own_teardown),
    };
    int failed;

    if (cnode_test_init("test_cnode") != 0)
        return 1;
    if (getenv("MOAT_TEST_FILTER") != NULL) /* by hand: one test, say */
        cmocka_set_test_filter(getenv("MOAT_TEST_FILTER"));
    ei_init();
    failed = cmocka_run_group_tests_name("cnode (one shared node)",
                                         shared_tests, shared_setup,
                                         shared_teardown);
    failed += cmocka_run_group_tests_name("cnode (a node each)", own_tests,
                                          NULL, NULL);
    failed += cmocka_run_group_tests_name("cnode (process isolation)",
                                          process_tests, NULL, NULL);
    failed += cmocka_run_group_tests_name("cnode (native servers)",
                                          server_tests, NULL, NULL);
    return failed;
}
