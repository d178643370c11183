/*
 * test_dist.c: moat_cnode driven over real distribution, with ei itself
 * playing the VM (doc/cnode.md; c_src/cnode/dist.c).
 *
 * This binary is a hidden node of its own, moat_tdist_<pid>@<host>.  Each
 * test starts the executable named by MOAT_CNODE (the variant's build)
 * with MOAT_NODE and MOAT_COOKIE in its environment, a pipe on its stdin
 * (the lifeline) and one on its stdout (the "moat_cnode listening" line,
 * and what tasks print), waits for that line, connects to it with
 * ei_connect, and speaks the port protocol's frames as binaries: hello to
 * the registered name `moat`, the others to the node's pid or to `moat`.
 * Every frame comes back as {moat_cnode, CPid, FrameBinary}.  Libraries:
 * the demo (MOAT_DEMO_SO) and cnode_lib.c (MOAT_CNODE_LIB).  Under
 * MOAT_CNODE_RUNNER (the valgrind stage's valgrind command) the node runs
 * under it, so its leaks and errors fail its exit status.
 *
 * The first group shares one session, started by the group's setup; its
 * last test closes the connection and expects exit status 0.  The other
 * tests each start their own node, for an ending of their own; the last
 * one starts a server (--serve), which has no stdout line to wait for:
 * it is connected to until it answers.  epmd is started once if it is
 * not running.  Every wait is bounded, so that a node that hangs fails a
 * test instead of blocking the run.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
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
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <ei.h>

#include "cnode_test.h"

extern char **environ;

/* Generous bounds for the slowest runs (valgrind on both ends): the tests
 * wait for events and only fail when one never comes. */
#define WAIT_MS 60000

/* Tasks in the runs frame. */
#define BATCH 1000

/* Long enough that no test outlives it by accident. */
#define FOREVER_MS 120000

/* What a serving node that is between two sessions gets per attempt: it
 * refuses connections, or accepts one and closes it, while its next
 * session starts. */
#define RETRY_MS 5000

/* The distribution protocol's pass-through byte and the control message
 * of an exit signal (ERTS User's Guide, "Distribution Protocol"). */
#define PASS_THROUGH 112
#define CTRL_EXIT 3
#define CTRL_REG_SEND 6
#define CTRL_MONITOR_P 19
#define CTRL_UNLINK_ID 35
#define CTRL_UNLINK_ID_ACK 36


static ei_cnode self;    /* this test: the "VM" */
static char cookie[64];
static int nodes_made;   /* makes each C-node's name unique */

/* ------------------------------------------------------------- helpers */

/* Milliseconds left until `deadline`, at least 1 (ei takes 0 for
 * "no timeout"). */
static unsigned left(int64_t deadline) {
    int64_t l = deadline - now_ms();
    return l < 1 ? 1 : (unsigned)l;
}

static int pid_eq(const erlang_pid *a, const erlang_pid *b) {
    return a->num == b->num && a->serial == b->serial &&
           a->creation == b->creation && strcmp(a->node, b->node) == 0;
}

/* Writes the term at *i as Erlang would, compactly: {a,<<"b">>,[1,2]}. */
static void show_at(const char *b, int *i, char *o, size_t cap, size_t *n) {
    int type, size, arity;
    long long v;
    unsigned long long u;

    assert_int_equal(ei_get_type(b, i, &type, &size), 0);
    switch (type) {
    case ERL_SMALL_INTEGER_EXT:
    case ERL_INTEGER_EXT:
    case ERL_SMALL_BIG_EXT:
    case ERL_LARGE_BIG_EXT:
        if (ei_decode_longlong(b, &(int){*i}, &v) == 0) {
            assert_int_equal(ei_decode_longlong(b, i, &v), 0);
            put(o, cap, n, "%lld", v);
        } else {
            assert_int_equal(ei_decode_ulonglong(b, i, &u), 0);
            put(o, cap, n, "%llu", u);
        }
        break;
    case ERL_ATOM_EXT:
    case ERL_SMALL_ATOM_EXT:
    case ERL_ATOM_UTF8_EXT:
    case ERL_SMALL_ATOM_UTF8_EXT: {
        char a[MAXATOMLEN_UTF8];
        assert_int_equal(ei_decode_atom(b, i, a), 0);
        put(o, cap, n, "%s", a);
        break;
    }
    case ERL_BINARY_EXT: {
        unsigned char *bin = malloc((size_t)size + 1);
        long len;
        int text = 1;
        assert_non_null(bin);
        assert_int_equal(ei_decode_binary(b, i, bin, &len), 0);
        for (long k = 0; k < len; k++)
            text &= bin[k] >= 0x20 && bin[k] < 0x7f && bin[k] != '"';
        put(o, cap, n, "<<");
        if (text)
            put(o, cap, n, "\"%.*s\"", (int)len, (char *)bin);
        else
            for (long k = 0; k < len; k++)
                put(o, cap, n, "%s%u", k > 0 ? "," : "", bin[k]);
        put(o, cap, n, ">>");
        free(bin);
        break;
    }
    case ERL_STRING_EXT: {
        char *s = malloc((size_t)size + 1);
        assert_non_null(s);
        assert_int_equal(ei_decode_string(b, i, s), 0);
        put(o, cap, n, "\"%s\"", s);
        free(s);
        break;
    }
    case ERL_NIL_EXT:
        assert_int_equal(ei_decode_list_header(b, i, &arity), 0);
        put(o, cap, n, "[]");
        break;
    case ERL_LIST_EXT:
        assert_int_equal(ei_decode_list_header(b, i, &arity), 0);
        put(o, cap, n, "[");
        for (int k = 0; k < arity; k++) {
            put(o, cap, n, "%s", k > 0 ? "," : "");
            show_at(b, i, o, cap, n);
        }
        assert_int_equal(ei_get_type(b, i, &type, &size), 0);
        if (type != ERL_NIL_EXT) {
            put(o, cap, n, "|");
            show_at(b, i, o, cap, n);
        } else {
            assert_int_equal(ei_decode_list_header(b, i, &arity), 0);
        }
        put(o, cap, n, "]");
        break;
    case ERL_SMALL_TUPLE_EXT:
    case ERL_LARGE_TUPLE_EXT:
        assert_int_equal(ei_decode_tuple_header(b, i, &arity), 0);
        put(o, cap, n, "{");
        for (int k = 0; k < arity; k++) {
            put(o, cap, n, "%s", k > 0 ? "," : "");
            show_at(b, i, o, cap, n);
        }
        put(o, cap, n, "}");
        break;
    case ERL_PID_EXT:
    case ERL_NEW_PID_EXT: {
        erlang_pid p;
        assert_int_equal(ei_decode_pid(b, i, &p), 0);
        put(o, cap, n, "<%s.%u.%u>", p.node, p.num, p.serial);
        break;
    }
    default:
        fail_msg("unexpected term type %d", type);
    }
}

/* The text of a term that starts with its version byte; a few rotating
 * buffers, so that one assertion can show two. */
static const char *show(const char *etf) {
    static char bufs[4][4096];
    static int next;
    char *o = bufs[next++ % 4];
    size_t n = 0;
    int i = 0, version;

    o[0] = '\0';
    assert_int_equal(ei_decode_version(etf, &i, &version), 0);
    show_at(etf, &i, o, sizeof bufs[0], &n);
    return o;
}

/* --------------------------------------------------------------- events */

/* EV_OTHER: a message that is not {moat_cnode, CPid, Frame} (echoes). */
enum { EV_READY, EV_ERROR, EV_DONE, EV_STOPPED, EV_LOG, EV_OTHER };

typedef struct {
    int kind;
    erlang_pid to;  /* whom the message was for */
    uint64_t tag;   /* done, stopped */
    int ok;         /* done: ok rather than exit */
    char *term;     /* done: the outcome; ready, error: the frame; other:
                       the message; each with its version byte */
    size_t len;     /* of term */
    char level[16]; /* log */
    char *msg;      /* log, NUL-terminated */
} ev_t;

typedef struct {
    pid_t pid;
    int in;               /* its stdin, ours to write and close, or -1 */
    int out;              /* its stdout, or -1 */
    int fd;               /* the connection, or -1 */
    char name[MAXNODELEN + 1];
    erlang_pid cpid;      /* its pid, from its first frame */
    int has_cpid;
    int closed;           /* the connection was closed under us */
    char *line;           /* its stdout, not yet taken as lines */
    size_t llen, lcap;
    ev_t *ev;
    size_t nev, capev;
    size_t ndone_frames;
    ei_x_buff rx;
    int reaped, status;
} dnode_t;

static void ev_free(ev_t *e) {
    free(e->term);
    free(e->msg);
}

static void ev_push(dnode_t *n, ev_t e) {
    if (n->nev == n->capev) {
        n->capev = n->capev > 0 ? 2 * n->capev : 64;
        n->ev = realloc(n->ev, n->capev * sizeof *n->ev);
        assert_non_null(n->ev);
    }
    n->ev[n->nev++] = e;
}

/* buf[start..end) with a version byte before it. */
static char *versioned(const char *buf, int start, int end, size_t *len) {
    char *t = malloc((size_t)(end - start) + 1);
    assert_non_null(t);
    t[0] = (char)131;
    memcpy(t + 1, buf + start, (size_t)(end - start));
    *len = (size_t)(end - start) + 1;
    return t;
}

/* Turns one frame into events; anything that is not a frame of the
 * protocol fails the test. */
static void parse_frame(dnode_t *n, const erlang_pid *to, const char *b,
                        long len) {
    char kind[MAXATOMLEN_UTF8];
    int i = 0, version, arity, k, start;

    assert_int_equal(ei_decode_version(b, &i, &version), 0);
    assert_int_equal(ei_decode_tuple_header(b, &i, &arity), 0);
    assert_int_equal(ei_decode_atom(b, &i, kind), 0);
    if (strcmp(kind, "done") == 0 || strcmp(kind, "stopped") == 0) {
        int done = kind[0] == 'd';
        assert_int_equal(arity, 2);
        assert_int_equal(ei_decode_list_header(b, &i, &k), 0);
        assert_true(k > 0); /* never an empty frame */
        n->ndone_frames += (size_t)done;
        for (int e = 0; e < k; e++) {
            ev_t ev = {.kind = done ? EV_DONE : EV_STOPPED, .to = *to};
            unsigned long long tag;
            if (done) {
                char status[MAXATOMLEN_UTF8];
                assert_int_equal(ei_decode_tuple_header(b, &i, &arity), 0);
                assert_int_equal(arity, 3);
                assert_int_equal(ei_decode_ulonglong(b, &i, &tag), 0);
                assert_int_equal(ei_decode_atom(b, &i, status), 0);
                ev.ok = strcmp(status, "ok") == 0;
                assert_true(ev.ok || strcmp(status, "exit") == 0);
                start = i;
                assert_int_equal(ei_skip_term(b, &i), 0);
                ev.term = versioned(b, start, i, &ev.len);
            } else {
                assert_int_equal(ei_decode_ulonglong(b, &i, &tag), 0);
            }
            ev.tag = tag;
            ev_push(n, ev);
        }
        assert_int_equal(ei_decode_list_header(b, &i, &k), 0);
        assert_int_equal(k, 0);
    } else if (strcmp(kind, "log") == 0) {
        ev_t ev = {.kind = EV_LOG, .to = *to};
        int type, size;
        long mlen;
        assert_int_equal(arity, 3);
        assert_int_equal(ei_decode_atom(b, &i, ev.level), 0);
        assert_int_equal(ei_get_type(b, &i, &type, &size), 0);
        assert_int_equal(type, ERL_BINARY_EXT);
        ev.msg = malloc((size_t)size + 1);
        assert_non_null(ev.msg);
        assert_int_equal(ei_decode_binary(b, &i, ev.msg, &mlen), 0);
        ev.msg[mlen] = '\0';
        ev_push(n, ev);
    } else if (strcmp(kind, "ready") == 0 || strcmp(kind, "error") == 0) {
        ev_t ev = {.kind = kind[0] == 'r' ? EV_READY : EV_ERROR, .to = *to};
        i = 0;
        assert_int_equal(ei_decode_version(b, &i, &version), 0);
        assert_int_equal(ei_skip_term(b, &i), 0);
        ev.term = versioned(b, 1, i, &ev.len);
        ev_push(n, ev);
    } else {
        fail_msg("unknown frame %s", kind);
    }
    assert_int_equal(i, len); /* exactly one term */
}

/* Files one message: a frame's events, or the message itself. */
static void parse_msg(dnode_t *n, const erlang_msg *m, const ei_x_buff *x) {
    char atom[MAXATOMLEN_UTF8];
    erlang_pid from;
    int i = 0, version, arity, type, size;

    assert_int_equal(m->msgtype, ERL_SEND); /* ei sends nothing else */
    assert_int_equal(ei_decode_version(x->buff, &i, &version), 0);
    if (ei_decode_tuple_header(x->buff, &i, &arity) == 0 && arity == 3 &&
        ei_decode_atom(x->buff, &i, atom) == 0 &&
        strcmp(atom, "moat_cnode") == 0) {
        char *frame;
        long len;
        assert_int_equal(ei_decode_pid(x->buff, &i, &from), 0);
        assert_string_equal(from.node, n->name);
        if (n->has_cpid)
            assert_true(pid_eq(&from, &n->cpid));
        n->cpid = from;
        n->has_cpid = 1;
        assert_int_equal(ei_get_type(x->buff, &i, &type, &size), 0);
        assert_int_equal(type, ERL_BINARY_EXT);
        frame = malloc((size_t)size + 1);
        assert_non_null(frame);
        assert_int_equal(ei_decode_binary(x->buff, &i, frame, &len), 0);
        assert_int_equal(i, x->index);
        parse_frame(n, &m->to, frame, len);
        free(frame);
    } else {
        ev_t ev = {.kind = EV_OTHER, .to = m->to};
        ev.term = versioned(x->buff, 1, x->index, &ev.len);
        ev_push(n, ev);
    }
}

/* Reads one message within ms.  Returns 1 when something came (a tick
 * included), 0 on a timeout, -1 when the connection is closed. */
static int recv_one(dnode_t *n, unsigned ms) {
    erlang_msg m;
    int rc;

    if (n->fd < 0 || n->closed)
        return -1;
    rc = ei_xreceive_msg_tmo(n->fd, &m, &n->rx, ms < 1 ? 1 : ms);
    if (rc == ERL_TICK)
        return 1;
    if (rc == ERL_ERROR) {
        if (erl_errno == ETIMEDOUT)
            return 0;
        n->closed = 1;
        return -1;
    }
    assert_int_equal(rc, ERL_MSG);
    parse_msg(n, &m, &n->rx);
    return 1;
}

/* The index of the first event of this kind (and tag, for done and
 * stopped), or -1. */
static long ev_find(dnode_t *n, int kind, uint64_t tag) {
    for (size_t i = 0; i < n->nev; i++)
        if (n->ev[i].kind == kind &&
            ((kind != EV_DONE && kind != EV_STOPPED) || n->ev[i].tag == tag))
            return (long)i;
    return -1;
}

static ev_t ev_take(dnode_t *n, size_t i) {
    ev_t e = n->ev[i];
    memmove(n->ev + i, n->ev + i + 1, (n->nev - i - 1) * sizeof *n->ev);
    n->nev--;
    return e;
}

/* The first event of this kind (and tag), waiting up to ms for it.
 * Returns 0, or -1 when the connection closed or ms passed first. */
static int try_wait(dnode_t *n, int kind, uint64_t tag, int ms, ev_t *e) {
    int64_t deadline = now_ms() + ms;
    long i;

    while ((i = ev_find(n, kind, tag)) < 0) {
        if (now_ms() >= deadline || recv_one(n, left(deadline)) < 0)
            return -1;
    }
    *e = ev_take(n, (size_t)i);
    return 0;
}

static ev_t node_wait(dnode_t *n, int kind, uint64_t tag) {
    ev_t e;
    if (try_wait(n, kind, tag, WAIT_MS, &e) != 0)
        fail_msg("no event %d (tag %llu) from %s: %s", kind,
                 (unsigned long long)tag, n->name,
                 n->closed ? "the connection closed" : "timed out");
    return e;
}

static void expect_no_event(dnode_t *n, int kind, uint64_t tag) {
    assert_int_equal(ev_find(n, kind, tag), -1);
}

/* ------------------------------------------------------ the child node */

/* environ, with each of `extra` (NAME=VALUE) replacing or added. */
static char **make_env(const char *const *extra) {
    size_t n = 0, k = 0;
    char **env;

    while (environ[n] != NULL)
        n++;
    while (extra[k] != NULL)
        k++;
    env = calloc(n + k + 1, sizeof *env);
    assert_non_null(env);
    n = 0;
    for (char **e = environ; *e != NULL; e++) {
        int replaced = 0;
        for (size_t j = 0; j < k; j++)
            replaced |= strncmp(*e, extra[j], strcspn(extra[j], "=") + 1) == 0;
        if (!replaced)
            env[n++] = *e;
    }
    for (size_t j = 0; j < k; j++)
        env[n++] = (char *)extra[j];
    return env;
}

/* Starts a C-node under a fresh name: under MOAT_CNODE_RUNNER when
 * `use_runner`, with --serve when `serve`, and with `extra` (NAME=VALUE,
 * NULL-terminated; may be NULL) added to its environment. */
static void node_spawn(dnode_t *n, int use_runner, int serve,
                       const char *const *extra) {
    posix_spawn_file_actions_t fa;
    char node_var[MAXNODELEN + 16], cookie_var[sizeof cookie + 16];
    const char *vars[16] = {node_var, cookie_var};
    char *argv[40], **env;
    int in[2], out[2], a = 0, v = 2;

    memset(n, 0, sizeof *n);
    n->in = n->out = n->fd = -1;
    assert_int_equal(ei_x_new(&n->rx), 0);
    snprintf(n->name, sizeof n->name, "moat_tdist_c%d_%d@%s", (int)getpid(),
             ++nodes_made, ei_thishostname(&self));
    snprintf(node_var, sizeof node_var, "MOAT_NODE=%s", n->name);
    snprintf(cookie_var, sizeof cookie_var, "MOAT_COOKIE=%s", cookie);
    for (int k = 0; extra != NULL && extra[k] != NULL && v < 15; k++)
        vars[v++] = extra[k];
    vars[v] = NULL;

    assert_int_equal(pipe2(in, O_CLOEXEC), 0);
    assert_int_equal(pipe2(out, O_CLOEXEC), 0);
    assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
    assert_int_equal(posix_spawn_file_actions_adddup2(&fa, in[0], 0), 0);
    assert_int_equal(posix_spawn_file_actions_adddup2(&fa, out[1], 1), 0);
    if (use_runner)
        for (int i = 0; i < nrunner; i++)
            argv[a++] = runner[i];
    argv[a++] = (char *)cnode_path;
    if (serve)
        argv[a++] = "--serve";
    argv[a] = NULL;
    env = make_env(vars);
    assert_int_equal(posix_spawnp(&n->pid, argv[0], &fa, NULL, argv, env),
                     0);
    free(env);
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    close(out[1]);
    n->in = in[1];
    n->out = out[0];
}

/* Whether the node has exited (reaping it if so). */
static int node_gone(dnode_t *n) {
    if (!n->reaped && waitpid(n->pid, &n->status, WNOHANG) == n->pid)
        n->reaped = 1;
    return n->reaped;
}

static void describe_status(int status, char *o, size_t cap) {
    if (WIFEXITED(status))
        snprintf(o, cap, "exit status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(o, cap, "signal %d", WTERMSIG(status));
    else
        snprintf(o, cap, "wait status %d", status);
}

/* Waits for a line of its stdout that holds `text`, and takes every line
 * up to it. */
static void wait_line(dnode_t *n, const char *text) {
    int64_t deadline = now_ms() + WAIT_MS;

    for (;;) {
        char *nl, *hit;
        struct pollfd p = {n->out, POLLIN, 0};
        ssize_t r;

        if (n->line != NULL && (hit = strstr(n->line, text)) != NULL &&
            (nl = strchr(hit, '\n')) != NULL) {
            size_t used = (size_t)(nl + 1 - n->line);
            memmove(n->line, nl + 1, n->llen - used + 1);
            n->llen -= used;
            return;
        }
        if (now_ms() >= deadline)
            fail_msg("%s: no line \"%s\" on its stdout", n->name, text);
        if (poll(&p, 1, (int)left(deadline)) <= 0)
            continue;
        if (n->lcap - n->llen < 4096) {
            n->lcap = n->lcap > 0 ? 2 * n->lcap : 8192;
            n->line = realloc(n->line, n->lcap);
            assert_non_null(n->line);
        }
        r = read(n->out, n->line + n->llen, n->lcap - n->llen - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            char how[64] = "still running";
            if (node_gone(n) || (sleep_ms(100), node_gone(n)))
                describe_status(n->status, how, sizeof how);
            fail_msg("%s: its stdout ended before \"%s\" (%s)", n->name,
                     text, how);
        }
        n->llen += (size_t)r;
        n->line[n->llen] = '\0';
    }
}

/* Opens the session's connection. */
static void node_connect(dnode_t *n) {
    n->fd = ei_connect_tmo(&self, n->name, WAIT_MS);
    if (n->fd < 0)
        fail_msg("cannot connect to %s: erl_errno %d", n->name, erl_errno);
}

/* Waits for the node to exit and returns its wait status. */
static int node_reap(dnode_t *n) {
    int64_t deadline = now_ms() + WAIT_MS;

    while (!node_gone(n)) {
        if (now_ms() >= deadline) {
            kill(n->pid, SIGKILL);
            waitpid(n->pid, &n->status, 0);
            n->reaped = 1;
            fail_msg("%s did not exit", n->name);
        }
        sleep_ms(2);
    }
    return n->status;
}

/* Frees what the test kept; kills and reaps a node a test left. */
static void node_free(dnode_t *n) {
    if (n->pid > 0 && !n->reaped) {
        kill(n->pid, SIGKILL);
        waitpid(n->pid, &n->status, 0);
    }
    if (n->fd >= 0)
        ei_close_connection(n->fd);
    if (n->in >= 0)
        close(n->in);
    if (n->out >= 0)
        close(n->out);
    for (size_t i = 0; i < n->nev; i++)
        ev_free(&n->ev[i]);
    free(n->ev);
    free(n->line);
    ei_x_free(&n->rx);
    memset(n, 0, sizeof *n);
    n->in = n->out = n->fd = -1;
}

static void assert_exited(int status, int code) {
    if (!WIFEXITED(status))
        fail_msg("the C-node ended on signal %d, not with exit %d",
                 WIFSIGNALED(status) ? WTERMSIG(status) : -1, code);
    assert_int_equal(WEXITSTATUS(status), code);
}

/* Waits until the connection is closed by the other end. */
static void expect_closed(dnode_t *n) {
    int64_t deadline = now_ms() + WAIT_MS;

    while (recv_one(n, left(deadline)) >= 0)
        if (now_ms() >= deadline)
            fail_msg("the connection to %s stayed open", n->name);
}

/* -------------------------------------------------------------- frames */

/* A frame is built in an ei_x_buff with its version byte first. */
static ei_x_buff frame_new(const char *kind, int arity) {
    ei_x_buff x;
    assert_int_equal(ei_x_new_with_version(&x), 0);
    ei_x_encode_tuple_header(&x, arity);
    ei_x_encode_atom(&x, kind);
    return x;
}

/* The message that carries `frame`: term_to_binary(Frame). */
static ei_x_buff carrier(const ei_x_buff *frame) {
    ei_x_buff m;
    assert_int_equal(ei_x_new_with_version(&m), 0);
    assert_int_equal(ei_x_encode_binary(&m, frame->buff, frame->index), 0);
    return m;
}

/* Sends a message, `msg` with its version byte: to the registered name
 * `reg` from `from` (this node's own pid when NULL), or to the C-node's
 * pid when `reg` is NULL. */
static void send_msg(dnode_t *n, const erlang_pid *from, const char *reg,
                     const ei_x_buff *msg) {
    int rc;
    if (reg == NULL) {
        assert_true(n->has_cpid);
        rc = ei_send_tmo(n->fd, &n->cpid, msg->buff, msg->index, WAIT_MS);
    } else {
        rc = ei_send_reg_encoded_tmo(n->fd, from != NULL ? from : ei_self(&self),
                                     reg, msg->buff, msg->index, WAIT_MS);
    }
    assert_int_equal(rc, 0);
}

/* Sends a frame (and frees it), as the owner: to `moat`, or to the
 * C-node's pid when `reg` is NULL. */
static void send_frame(dnode_t *n, const char *reg, ei_x_buff *frame) {
    ei_x_buff m = carrier(frame);
    send_msg(n, NULL, reg, &m);
    ei_x_free(&m);
    ei_x_free(frame);
}

/* {hello, #{size, max_queue, libraries, isolation, name[, spares]}};
 * libs ends with NULL; spares only when not negative. */
static ei_x_buff hello_frame(long size, const char *isolation,
                             const char *const *libs, long spares) {
    ei_x_buff x = frame_new("hello", 2);
    int nlibs = 0;

    while (libs[nlibs] != NULL)
        nlibs++;
    ei_x_encode_map_header(&x, 5 + (spares >= 0));
    if (spares >= 0) {
        ei_x_encode_atom(&x, "spares");
        ei_x_encode_long(&x, spares);
    }
    ei_x_encode_atom(&x, "size");
    ei_x_encode_long(&x, size);
    ei_x_encode_atom(&x, "max_queue");
    ei_x_encode_long(&x, 2 * BATCH);
    ei_x_encode_atom(&x, "libraries");
    ei_x_encode_list_header(&x, nlibs);
    for (int i = 0; i < nlibs; i++)
        ei_x_encode_binary(&x, libs[i], (long)strlen(libs[i]));
    ei_x_encode_empty_list(&x);
    ei_x_encode_atom(&x, "isolation");
    ei_x_encode_atom(&x, isolation);
    ei_x_encode_atom(&x, "name");
    ei_x_encode_atom(&x, "tdist");
    return x;
}

/* The OS pid a ready frame carries. */
static long ready_pid(const char *ready) {
    long pid;
    int i = 1, arity;
    assert_int_equal(ei_decode_tuple_header(ready, &i, &arity), 0);
    assert_int_equal(ei_skip_term(ready, &i), 0);
    assert_int_equal(ei_decode_long(ready, &i, &pid), 0);
    return pid;
}

/* Says hello to `moat` and returns the ready frame (the caller frees
 * it); checks that it carries the node's OS pid. */
static char *hello(dnode_t *n, long size, const char *isolation,
                   const char *const *libs, long spares) {
    ei_x_buff h = hello_frame(size, isolation, libs, spares);
    ev_t e;

    send_frame(n, "moat", &h);
    e = node_wait(n, EV_READY, 0);
    assert_true(pid_eq(&e.to, ei_self(&self)));
    assert_int_equal(ready_pid(e.term), (long)n->pid);
    free(e.msg);
    return e.term;
}

/* Spawns a node, waits for it to listen, connects and says hello with
 * the demo library in thread isolation. */
static void node_start(dnode_t *n, int use_runner, const char *const *env) {
    const char *libs[] = {demo_path, NULL};
    node_spawn(n, use_runner, 0, env);
    wait_line(n, "moat_cnode listening");
    node_connect(n);
    free(hello(n, 2, "thread", libs, -1));
}

/* {run, Tag, Task, Args}: args is the argument list's encoding without a
 * version byte.  To `reg`, or to the pid when NULL. */
static void send_run_to(dnode_t *n, const char *reg, uint64_t tag,
                        const char *task, const ei_x_buff *args) {
    ei_x_buff x = frame_new("run", 4);
    ei_x_encode_ulonglong(&x, tag);
    ei_x_encode_atom(&x, task);
    ei_x_append_buf(&x, args->buff, args->index);
    send_frame(n, reg, &x);
}

static void send_run(dnode_t *n, uint64_t tag, const char *task,
                     const ei_x_buff *args) {
    send_run_to(n, NULL, tag, task, args);
}

static void run_long(dnode_t *n, uint64_t tag, const char *task, long v) {
    ei_x_buff a = args_long(v);
    send_run(n, tag, task, &a);
    ei_x_free(&a);
}

static void run_none(dnode_t *n, uint64_t tag, const char *task) {
    ei_x_buff a = args_none();
    send_run(n, tag, task, &a);
    ei_x_free(&a);
}

static void send_cancel(dnode_t *n, uint64_t tag) {
    ei_x_buff x = frame_new("cancel", 3);
    ei_x_encode_ulonglong(&x, tag);
    ei_x_encode_atom(&x, "shutdown");
    send_frame(n, NULL, &x);
}

/* Waits for tag's outcome: ok says which kind, `text` the term as show
 * writes it. */
static void expect_done(dnode_t *n, uint64_t tag, int ok, const char *text) {
    ev_t e = node_wait(n, EV_DONE, tag);
    assert_true(pid_eq(&e.to, ei_self(&self)));
    assert_string_equal(show(e.term), text);
    assert_int_equal(e.ok, ok);
    ev_free(&e);
}

/* The next log frame: checks its level and that its message holds
 * `part`. */
static void expect_log(dnode_t *n, const char *level, const char *part) {
    ev_t e = node_wait(n, EV_LOG, 0);
    assert_string_equal(e.level, level);
    if (strstr(e.msg, part) == NULL)
        fail_msg("log \"%s\" does not say \"%s\"", e.msg, part);
    ev_free(&e);
}

/* A round trip: once it is back, the node has handled every message sent
 * before it. */
static void ping(dnode_t *n, uint64_t tag) {
    run_long(n, tag, "echo", 7);
    expect_done(n, tag, 1, "7");
}

/* A control message is built in an ei_x_buff behind room for the
 * packet's length and the pass-through byte: {Op, ...} comes next. */
static ei_x_buff control_new(long op, int arity) {
    ei_x_buff x;
    assert_int_equal(ei_x_new(&x), 0);
    ei_x_append_buf(&x, "\0\0\0\0", 4); /* the length: packet_send */
    ei_x_append_buf(&x, (const char[]){PASS_THROUGH}, 1);
    ei_x_encode_version(&x);
    ei_x_encode_tuple_header(&x, arity);
    ei_x_encode_long(&x, op);
    return x;
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0 && errno == EINTR)
            continue;
        assert_true(w > 0);
        buf += w;
        len -= (size_t)w;
    }
}

/* The bytes the other end of connection fd has received but not read
 * (the rx_queue of its line in /proc/net/tcp or tcp6), or -1 when its
 * line is not found. */
static long peer_unread(int fd) {
    static const char *tables[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    struct sockaddr_storage me, peer;
    socklen_t ml = sizeof me, pl = sizeof peer;
    char want_local[64], want_remote[64], line[512];

    if (getsockname(fd, (struct sockaddr *)&me, &ml) != 0 ||
        getpeername(fd, (struct sockaddr *)&peer, &pl) != 0)
        return -1;
    /* The kernel prints an address as the words of its bytes in memory,
     * then the port: the other end's local address is our peer's. */
    if (peer.ss_family == AF_INET) {
        const struct sockaddr_in *a = (void *)&peer, *b = (void *)&me;
        snprintf(want_local, sizeof want_local, "%08X:%04X",
                 (unsigned)a->sin_addr.s_addr, ntohs(a->sin_port));
        snprintf(want_remote, sizeof want_remote, "%08X:%04X",
                 (unsigned)b->sin_addr.s_addr, ntohs(b->sin_port));
    } else {
        const struct sockaddr_in6 *a = (void *)&peer, *b = (void *)&me;
        uint32_t wa[4], wb[4];
        memcpy(wa, &a->sin6_addr, sizeof wa);
        memcpy(wb, &b->sin6_addr, sizeof wb);
        snprintf(want_local, sizeof want_local, "%08X%08X%08X%08X:%04X",
                 wa[0], wa[1], wa[2], wa[3], ntohs(a->sin6_port));
        snprintf(want_remote, sizeof want_remote, "%08X%08X%08X%08X:%04X",
                 wb[0], wb[1], wb[2], wb[3], ntohs(b->sin6_port));
    }
    for (size_t t = 0; t < sizeof tables / sizeof *tables; t++) {
        FILE *f = fopen(tables[t], "r");
        if (f == NULL)
            continue;
        while (fgets(line, sizeof line, f) != NULL) {
            char local[64], remote[64];
            unsigned st;
            unsigned long txq, rxq;
            if (sscanf(line, " %*d: %63s %63s %x %lx:%lx", local, remote, &st,
                       &txq, &rxq) == 5 &&
                strcmp(local, want_local) == 0 &&
                strcmp(remote, want_remote) == 0) {
                fclose(f);
                return (long)rxq;
            }
        }
        fclose(f);
    }
    return -1;
}

/* Writes the packet built in x (and frees it), its length filled in, as
 * ERTS writes to a C-node: for the control messages ei has no call for,
 * for packets that are not well formed, and for a packet in pieces. The
 * first `split` bytes go alone, and the rest only once the node has read
 * them (0: all at once), so that it holds part of a packet between two
 * reads. */
static void packet_send(dnode_t *n, ei_x_buff *x, size_t split) {
    uint32_t len = (uint32_t)x->index - 4;
    x->buff[0] = (char)(len >> 24);
    x->buff[1] = (char)(len >> 16);
    x->buff[2] = (char)(len >> 8);
    x->buff[3] = (char)len;
    if (split > 0 && split < (size_t)x->index) {
        long left = -1;
        write_all(n->fd, x->buff, split);
        for (int waited = 0; waited < WAIT_MS; waited += 2) {
            if ((left = peer_unread(n->fd)) == 0)
                break;
            sleep_ms(2);
        }
        assert_int_equal(left, 0);
        write_all(n->fd, x->buff + split, (size_t)x->index - split);
    } else {
        write_all(n->fd, x->buff, (size_t)x->index);
    }
    ei_x_free(x);
}

/* Reads one packet straight off the connection, without ei (which would
 * answer a tick, or refuse a control message it does not know): its
 * body, malloc'd, and its length in *len. */
static char *packet_recv(dnode_t *n, size_t *len) {
    int64_t deadline = now_ms() + WAIT_MS;
    unsigned char head[4];
    size_t got = 0, want = sizeof head;
    char *body = NULL;

    for (int part = 0; part < 2; part++) {
        char *into = part == 0 ? (char *)head : body;
        while (got < want) {
            struct pollfd p = {n->fd, POLLIN, 0};
            ssize_t r;
            if (now_ms() >= deadline)
                fail_msg("%s: no whole packet came", n->name);
            if (poll(&p, 1, (int)left(deadline)) <= 0)
                continue;
            r = read(n->fd, into + got, want - got);
            if (r < 0 && errno == EINTR)
                continue;
            assert_true(r > 0);
            got += (size_t)r;
        }
        if (part == 0) {
            want = (size_t)head[0] << 24 | (size_t)head[1] << 16 |
                   (size_t)head[2] << 8 | head[3];
            got = 0;
            body = malloc(want + 1);
            assert_non_null(body);
        }
    }
    *len = want;
    return body;
}

/* Sends the exit signal {'EXIT', From, normal} to the C-node's pid, as a
 * linked owner's exit does. */
static void send_exit(dnode_t *n, const erlang_pid *from) {
    ei_x_buff x;

    assert_true(n->has_cpid);
    x = control_new(CTRL_EXIT, 4);
    ei_x_encode_pid(&x, from);
    ei_x_encode_pid(&x, &n->cpid);
    ei_x_encode_atom(&x, "normal");
    packet_send(n, &x, 0);
}

/* --------------------------------------------------- the shared session */

static dnode_t shared = {.in = -1, .out = -1, .fd = -1};
static char *shared_ready;

static int shared_setup(void **state) {
    const char *libs[] = {demo_path, lib_path, NULL};
    (void)state;
    node_spawn(&shared, 1, 0, NULL);
    wait_line(&shared, "moat_cnode listening");
    node_connect(&shared);
    shared_ready = hello(&shared, 2, "thread", libs, -1);
    return 0;
}

static int shared_teardown(void **state) {
    (void)state;
    free(shared_ready);
    shared_ready = NULL;
    node_free(&shared);
    return 0;
}

/* ready, sent to the process that said hello as {moat_cnode, CPid,
 * Frame}, carries the node's OS pid and every task of its libraries. */
static void test_dist_ready_lists_every_task(void **state) {
    char want[256];
    (void)state;
    snprintf(want, sizeof want,
             "{ready,%d,[echo,sleep,spin,fail,exit,segfault,abort,alloc,fib,"
             "sum,say,print,close_frames,fault_big]}",
             (int)shared.pid);
    assert_string_equal(show(shared_ready), want);
    assert_true(shared.has_cpid);
    assert_string_equal(shared.cpid.node, shared.name);
}

/* A run frame sent to the node's pid or to `moat` is answered with the
 * task's value, byte for byte, under the largest tag too. */
static void test_dist_echo_to_the_pid_and_to_moat(void **state) {
    ei_x_buff a, t;
    ev_t e;
    (void)state;
    ei_x_new(&t);
    ei_x_encode_tuple_header(&t, 3);
    ei_x_encode_atom(&t, "a");
    ei_x_encode_binary(&t, "\1\2\3", 3);
    ei_x_encode_long(&t, -5);
    ei_x_new(&a);
    ei_x_encode_list_header(&a, 1);
    ei_x_append_buf(&a, t.buff, t.index);
    ei_x_encode_empty_list(&a);
    send_run(&shared, UINT64_MAX, "echo", &a);
    e = node_wait(&shared, EV_DONE, UINT64_MAX);
    assert_int_equal(e.ok, 1);
    assert_int_equal(e.len, (size_t)t.index + 1);
    assert_memory_equal(e.term + 1, t.buff, (size_t)t.index);
    assert_string_equal(show(e.term), "{a,<<1,2,3>>,-5}");
    ev_free(&e);
    send_run_to(&shared, "moat", 11, "echo", &a);
    expect_done(&shared, 11, 1, "{a,<<1,2,3>>,-5}");
    ei_x_free(&a);
    ei_x_free(&t);
}

/* A runs frame of many tasks: each tag comes back exactly once, with its
 * own result, and nothing more after. */
static void test_dist_runs_batch_answers_each_tag_once(void **state) {
    const uint64_t base = 1000000;
    unsigned char *seen = calloc(BATCH, 1);
    size_t got = 0, frames0 = shared.ndone_frames;
    int64_t deadline = now_ms() + WAIT_MS;
    ei_x_buff x = frame_new("runs", 2);
    (void)state;

    assert_non_null(seen);
    ei_x_encode_list_header(&x, BATCH);
    for (long i = 0; i < BATCH; i++) {
        ei_x_encode_tuple_header(&x, 3);
        ei_x_encode_ulonglong(&x, base + (uint64_t)i);
        ei_x_encode_atom(&x, "echo");
        ei_x_encode_list_header(&x, 1);
        ei_x_encode_long(&x, 3 * i);
        ei_x_encode_empty_list(&x);
    }
    ei_x_encode_empty_list(&x);
    send_frame(&shared, "moat", &x);

    while (got < BATCH) {
        size_t keep = 0;
        for (size_t i = 0; i < shared.nev; i++) {
            ev_t *e = &shared.ev[i];
            long v;
            int k = 1;
            if (e->kind != EV_DONE || e->tag < base ||
                e->tag >= base + BATCH) {
                shared.ev[keep++] = *e;
                continue;
            }
            assert_int_equal(e->ok, 1);
            assert_int_equal(ei_decode_long(e->term, &k, &v), 0);
            assert_int_equal((uint64_t)v, 3 * (e->tag - base));
            assert_int_equal(seen[e->tag - base]++, 0);
            got++;
            ev_free(e);
        }
        shared.nev = keep;
        if (got < BATCH) {
            if (now_ms() >= deadline)
                fail_msg("%zu of %d outcomes came", got, BATCH);
            assert_true(recv_one(&shared, left(deadline)) >= 0);
        }
    }
    print_message("   %d outcomes came in %zu done frames\n", BATCH,
                  shared.ndone_frames - frames0);
    ping(&shared, 301);
    for (size_t i = 0; i < shared.nev; i++)
        assert_false(shared.ev[i].kind == EV_DONE &&
                     shared.ev[i].tag >= base &&
                     shared.ev[i].tag < base + BATCH);
    free(seen);
}

/* fail is {Tag, exit, {native_error, Message}}, exit ends with its own
 * reason, and an unknown task is {unknown_task, Task}. */
static void test_dist_failures_are_exit_outcomes(void **state) {
    ei_x_buff a = args_binary("boom"), r;
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
    run_none(&shared, 103, "no_such_task");
    expect_done(&shared, 103, 0, "{unknown_task,no_such_task}");
    ei_x_free(&a);
    ei_x_free(&r);
}

/* A long sleep cancelled while it runs comes back stopped, never done. */
static void test_dist_cancel_of_sleep_gives_stopped(void **state) {
    ei_x_buff a = args_binary("sleep 401 runs");
    ev_t e;
    (void)state;
    run_long(&shared, 401, "sleep", FOREVER_MS);
    /* print runs on the other thread (the pool has two, its queue is
     * FIFO): once it is done, the sleep has left the queue. */
    send_run(&shared, 402, "print", &a);
    ei_x_free(&a);
    expect_done(&shared, 402, 1, "ok");
    wait_line(&shared, "sleep 401 runs");
    send_cancel(&shared, 401);
    e = node_wait(&shared, EV_STOPPED, 401);
    assert_true(pid_eq(&e.to, ei_self(&self)));
    ev_free(&e);
    ping(&shared, 403);
    expect_no_event(&shared, EV_DONE, 401);
}

/* What a task prints goes to the node's stdout as it is (the VM logs its
 * lines): it never reaches the frames. */
static void test_dist_task_output_goes_to_stdout(void **state) {
    ei_x_buff a = args_binary("printed by a task over distribution");
    (void)state;
    send_run(&shared, 501, "print", &a);
    ei_x_free(&a);
    expect_done(&shared, 501, 1, "ok");
    wait_line(&shared, "printed by a task over distribution");
    ping(&shared, 502);
    expect_no_event(&shared, EV_LOG, 0);
}

/* While a session lives, a second connection is closed at once (after
 * its handshake, or before), the owner is told, and the session serves
 * on. */
static void test_dist_second_connection_is_refused(void **state) {
    char alive[64];
    ei_cnode other;
    ei_x_buff buf;
    erlang_msg m;
    int fd, rc;
    (void)state;
    snprintf(alive, sizeof alive, "moat_tdist_%d_second", (int)getpid());
    assert_int_equal(ei_connect_init(&other, alive, cookie, 7), 0);
    fd = ei_connect_tmo(&other, shared.name, WAIT_MS);
    if (fd >= 0) { /* the handshake may complete before the close */
        ei_x_new(&buf);
        do
            rc = ei_xreceive_msg_tmo(fd, &m, &buf, WAIT_MS);
        while (rc == ERL_TICK);
        ei_x_free(&buf);
        ei_close_connection(fd);
        if (rc != ERL_ERROR || erl_errno == ETIMEDOUT)
            fail_msg("the second connection stayed open (rc %d, "
                     "erl_errno %d)",
                     rc, erl_errno);
    }
    expect_log(&shared, "warning", "second connection");
    ping(&shared, 601);
}

/* From the owner, a message to `moat` that is not a binary, or a binary
 * that is no term, is logged as an error and ignored; so is a non-binary
 * sent to the node's pid, and a message to an unknown name is a warning.
 * The node serves on. */
static void test_dist_junk_is_logged(void **state) {
    ei_x_buff x, y = frame_new("run", 4);
    (void)state;
    ei_x_new_with_version(&x);
    ei_x_encode_atom(&x, "junk");
    send_msg(&shared, NULL, "moat", &x);
    expect_log(&shared, "error", "not a binary frame");
    send_msg(&shared, NULL, NULL, &x);
    expect_log(&shared, "error", "not a binary frame");
    send_msg(&shared, NULL, "nobody_here", &x);
    expect_log(&shared, "warning", "unknown name");
    ei_x_free(&x);

    ei_x_new_with_version(&x);
    ei_x_encode_binary(&x, "\1\2\3", 3);
    send_msg(&shared, NULL, "moat", &x);
    expect_log(&shared, "error", "malformed");
    ei_x_free(&x);

    /* A tagged run frame that is cut short: logged, its tag badarg. */
    ei_x_encode_ulonglong(&y, 701);
    ei_x_encode_atom(&y, "echo");
    y.index -= 1;
    send_frame(&shared, "moat", &y);
    expect_log(&shared, "error", "malformed run frame");
    expect_done(&shared, 701, 0, "badarg");
    ping(&shared, 702);
}

/* A message to `moat` from a process that is not the owner is answered
 * {moat_cnode, CPid, <<{error, {busy, Message}}>>} to that process, and
 * what it carries is not run. */
static void test_dist_another_process_is_busy(void **state) {
    const char *libs[] = {demo_path, NULL};
    erlang_pid other;
    ei_x_buff f = hello_frame(1, "thread", libs, -1), m = carrier(&f),
              a = args_long(1);
    ev_t e;
    (void)state;
    assert_int_equal(ei_make_pid(&self, &other), 0);
    assert_false(pid_eq(&other, ei_self(&self)));
    send_msg(&shared, &other, "moat", &m);
    e = node_wait(&shared, EV_ERROR, 0);
    assert_true(pid_eq(&e.to, &other));
    assert_string_equal(show(e.term),
                        "{error,{busy,<<\"this moat_cnode serves another "
                        "pool\">>}}");
    ev_free(&e);
    ei_x_free(&f);
    ei_x_free(&m);

    f = frame_new("run", 4);
    ei_x_encode_ulonglong(&f, 801);
    ei_x_encode_atom(&f, "echo");
    ei_x_append_buf(&f, a.buff, a.index);
    m = carrier(&f);
    send_msg(&shared, &other, "moat", &m);
    e = node_wait(&shared, EV_ERROR, 0);
    assert_true(pid_eq(&e.to, &other));
    ev_free(&e);
    ping(&shared, 802);
    expect_no_event(&shared, EV_DONE, 801);
    ei_x_free(&f);
    ei_x_free(&m);
    ei_x_free(&a);
}

/* `moat_echo` sends any message back to its sender, unchanged, whoever
 * that is. */
static void test_dist_moat_echo_echoes(void **state) {
    erlang_pid other;
    ei_x_buff x;
    ev_t e;
    (void)state;
    assert_int_equal(ei_make_pid(&self, &other), 0);
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 3);
    ei_x_encode_atom(&x, "ping");
    ei_x_encode_long(&x, 42);
    ei_x_encode_binary(&x, "x", 1);
    send_msg(&shared, NULL, "moat_echo", &x);
    e = node_wait(&shared, EV_OTHER, 0);
    assert_true(pid_eq(&e.to, ei_self(&self)));
    assert_int_equal(e.len, (size_t)x.index);
    assert_memory_equal(e.term, x.buff, e.len);
    ev_free(&e);
    send_msg(&shared, &other, "moat_echo", &x);
    e = node_wait(&shared, EV_OTHER, 0);
    assert_true(pid_eq(&e.to, &other));
    assert_string_equal(show(e.term), "{ping,42,<<\"x\">>}");
    ev_free(&e);
    ei_x_free(&x);
    ping(&shared, 901);
}

/* The node speaks the distribution protocol on its own (it reads without
 * ei): it answers a tick with one, acknowledges an unlink, ignores a
 * monitor, logs a packet it cannot read and goes on, and puts a message
 * that comes in pieces back together. */
static void test_dist_protocol_ticks_unlinks_and_pieces(void **state) {
    erlang_pid got_from, got_to;
    ei_x_buff x, m;
    char *body;
    size_t len;
    long op, id;
    int i = 1, version, arity;
    ev_t e;
    (void)state;

    write_all(shared.fd, "\0\0\0\0", 4);
    body = packet_recv(&shared, &len);
    assert_int_equal(len, 0);
    free(body);

    x = control_new(CTRL_UNLINK_ID, 4);
    ei_x_encode_long(&x, 4242);
    ei_x_encode_pid(&x, ei_self(&self));
    ei_x_encode_pid(&x, &shared.cpid);
    packet_send(&shared, &x, 0);
    body = packet_recv(&shared, &len);
    assert_true(len > 1);
    assert_int_equal((unsigned char)body[0], PASS_THROUGH);
    assert_int_equal(ei_decode_version(body, &i, &version), 0);
    assert_int_equal(ei_decode_tuple_header(body, &i, &arity), 0);
    assert_int_equal(arity, 4);
    assert_int_equal(ei_decode_long(body, &i, &op), 0);
    assert_int_equal(op, CTRL_UNLINK_ID_ACK);
    assert_int_equal(ei_decode_long(body, &i, &id), 0);
    assert_int_equal(id, 4242);
    assert_int_equal(ei_decode_pid(body, &i, &got_from), 0);
    assert_int_equal(ei_decode_pid(body, &i, &got_to), 0);
    assert_int_equal((size_t)i, len);
    assert_true(pid_eq(&got_from, &shared.cpid));
    assert_true(pid_eq(&got_to, ei_self(&self)));
    free(body);

    x = control_new(CTRL_MONITOR_P, 4);
    ei_x_encode_pid(&x, ei_self(&self));
    ei_x_encode_pid(&x, &shared.cpid);
    ei_x_encode_ref(&x, &(erlang_ref){.node = "a@b", .len = 1, .n = {7}});
    packet_send(&shared, &x, 0);
    ping(&shared, 1101);
    expect_no_event(&shared, EV_LOG, 0);

    /* {REG_SEND, From, '', moat_echo} cut after its pid */
    x = control_new(CTRL_REG_SEND, 4);
    ei_x_encode_pid(&x, ei_self(&self));
    packet_send(&shared, &x, 0);
    expect_log(&shared, "error", "cannot be read");
    ping(&shared, 1102);

    ei_x_new_with_version(&m);
    ei_x_encode_tuple_header(&m, 2);
    ei_x_encode_atom(&m, "pieces");
    ei_x_encode_binary(&m, "0123456789", 10);
    x = control_new(CTRL_REG_SEND, 4);
    ei_x_encode_pid(&x, ei_self(&self));
    ei_x_encode_atom(&x, "");
    ei_x_encode_atom(&x, "moat_echo");
    ei_x_append_buf(&x, m.buff, m.index);
    packet_send(&shared, &x, (size_t)x.index - 5);
    e = node_wait(&shared, EV_OTHER, 0);
    assert_string_equal(show(e.term), "{pieces,<<\"0123456789\">>}");
    ev_free(&e);
    ei_x_free(&m);
    ping(&shared, 1103);
}

/* Closing the connection ends the session, and a spawned node exits with
 * status 0 (which a leak under ASan or valgrind would change), even with
 * a body still sleeping. */
static void test_dist_closing_the_connection_exits_0(void **state) {
    (void)state;
    run_long(&shared, 1001, "sleep", FOREVER_MS);
    ping(&shared, 1002);
    ei_close_connection(shared.fd);
    shared.fd = -1;
    assert_exited(node_reap(&shared), 0);
}

/* ----------------------------------------------------- a node each */

static int own_setup(void **state) {
    dnode_t *n = calloc(1, sizeof *n);
    assert_non_null(n);
    n->in = n->out = n->fd = -1;
    *state = n;
    return 0;
}

static int own_teardown(void **state) {
    dnode_t *n = *state;
    node_free(n);
    free(n);
    return 0;
}

/* A hello whose library cannot be opened is answered {error,
 * {bad_library, Message}} and the node exits with status 2. */
static void test_dist_bad_library(void **state) {
    static const char want[] = "{error,{bad_library,<<\"";
    const char *libs[] = {"/nonexistent/moat_tdist.so", NULL};
    dnode_t *n = *state;
    ei_x_buff h = hello_frame(1, "thread", libs, -1);
    ev_t e;
    node_spawn(n, 1, 0, NULL);
    wait_line(n, "moat_cnode listening");
    node_connect(n);
    send_frame(n, "moat", &h);
    e = node_wait(n, EV_ERROR, 0);
    assert_true(pid_eq(&e.to, ei_self(&self)));
    if (strncmp(show(e.term), want, sizeof want - 1) != 0 ||
        strstr(show(e.term), libs[0]) == NULL)
        fail_msg("not bad_library for %s: %s", libs[0], show(e.term));
    ev_free(&e);
    assert_exited(node_reap(n), 2);
    expect_closed(n);
}

/* A first frame that is not hello is answered {error, {bad_hello,
 * Message}} and the node exits with status 2. */
static void test_dist_frame_before_hello_is_bad_hello(void **state) {
    dnode_t *n = *state;
    ei_x_buff a = args_long(1);
    ev_t e;
    node_spawn(n, 1, 0, NULL);
    wait_line(n, "moat_cnode listening");
    node_connect(n);
    send_run_to(n, "moat", 1, "echo", &a);
    ei_x_free(&a);
    e = node_wait(n, EV_ERROR, 0);
    assert_string_equal(show(e.term),
                        "{error,{bad_hello,<<\"the first frame is not "
                        "{hello, Opts}\">>}}");
    ev_free(&e);
    assert_exited(node_reap(n), 2);
    expect_no_event(n, EV_DONE, 1);
}

/* stdin is the lifeline: its end ends the node with status 0, and the
 * connection closes. */
static void test_dist_stdin_eof_exits_0(void **state) {
    dnode_t *n = *state;
    node_start(n, 1, NULL);
    run_long(n, 1, "sleep", FOREVER_MS);
    ping(n, 2);
    close(n->in);
    n->in = -1;
    assert_exited(node_reap(n), 0);
    expect_closed(n);
    expect_no_event(n, EV_DONE, 1);
}

/* An exit signal from the owner (it is linked to the node's pid) ends
 * the session and the node with status 0; one from another process does
 * not. */
static void test_dist_owner_exit_ends_the_node(void **state) {
    dnode_t *n = *state;
    erlang_pid other;
    node_start(n, 1, NULL);
    assert_int_equal(ei_make_pid(&self, &other), 0);
    send_exit(n, &other);
    ping(n, 1);
    assert_false(node_gone(n));
    send_exit(n, ei_self(&self));
    assert_exited(node_reap(n), 0);
    expect_closed(n);
}

/* A segfault in thread isolation ends the whole node, by design: on
 * SIGSEGV (or its status 128 + 11 through a shell).  The node runs
 * without MOAT_CNODE_RUNNER, with the sanitizers' SIGSEGV handlers off;
 * in the ASan build UBSan, built in without recovery, sees the null store
 * first and ends the node with status 1. */
static void test_dist_segfault_kills_the_node(void **state) {
    const char *env[] = {"ASAN_OPTIONS=detect_leaks=0:handle_segv=0",
                         "TSAN_OPTIONS=handle_segv=0", NULL};
    dnode_t *n = *state;
    int status;
    node_start(n, 0, env);
    ping(n, 1);
    run_none(n, 2, "segfault");
    status = node_reap(n);
#if defined(__SANITIZE_ADDRESS__)
    assert_exited(status, 1);
#else
    if (WIFEXITED(status))
        assert_int_equal(WEXITSTATUS(status), 128 + SIGSEGV);
    else if (WIFSIGNALED(status))
        assert_int_equal(WTERMSIG(status), SIGSEGV);
    else
        fail_msg("wait status %d", status);
#endif
    expect_closed(n);
    expect_no_event(n, EV_DONE, 2);
}

/* The outcome a worker's segfault gets (see test_cnode.c: in the ASan
 * build UBSan ends the worker with status 1 first). */
#if defined(__SANITIZE_ADDRESS__)
#define SEGFAULT_REASON "{native_crash,{exit_status,1}}"
#else
#define SEGFAULT_REASON "{native_crash,sigsegv}"
#endif

/* With isolation process over distribution, tasks run in workers: echo
 * answers, a segfault ends only its task with {native_crash, sigsegv},
 * and the node serves on and still exits 0 when the connection closes. */
static void test_dist_process_isolation(void **state) {
    const char *libs[] = {demo_path, NULL};
    const char *env[] = {
        "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:handle_segv=0",
        "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:handle_segv=0",
        NULL};
    dnode_t *n = *state;
    char want[256];
    char *ready;
    node_spawn(n, 1, 0, env);
    wait_line(n, "moat_cnode listening");
    node_connect(n);
    ready = hello(n, 1, "process", libs, 1);
    snprintf(want, sizeof want,
             "{ready,%d,[echo,sleep,spin,fail,exit,segfault,abort,alloc,fib,"
             "sum]}",
             (int)n->pid);
    assert_string_equal(show(ready), want);
    free(ready);
    for (uint64_t t = 1; t <= 5; t++) {
        char v[32];
        run_long(n, t, "echo", (long)t * 11);
        snprintf(v, sizeof v, "%ld", (long)t * 11);
        expect_done(n, t, 1, v);
    }
    run_none(n, 6, "segfault");
    expect_done(n, 6, 0, SEGFAULT_REASON);
    ping(n, 7);
    run_none(n, 8, "segfault");
    expect_done(n, 8, 0, SEGFAULT_REASON);
    ping(n, 9);
    ei_close_connection(n->fd);
    n->fd = -1;
    assert_exited(node_reap(n), 0);
}

/* Connects to a serving node and opens a session with the demo library,
 * retrying while it is between two sessions.  Returns the ready frame. */
static char *serve_session(dnode_t *n) {
    const char *libs[] = {demo_path, NULL};
    int64_t deadline = now_ms() + WAIT_MS;

    for (;;) {
        ei_x_buff h;
        ev_t e;
        if (now_ms() >= deadline)
            fail_msg("no session with %s", n->name);
        if (node_gone(n)) {
            char how[64];
            describe_status(n->status, how, sizeof how);
            fail_msg("the server %s ended: %s", n->name, how);
        }
        n->fd = ei_connect_tmo(&self, n->name, RETRY_MS);
        if (n->fd < 0) {
            sleep_ms(20);
            continue;
        }
        n->closed = 0;
        h = hello_frame(2, "thread", libs, -1);
        send_frame(n, "moat", &h);
        if (try_wait(n, EV_READY, 0, RETRY_MS, &e) == 0) {
            free(e.msg);
            return e.term;
        }
        ei_close_connection(n->fd);
        n->fd = -1;
        n->has_cpid = 0;
    }
}

/* The parent of process `pid`, or -1 when it is gone (or a zombie). */
static long parent_of(long pid) {
    char path[64], buf[512], *rp, st;
    int ppid;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    if (fgets(buf, sizeof buf, f) == NULL)
        buf[0] = '\0';
    fclose(f);
    rp = strrchr(buf, ')'); /* the name may hold anything */
    if (rp == NULL || sscanf(rp + 1, " %c %d", &st, &ppid) != 2 || st == 'Z')
        return -1;
    return ppid;
}

static void expect_gone(long pid) {
    int64_t deadline = now_ms() + WAIT_MS;
    while (parent_of(pid) >= 0) {
        if (now_ms() >= deadline)
            fail_msg("process %ld outlived its session", pid);
        sleep_ms(5);
    }
}

/* Ends the session's connection on our side. */
static void session_close(dnode_t *n) {
    ei_close_connection(n->fd);
    n->fd = -1;
    n->has_cpid = 0;
}

/* --serve runs one session after another, each in a child of its own:
 * nothing of a session outlives it (not even a body that ignores
 * cancellation), a fault in thread isolation costs the session and not
 * the server, and the server serves until it is killed, its last session
 * with it. */
static void test_dist_serve_sessions_in_children(void **state) {
    const char *env[] = {"ASAN_OPTIONS=detect_leaks=0:handle_segv=0",
                         "TSAN_OPTIONS=handle_segv=0", NULL};
    dnode_t *n = *state;
    long s1, s2, s3;
    char *ready;
    node_spawn(n, 1, 1, env);

    ready = serve_session(n);
    s1 = ready_pid(ready);
    free(ready);
    assert_int_equal(parent_of(s1), n->pid);
    run_long(n, 1, "spin", (long)FOREVER_MS * 1000); /* ignores cancel */
    ping(n, 2);
    session_close(n);
    expect_gone(s1);

    ready = serve_session(n);
    s2 = ready_pid(ready);
    free(ready);
    assert_true(s2 != s1);
    assert_int_equal(parent_of(s2), n->pid);
    ping(n, 3);
    expect_no_event(n, EV_DONE, 1);
    run_none(n, 4, "segfault");
    expect_closed(n);
    expect_no_event(n, EV_DONE, 4);
    session_close(n);
    expect_gone(s2);

    ready = serve_session(n);
    s3 = ready_pid(ready);
    free(ready);
    assert_int_equal(parent_of(s3), n->pid);
    ping(n, 5);
    assert_false(node_gone(n));
    kill(n->pid, SIGKILL);
    assert_int_equal(waitpid(n->pid, &n->status, 0), n->pid);
    n->reaped = 1;
    expect_gone(s3);
    expect_closed(n);
}

/* ------------------------------------------------------------------ main */

/* Starts epmd unless one is running: the nodes publish their names
 * there. */
static int start_epmd(void) {
    int64_t deadline = now_ms() + 10000;
    if (system("epmd -names >/dev/null 2>&1") == 0)
        return 0;
    if (system("epmd -daemon") != 0)
        return -1;
    while (system("epmd -names >/dev/null 2>&1") != 0) {
        if (now_ms() >= deadline)
            return -1;
        sleep_ms(50);
    }
    return 0;
}

int main(void) {
    char alive[64];
    const struct CMUnitTest shared_tests[] = {
        cmocka_unit_test(test_dist_ready_lists_every_task),
        cmocka_unit_test(test_dist_echo_to_the_pid_and_to_moat),
        cmocka_unit_test(test_dist_runs_batch_answers_each_tag_once),
        cmocka_unit_test(test_dist_failures_are_exit_outcomes),
        cmocka_unit_test(test_dist_cancel_of_sleep_gives_stopped),
        cmocka_unit_test(test_dist_task_output_goes_to_stdout),
        cmocka_unit_test(test_dist_second_connection_is_refused),
        cmocka_unit_test(test_dist_junk_is_logged),
        cmocka_unit_test(test_dist_another_process_is_busy),
        cmocka_unit_test(test_dist_moat_echo_echoes),
        cmocka_unit_test(test_dist_protocol_ticks_unlinks_and_pieces),
        /* last: it ends the session */
        cmocka_unit_test(test_dist_closing_the_connection_exits_0),
    };
    const struct CMUnitTest own_tests[] = {
        cmocka_unit_test_setup_teardown(test_dist_bad_library, own_setup,
                                        own_teardown),
        cmocka_unit_test_setup_teardown(test_dist_frame_before_hello_is_bad_hello,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_dist_stdin_eof_exits_0,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_dist_owner_exit_ends_the_node,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_dist_segfault_kills_the_node,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_dist_process_isolation,
                                        own_setup, own_teardown),
        cmocka_unit_test_setup_teardown(test_dist_serve_sessions_in_children,
                                        own_setup, own_teardown),
    };
    int failed;

    if (cnode_test_init("test_dist") != 0)
        return 1;
    if (start_epmd() != 0) {
        fprintf(stderr, "test_dist: epmd is not running and cannot be "
                        "started\n");
        return 1;
    }
    ei_init();
    snprintf(alive, sizeof alive, "moat_tdist_%d", (int)getpid());
    snprintf(cookie, sizeof cookie, "moat_tdist_cookie_%d_%ld", (int)getpid(),
             (long)time(NULL));
    if (ei_connect_init(&self, alive, cookie, (unsigned)getpid() & 0x7fff) <
        0) {
        fprintf(stderr, "test_dist: ei_connect_init failed\n");
        return 1;
    }
    failed = cmocka_run_group_tests_name("dist (one shared session)",
                                         shared_tests, shared_setup,
                                         shared_teardown);
    failed += cmocka_run_group_tests_name("dist (a node each)", own_tests,
                                          NULL, NULL);
    return failed;
}
