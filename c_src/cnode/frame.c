/*
 * frame.c: decodes the frames the VM sends to moat_cnode (frame.h).
 *
 * Everything here reads through a cursor that checks, before each read,
 * that the bytes are there; no ei decoder runs, since ei checks no bounds.
 * A frame that moat_etf_check passed is decoded in full.  One that failed
 * is read only as far as the cursor can go, for the tags it carries: its
 * entries are then all malformed, because nothing after a bad byte can be
 * trusted.  Skipping a term needs no stack: a count of the terms still to
 * skip is enough, since every container says up front how many terms it
 * holds, and each term takes at least one byte, which bounds the count by
 * the bytes left.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "etf.h"
#include "frame.h"

/* The old FLOAT_EXT's fixed text field. */
#define OLD_FLOAT_LEN 31

/* The doc's bound on a pool's threads. */
#define HELLO_MAX_SIZE 1024

/* Argument lists up to this size are assembled on the stack. */
#define ARGS_STACK 1024

/* ---------------------------------------------------------- the cursor */

typedef struct {
    const unsigned char *p;
    size_t len;
    size_t pos; /* always <= len */
} rd_t;

static int has(const rd_t *r, size_t n) { return n <= r->len - r->pos; }

static int advance(rd_t *r, size_t n) {
    if (!has(r, n))
        return -1;
    r->pos += n;
    return 0;
}

static uint32_t be16(const unsigned char *p) {
    return (uint32_t)p[0] << 8 | p[1];
}

/* The tag of the next term, without consuming it; -1 at the end. */
static int peek(const rd_t *r) { return has(r, 1) ? r->p[r->pos] : -1; }

static int read_atom(rd_t *r, moat__atom_t *a) {
    size_t start = r->pos, head, n;
    int tag = peek(r);

    if (tag == TAG_ATOM || tag == TAG_ATOM_UTF8) {
        if (!has(r, 3))
            return -1;
        head = 3;
        n = be16(r->p + r->pos + 1);
    } else if (tag == TAG_SMALL_ATOM || tag == TAG_SMALL_ATOM_UTF8) {
        if (!has(r, 2))
            return -1;
        head = 2;
        n = r->p[r->pos + 1];
    } else {
        return -1;
    }
    if (advance(r, head) < 0 || !has(r, n))
        return -1;
    a->name = (const char *)r->p + r->pos;
    a->len = n;
    a->latin1 = tag == TAG_ATOM || tag == TAG_SMALL_ATOM;
    r->pos += n;
    a->etf = (const char *)r->p + start;
    a->etf_len = r->pos - start;
    return 0;
}

/* Whether an atom is `s` (ASCII), whatever its encoding. */
static int atom_is(const moat__atom_t *a, const char *s) {
    return a->len == strlen(s) && memcmp(a->name, s, a->len) == 0;
}

/* An integer in 0..2^64-1: small, 32-bit or a bignum of at most 8 bytes. */
static int read_u64(rd_t *r, uint64_t *v) {
    const unsigned char *p = r->p + r->pos;
    size_t n, head;

    switch (peek(r)) {
    case TAG_SMALL_INTEGER:
        if (!has(r, 2))
            return -1;
        *v = p[1];
        r->pos += 2;
        return 0;
    case TAG_INTEGER:
        if (!has(r, 5) || (p[1] & 0x80))
            return -1;
        *v = moat__be32(p + 1);
        r->pos += 5;
        return 0;
    case TAG_SMALL_BIG:
        if (!has(r, 3))
            return -1;
        n = p[1];
        head = 3;
        break;
    case TAG_LARGE_BIG:
        if (!has(r, 6))
            return -1;
        n = moat__be32(p + 1);
        head = 6;
        break;
    default:
        return -1;
    }
    /* the sign byte precedes the little-endian digits */
    if (p[head - 1] != 0 || n > 8 || !has(r, head + n))
        return -1;
    *v = 0;
    for (size_t i = n; i > 0; i--)
        *v = *v << 8 | p[head + i - 1];
    r->pos += head + n;
    return 0;
}

static int read_tuple(rd_t *r, uint32_t *arity) {
    const unsigned char *p = r->p + r->pos;

    if (peek(r) == TAG_SMALL_TUPLE && has(r, 2)) {
        *arity = p[1];
        r->pos += 2;
        return 0;
    }
    if (peek(r) == TAG_LARGE_TUPLE && has(r, 5)) {
        *arity = moat__be32(p + 1);
        r->pos += 5;
        return 0;
    }
    return -1;
}

static int skip_atom(rd_t *r) {
    moat__atom_t a;
    return read_atom(r, &a);
}

/* Skips one term of any kind moat_etf_check accepts. */
static int skip_term(rd_t *r) {
    uint64_t left = 1;
    const unsigned char *p;
    size_t n;

    while (left > 0) {
        left--;
        if (!has(r, 1))
            return -1;
        p = r->p + r->pos;
        switch (p[0]) {
        case TAG_SMALL_INTEGER:
            n = 2;
            break;
        case TAG_INTEGER:
            n = 5;
            break;
        case TAG_NEW_FLOAT:
            n = 9;
            break;
        case TAG_FLOAT:
            n = 1 + OLD_FLOAT_LEN;
            break;
        case TAG_ATOM:
        case TAG_ATOM_UTF8:
        case TAG_SMALL_ATOM:
        case TAG_SMALL_ATOM_UTF8:
            if (skip_atom(r) < 0)
                return -1;
            continue;
        case TAG_SMALL_TUPLE:
            if (!has(r, 2))
                return -1;
            left += p[1];
            n = 2;
            break;
        case TAG_LARGE_TUPLE:
            if (!has(r, 5))
                return -1;
            left += moat__be32(p + 1);
            n = 5;
            break;
        case TAG_MAP:
            if (!has(r, 5))
                return -1;
            left += 2 * (uint64_t)moat__be32(p + 1);
            n = 5;
            break;
        case TAG_LIST:
            if (!has(r, 5))
                return -1;
            left += (uint64_t)moat__be32(p + 1) + 1; /* the elements, the tail */
            n = 5;
            break;
        case TAG_NIL:
            n = 1;
            break;
        case TAG_STRING:
            if (!has(r, 3))
                return -1;
            n = 3 + (size_t)be16(p + 1);
            break;
        case TAG_BINARY:
            if (!has(r, 5))
                return -1;
            n = 5 + (size_t)moat__be32(p + 1);
            break;
        case TAG_BIT_BINARY:
            if (!has(r, 6))
                return -1;
            n = 6 + (size_t)moat__be32(p + 1);
            break;
        case TAG_SMALL_BIG:
            if (!has(r, 3))
                return -1;
            n = 3 + (size_t)p[1];
            break;
        case TAG_LARGE_BIG:
            if (!has(r, 6))
                return -1;
            n = 6 + (size_t)moat__be32(p + 1);
            break;
        case TAG_PID:
        case TAG_NEW_PID:
        case TAG_PORT:
        case TAG_NEW_PORT:
        case TAG_V4_PORT:
        case TAG_REFERENCE: {
            /* the node's atom, then fixed fields */
            int tag = p[0];
            r->pos++;
            if (skip_atom(r) < 0)
                return -1;
            n = tag == TAG_PID       ? 9
                : tag == TAG_NEW_PID ? 12
                : tag == TAG_V4_PORT ? 12
                : tag == TAG_NEW_PORT ? 8
                                      : 5;
            if (advance(r, n) < 0)
                return -1;
            continue;
        }
        case TAG_NEW_REFERENCE:
        case TAG_NEWER_REFERENCE: {
            int tag = p[0];
            size_t words;
            if (!has(r, 3))
                return -1;
            words = be16(p + 1);
            r->pos += 3;
            if (skip_atom(r) < 0 ||
                advance(r, (tag == TAG_NEW_REFERENCE ? 1 : 4) + 4 * words) < 0)
                return -1;
            continue;
        }
        case TAG_NEW_FUN:
            /* Size counts from the Size field to the fun's end. */
            if (!has(r, 5))
                return -1;
            n = 1 + (size_t)moat__be32(p + 1);
            if (n < 5)
                return -1;
            break;
        case TAG_EXPORT:
            n = 1;
            left += 3; /* module, function, arity */
            break;
        default:
            return -1;
        }
        if (advance(r, n) < 0)
            return -1;
        /* Each term still to skip takes a byte at least. */
        if (left > r->len - r->pos)
            return -1;
    }
    return 0;
}

/* A proper list (string, [] or list ending in []); on success the cursor
 * is after it. */
static int skip_proper_list(rd_t *r) {
    uint32_t n;

    switch (peek(r)) {
    case TAG_NIL:
    case TAG_STRING:
        return skip_term(r);
    case TAG_LIST:
        if (!has(r, 5))
            return -1;
        n = moat__be32(r->p + r->pos + 1);
        r->pos += 5;
        for (uint32_t i = 0; i < n; i++)
            if (skip_term(r) < 0)
                return -1;
        return peek(r) == TAG_NIL ? advance(r, 1) : -1;
    default:
        return -1;
    }
}

/* ------------------------------------------------------------ helpers */

static void why(moat__frame_t *f, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void why(moat__frame_t *f, const char *fmt, ...) {
    va_list ap;

    if (f->why[0] != '\0')
        return; /* the first fault is the one worth reporting */
    va_start(ap, fmt);
    vsnprintf(f->why, sizeof f->why, fmt, ap);
    va_end(ap);
}

size_t moat__atom_utf8(const moat__atom_t *a, char *out, size_t cap) {
    size_t o = 0;

    if (!a->latin1) {
        size_t n = a->len < cap - 1 ? a->len : cap - 1;
        /* back off to the start of a character */
        if (n < a->len)
            while (n > 0 && ((unsigned char)a->name[n] & 0xC0) == 0x80)
                n--;
        memcpy(out, a->name, n);
        o = n;
    } else {
        for (size_t i = 0; i < a->len; i++) {
            unsigned char c = (unsigned char)a->name[i];
            if (c < 0x80) {
                if (o + 1 > cap - 1)
                    break;
                out[o++] = (char)c;
            } else {
                if (o + 2 > cap - 1)
                    break;
                out[o++] = (char)(0xC0 | c >> 6);
                out[o++] = (char)(0x80 | (c & 0x3F));
            }
        }
    }
    out[o] = '\0';
    return o;
}

/* Makes a term from its encoding without the version byte: a task's
 * argument list, a request, a server's id. */
static int etf_term(const unsigned char *list, size_t len, moat_term_t **out) {
    char stack[ARGS_STACK], *etf = stack;
    int err = 0;

    if (len > sizeof stack - 1) {
        etf = malloc(len + 1);
        if (etf == NULL)
            return UV_ENOMEM;
    }
    etf[0] = (char)ETF_VERSION;
    memcpy(etf + 1, list, len);
    *out = moat_term_new(etf, len + 1, &err);
    if (etf != stack)
        free(etf);
    return *out != NULL ? 0 : err;
}

/*
 * Reads Tag, Task, Args (the elements after `run` in a run frame, or the
 * elements of a runs frame's tuple), `n` of them, from r.  Returns 0 when
 * the tag was read (e->status then says whether the rest was good), -1
 * when not even the tag could be.
 */
static int read_run(rd_t *r, uint32_t n, int trusted, moat__frame_t *f,
                    moat__run_t *e) {
    size_t start;
    int rc;

    memset(e, 0, sizeof *e);
    e->status = MOAT_EBADTERM;
    if (n < 1 || read_u64(r, &e->tag) < 0) {
        why(f, "a task's tag is not an integer in 0..2^64-1");
        return -1;
    }
    if (n != 3) {
        why(f, "a task is not {Tag, Task, Args}");
        return 0;
    }
    if (read_atom(r, &e->task) < 0) {
        why(f, "task %llu: the task name is not an atom",
            (unsigned long long)e->tag);
        return 0;
    }
    start = r->pos;
    if (skip_proper_list(r) < 0) {
        why(f, "task %llu: the arguments are not a proper list",
            (unsigned long long)e->tag);
        return 0;
    }
    if (!trusted)
        return 0; /* the frame failed the check: nothing in it counts */
    rc = etf_term(r->p + start, r->pos - start, &e->args);
    if (rc == MOAT_EBADTERM)
        why(f, "task %llu: malformed arguments", (unsigned long long)e->tag);
    e->status = rc;
    return 0;
}

/* {run, Tag, Task, Args} after the atom. */
static void decode_run(rd_t *r, uint32_t arity, int trusted,
                       moat__frame_t *f) {
    f->runs = &f->one;
    if (read_run(r, arity - 1, trusted, f, &f->one) == 0)
        f->nruns = 1;
}

/* {runs, [{Tag, Task, Args}]} after the atom. */
static int decode_runs(rd_t *r, uint32_t arity, int trusted,
                       moat__frame_t *f) {
    uint32_t n, k;
    size_t end;
    rd_t el;

    if (arity != 2) {
        why(f, "a runs frame is not {runs, Tasks}");
        return 0;
    }
    if (peek(r) == TAG_NIL)
        return 0;
    if (peek(r) != TAG_LIST || !has(r, 5)) {
        why(f, "a runs frame's tasks are not a list");
        return 0;
    }
    n = moat__be32(r->p + r->pos + 1);
    r->pos += 5;
    /* Each element takes a byte at least: a count the frame cannot hold
     * is a lie, refused before anything is allocated for it. */
    if (n > r->len - r->pos) {
        why(f, "a runs frame's list is longer than the frame");
        n = (uint32_t)(r->len - r->pos);
    }
    f->runs = calloc(n > 0 ? n : 1, sizeof *f->runs);
    if (f->runs == NULL)
        return UV_ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        /* Each element is read within its own bounds, found by skipping
         * it, so a bad element cannot throw the next one off. */
        size_t start = r->pos;
        if (skip_term(r) < 0) {
            why(f, "a runs frame's element %u is malformed", i + 1);
            /* Its tag may still be readable, up to the frame's end. */
            end = r->len;
            el = (rd_t){r->p, end, start};
            if (read_tuple(&el, &k) == 0 &&
                read_run(&el, k, 0, f, &f->runs[f->nruns]) == 0)
                f->nruns++;
            else
                f->untagged++;
            f->untagged += n - i - 1;
            return 0;
        }
        end = r->pos;
        el = (rd_t){r->p, end, start};
        if (read_tuple(&el, &k) < 0) {
            why(f, "a runs frame's element %u is not a tuple", i + 1);
            f->untagged++;
            continue;
        }
        if (read_run(&el, k, trusted, f, &f->runs[f->nruns]) == 0)
            f->nruns++;
        else
            f->untagged++;
    }
    if (peek(r) != TAG_NIL)
        why(f, "a runs frame's list is not proper");
    return 0;
}

/* {cancel, Tag, Reason} after the atom. */
static void decode_cancel(rd_t *r, uint32_t arity, moat__frame_t *f) {
    moat__atom_t reason;

    if (arity != 3 || read_u64(r, &f->tag) < 0 ||
        read_atom(r, &reason) < 0) {
        why(f, "a cancel frame is not {cancel, Tag, Reason}");
        return;
    }
    f->reason = atom_is(&reason, "killed")    ? MOAT_A_KILLED
                : atom_is(&reason, "timeout") ? MOAT_A_TIMEOUT
                                              : MOAT_A_SHUTDOWN;
}

/* {call, Tag, Child, Request} (n == 3 after the atom, has_tag) or {cast,
 * Child, Request} (n == 2). */
static void decode_server_msg(rd_t *r, uint32_t n, int has_tag, int trusted,
                              moat__frame_t *f) {
    const char *what = has_tag ? "a call frame is not {call, Tag, Child, "
                                 "Request}"
                               : "a cast frame is not {cast, Child, Request}";
    uint64_t v;
    size_t start;
    int rc;

    if (has_tag) {
        if (n < 1 || read_u64(r, &f->tag) < 0) {
            why(f, "%s", what);
            return;
        }
        f->tagged = 1;
        n--;
    }
    if (n != 2 || read_u64(r, &v) < 0 || v > UINT32_MAX) {
        why(f, "%s", what);
        return;
    }
    f->child = (uint32_t)v;
    start = r->pos;
    if (skip_term(r) < 0) {
        why(f, "%s", what);
        return;
    }
    if (!trusted)
        return;
    rc = etf_term(r->p + start, r->pos - start, &f->msg);
    if (rc != 0)
        why(f, "%s", rc == UV_ENOMEM ? "no memory for the request"
                                      : "malformed request");
}

/* {which_children, Tag} and {count_children, Tag} after the atom. */
static void decode_query(rd_t *r, uint32_t arity, moat__frame_t *f) {
    if (arity >= 2 && read_u64(r, &f->tag) == 0)
        f->tagged = 1;
    if (arity != 2 || !f->tagged)
        why(f, "a query frame is not {which_children | count_children, "
               "Tag}");
}

/* A term as it is, for a child's id or start arguments: bounded by
 * skip_term, copied with a version byte.  Returns 0, -1 or UV_ENOMEM. */
static int read_term(rd_t *r, moat_term_t **out) {
    size_t start = r->pos;
    int rc;

    if (skip_term(r) < 0)
        return -1;
    rc = etf_term(r->p + start, r->pos - start, out);
    return rc == UV_ENOMEM ? rc : rc < 0 ? -1 : 0;
}

/* One element of `servers`, {Id, Lib, Server, Args, Restart, Shutdown},
 * into c.  Returns 0, -1 (f->why set) or UV_ENOMEM. */
static int hello_child(rd_t *r, moat__frame_t *f, uint32_t i,
                       moat__child_t *c) {
    moat__atom_t a;
    uint32_t arity;
    uint64_t v;
    size_t start;
    int rc;

    if (read_tuple(r, &arity) < 0 || arity != 6) {
        why(f, "server %u is not {Id, Lib, Server, Args, Restart, Shutdown}",
            i + 1);
        return -1;
    }
    if ((rc = read_term(r, &c->id)) != 0) {
        why(f, "server %u: malformed id", i + 1);
        return rc;
    }
    if (read_u64(r, &v) < 0 || v > UINT32_MAX) {
        why(f, "server %u: the library is not an index", i + 1);
        return -1;
    }
    c->lib = (uint32_t)v;
    if (read_atom(r, &c->server) < 0) {
        why(f, "server %u: the server's name is not an atom", i + 1);
        return -1;
    }
    start = r->pos;
    if (skip_proper_list(r) < 0) {
        why(f, "server %u: the start arguments are not a proper list", i + 1);
        return -1;
    }
    rc = etf_term(r->p + start, r->pos - start, &c->args);
    if (rc != 0) {
        why(f, "server %u: malformed start arguments", i + 1);
        return rc == UV_ENOMEM ? rc : -1;
    }
    if (read_atom(r, &a) < 0 ||
        !(atom_is(&a, "permanent") || atom_is(&a, "transient") ||
          atom_is(&a, "temporary"))) {
        why(f, "server %u: restart is not permanent, transient or temporary",
            i + 1);
        return -1;
    }
    c->restart = atom_is(&a, "permanent")   ? MOAT_PERMANENT
                 : atom_is(&a, "transient") ? MOAT_TRANSIENT
                                            : MOAT_TEMPORARY;
    start = r->pos;
    if (read_atom(r, &a) == 0) {
        if (!(atom_is(&a, "brutal_kill") || atom_is(&a, "infinity"))) {
            why(f, "server %u: shutdown is not brutal_kill, infinity or an "
                   "integer in 0..2^31-1", i + 1);
            return -1;
        }
        c->shutdown_ms = atom_is(&a, "brutal_kill") ? MOAT_SHUTDOWN_BRUTAL
                                                    : MOAT_SHUTDOWN_INFINITY;
    } else if (r->pos = start, read_u64(r, &v) == 0 && v <= INT32_MAX) {
        c->shutdown_ms = (int)v;
    } else {
        why(f, "server %u: shutdown is not brutal_kill, infinity or an "
               "integer in 0..2^31-1", i + 1);
        return -1;
    }
    return 0;
}

/* hello's `servers`: a list of child specs.  Each library index is
 * checked once the whole map is read (decode_hello). */
static int read_list(rd_t *r, uint32_t *n);

static int hello_servers(rd_t *r, moat__frame_t *f) {
    moat__hello_t *h = &f->hello;
    uint32_t n;
    int rc;

    if (h->servers != NULL) {
        why(f, "servers is given twice");
        return -1;
    }
    if (peek(r) == TAG_NIL) {
        r->pos++;
        return 0;
    }
    if (read_list(r, &n) != 0) {
        why(f, "servers is not a list");
        return -1;
    }
    h->servers = calloc(n > 0 ? n : 1, sizeof *h->servers);
    if (h->servers == NULL)
        return UV_ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        rc = hello_child(r, f, i, &h->servers[h->nservers]);
        /* Counted even when half made, so that moat__frame_free frees
         * what it holds. */
        h->nservers++;
        if (rc != 0)
            return rc;
    }
    if (peek(r) != TAG_NIL) {
        why(f, "servers is not a proper list");
        return -1;
    }
    r->pos++;
    return 0;
}

/* One option of hello's map; the cursor is at its value. */
static int hello_option(rd_t *r, const moat__atom_t *key, moat__frame_t *f) {
    moat__hello_t *h = &f->hello;
    moat__atom_t a;
    uint64_t v;

    if (atom_is(key, "size")) {
        if (read_u64(r, &v) < 0 || v < 1 || v > HELLO_MAX_SIZE) {
            why(f, "size is not an integer in 1..%d", HELLO_MAX_SIZE);
            return -1;
        }
        h->size = (unsigned)v;
    } else if (atom_is(key, "max_queue")) {
        if (read_u64(r, &v) < 0 || v > UINT32_MAX) {
            why(f, "max_queue is not an integer in 0..4294967295");
            return -1;
        }
        h->max_queue = (unsigned)v;
    } else if (atom_is(key, "isolation")) {
        if (read_atom(r, &a) < 0 ||
            !(atom_is(&a, "thread") || atom_is(&a, "process"))) {
            why(f, "isolation is not thread or process");
            return -1;
        }
        h->isolation = atom_is(&a, "thread") ? MOAT__ISOLATION_THREAD
                                             : MOAT__ISOLATION_PROCESS;
    } else if (atom_is(key, "max_memory")) {
        if (read_u64(r, &v) < 0) {
            why(f, "max_memory is not an integer in 0..2^64-1");
            return -1;
        }
        h->max_memory = v;
    } else if (atom_is(key, "spares")) {
        if (read_u64(r, &v) < 0 || v > HELLO_MAX_SIZE) {
            why(f, "spares is not an integer in 0..%d", HELLO_MAX_SIZE);
            return -1;
        }
        h->spares = (unsigned)v;
    } else if (atom_is(key, "max_restarts")) {
        if (read_u64(r, &v) < 0 || v > UINT32_MAX - 1) {
            why(f, "max_restarts is not an integer in 0..4294967294");
            return -1;
        }
        h->max_restarts = (unsigned)v;
    } else if (atom_is(key, "max_seconds")) {
        if (read_u64(r, &v) < 0 || v < 1 || v > UINT32_MAX / 1000) {
            why(f, "max_seconds is not an integer in 1..%u",
                UINT32_MAX / 1000);
            return -1;
        }
        h->max_seconds = (unsigned)v;
    } else if (atom_is(key, "strategy")) {
        if (read_atom(r, &a) < 0 ||
            !(atom_is(&a, "one_for_one") || atom_is(&a, "one_for_all") ||
              atom_is(&a, "rest_for_one"))) {
            why(f, "strategy is not one_for_one, one_for_all or "
                   "rest_for_one");
            return -1;
        }
        h->strategy = atom_is(&a, "one_for_one")   ? MOAT_ONE_FOR_ONE
                      : atom_is(&a, "one_for_all") ? MOAT_ONE_FOR_ALL
                                                   : MOAT_REST_FOR_ONE;
    } else if (atom_is(key, "servers")) {
        return hello_servers(r, f);
    } else if (atom_is(key, "name")) {
        if (read_atom(r, &a) < 0) {
            why(f, "name is not an atom");
            return -1;
        }
        moat__atom_utf8(&a, h->name, sizeof h->name);
    } else if (atom_is(key, "libraries")) {
        uint32_t n = 0;
        if (h->libraries != NULL) { /* a crafted map can repeat a key */
            why(f, "libraries is given twice");
            return -1;
        }
        if (peek(r) == TAG_NIL) {
            r->pos++;
            return 0;
        }
        if (read_list(r, &n) != 0) {
            why(f, "libraries is not a list of binaries");
            return -1;
        }
        h->libraries = calloc(n > 0 ? n : 1, sizeof *h->libraries);
        if (h->libraries == NULL)
            return UV_ENOMEM;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t blen;
            char *path;
            if (peek(r) != TAG_BINARY || !has(r, 5) ||
                !has(r, 5 + (size_t)(blen = moat__be32(r->p + r->pos + 1)))) {
                why(f, "libraries is not a list of binaries");
                return -1;
            }
            if (blen == 0 || memchr(r->p + r->pos + 5, 0, blen) != NULL) {
                why(f, "library %u's path is empty or holds a NUL byte",
                    i + 1);
                return -1;
            }
            path = malloc((size_t)blen + 1);
            if (path == NULL)
                return UV_ENOMEM;
            memcpy(path, r->p + r->pos + 5, blen);
            path[blen] = '\0';
            h->libraries[h->nlibraries++] = path;
            r->pos += 5 + (size_t)blen;
        }
        if (peek(r) != TAG_NIL) {
            why(f, "libraries is not a proper list");
            return -1;
        }
        r->pos++;
    } else if (skip_term(r) < 0) { /* an option this version ignores */
        why(f, "malformed option value");
        return -1;
    }
    return 0;
}

/* {hello, Opts} after the atom. */
static int decode_hello(rd_t *r, uint32_t arity, int trusted,
                        moat__frame_t *f) {
    uint32_t n;
    moat__atom_t key;
    int rc;

    if (arity != 2) {
        why(f, "a hello frame is not {hello, Opts}");
        return 0;
    }
    if (!trusted) /* options are all or nothing: nothing can be read */
        return 0;
    f->hello.spares = MOAT__HELLO_SPARES;
    f->hello.max_restarts = MOAT__HELLO_MAX_RESTARTS;
    f->hello.max_seconds = MOAT__HELLO_MAX_SECONDS;
    if (peek(r) != TAG_MAP || !has(r, 5)) {
        why(f, "hello's options are not a map");
        return 0;
    }
    n = moat__be32(r->p + r->pos + 1);
    r->pos += 5;
    for (uint32_t i = 0; i < n; i++) {
        if (read_atom(r, &key) < 0) { /* not an option: ignored */
            if (skip_term(r) < 0 || skip_term(r) < 0) {
                why(f, "malformed option");
                return 0;
            }
            continue;
        }
        rc = hello_option(r, &key, f);
        if (rc == UV_ENOMEM)
            return rc;
        if (rc < 0)
            return 0;
    }
    for (size_t i = 0; i < f->hello.nservers; i++)
        if (f->hello.servers[i].lib >= f->hello.nlibraries) {
            why(f, "server %zu: the library is not an index into libraries",
                i + 1);
            return 0;
        }
    return 0;
}

/* ---------------------------------------------------------------- API */

int moat__frame_decode(const char *buf, size_t len, moat__frame_t *f) {
    rd_t r = {(const unsigned char *)buf, len, 0};
    moat__atom_t kind;
    uint32_t arity;
    int check, trusted, rc = 0;

    memset(f, 0, sizeof *f);
    if (buf == NULL || len == 0) {
        why(f, "an empty frame");
        return MOAT_EBADTERM;
    }
    check = moat_etf_check(buf, len);
    if (check == UV_ENOMEM)
        return UV_ENOMEM;
    trusted = check == 0;
    if (!trusted)
        why(f, "not one well-formed term in the external term format");
    if (peek(&r) != ETF_VERSION || advance(&r, 1) < 0 ||
        read_tuple(&r, &arity) < 0 || arity < 1 ||
        read_atom(&r, &kind) < 0) {
        why(f, "not a tuple tagged with an atom");
        return MOAT_EBADTERM;
    }
    if (atom_is(&kind, "run")) {
        f->kind = MOAT__FRAME_RUN;
        decode_run(&r, arity, trusted, f);
    } else if (atom_is(&kind, "runs")) {
        f->kind = MOAT__FRAME_RUNS;
        rc = decode_runs(&r, arity, trusted, f);
    } else if (atom_is(&kind, "cancel")) {
        f->kind = MOAT__FRAME_CANCEL;
        decode_cancel(&r, arity, f);
    } else if (atom_is(&kind, "hello")) {
        f->kind = MOAT__FRAME_HELLO;
        rc = decode_hello(&r, arity, trusted, f);
    } else if (atom_is(&kind, "call")) {
        f->kind = MOAT__FRAME_CALL;
        decode_server_msg(&r, arity - 1, 1, trusted, f);
    } else if (atom_is(&kind, "cast")) {
        f->kind = MOAT__FRAME_CAST;
        decode_server_msg(&r, arity - 1, 0, trusted, f);
    } else if (atom_is(&kind, "which_children")) {
        f->kind = MOAT__FRAME_WHICH_CHILDREN;
        decode_query(&r, arity, f);
    } else if (atom_is(&kind, "count_children")) {
        f->kind = MOAT__FRAME_COUNT_CHILDREN;
        decode_query(&r, arity, f);
    } else if (atom_is(&kind, "stop_servers")) {
        f->kind = MOAT__FRAME_STOP_SERVERS;
        if (arity != 1)
            why(f, "a stop_servers frame is not {stop_servers}");
    } else {
        why(f, "an unknown kind of frame");
    }
    if (rc != 0)
        return rc;
    return f->why[0] != '\0' ? MOAT_EBADTERM : 0;
}

void moat__frame_free(moat__frame_t *f) {
    for (size_t i = 0; i < f->nruns; i++)
        moat_term_unref(f->runs[i].args);
    if (f->runs != &f->one)
        free(f->runs);
    for (size_t i = 0; i < f->hello.nlibraries; i++)
        free(f->hello.libraries[i]);
    free(f->hello.libraries);
    for (size_t i = 0; i < f->hello.nservers; i++) {
        moat_term_unref(f->hello.servers[i].id);
        moat_term_unref(f->hello.servers[i].args);
    }
    free(f->hello.servers);
    moat_term_unref(f->msg);
    memset(f, 0, sizeof *f);
}

/* ------------------------------------------------ frames from a worker */

static void wwhy(moat__wframe_t *f, const char *msg) {
    if (f->why[0] == '\0')
        snprintf(f->why, sizeof f->why, "%s", msg);
}

/* A proper list's header: its length (0 for []), the cursor at the first
 * element.  The count is bounded by the bytes left. */
static int read_list(rd_t *r, uint32_t *n) {
    if (peek(r) == TAG_NIL) {
        *n = 0;
        return 0;
    }
    if (peek(r) != TAG_LIST || !has(r, 5))
        return -1;
    *n = moat__be32(r->p + r->pos + 1);
    r->pos += 5;
    return *n <= r->len - r->pos ? 0 : -1;
}

static int read_nil(rd_t *r) {
    return peek(r) == TAG_NIL ? advance(r, 1) : -1;
}

static int wdecode_done(rd_t *r, moat__wframe_t *f) {
    uint32_t n, arity;
    moat__atom_t a;

    if (read_list(r, &n) < 0 || n == 0) {
        wwhy(f, "a done frame's outcomes are not a non-empty list");
        return MOAT_EBADTERM;
    }
    f->done = calloc(n, sizeof *f->done);
    if (f->done == NULL)
        return UV_ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        moat__wdone_t *d = &f->done[i];
        size_t start;
        if (read_tuple(r, &arity) < 0 || arity != 3 ||
            read_u64(r, &d->tag) < 0 || read_atom(r, &a) < 0 ||
            !(atom_is(&a, "ok") || atom_is(&a, "exit"))) {
            wwhy(f, "a done frame's outcome is not {Tag, ok | exit, Term}");
            return MOAT_EBADTERM;
        }
        d->kind = atom_is(&a, "ok") ? MOAT_OK : MOAT_EXIT;
        start = r->pos;
        if (skip_term(r) < 0) {
            wwhy(f, "a done frame's term is malformed");
            return MOAT_EBADTERM;
        }
        d->term = (const char *)r->p + start;
        d->len = r->pos - start;
        f->ndone++;
    }
    if (read_nil(r) < 0) {
        wwhy(f, "a done frame's list is not proper");
        return MOAT_EBADTERM;
    }
    return 0;
}

static int wdecode_stopped(rd_t *r, moat__wframe_t *f) {
    uint32_t n;

    if (read_list(r, &n) < 0 || n == 0) {
        wwhy(f, "a stopped frame's tags are not a non-empty list");
        return MOAT_EBADTERM;
    }
    f->tags = calloc(n, sizeof *f->tags);
    if (f->tags == NULL)
        return UV_ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        if (read_u64(r, &f->tags[i]) < 0) {
            wwhy(f, "a stopped frame's tag is not an integer");
            return MOAT_EBADTERM;
        }
        f->ntags++;
    }
    if (read_nil(r) < 0) {
        wwhy(f, "a stopped frame's list is not proper");
        return MOAT_EBADTERM;
    }
    return 0;
}

static int wdecode_log(rd_t *r, moat__wframe_t *f) {
    moat__atom_t a;
    uint32_t n;

    if (read_atom(r, &a) < 0 ||
        !(atom_is(&a, "error") || atom_is(&a, "warning") ||
          atom_is(&a, "info")) ||
        peek(r) != TAG_BINARY || !has(r, 5) ||
        !has(r, 5 + (size_t)(n = moat__be32(r->p + r->pos + 1)))) {
        wwhy(f, "a log frame is not {log, Level, Binary}");
        return MOAT_EBADTERM;
    }
    memcpy(f->level, a.name, a.len);
    f->level[a.len] = '\0';
    f->msg = (const char *)r->p + r->pos + 5;
    f->msg_len = n;
    r->pos += 5 + (size_t)n;
    return 0;
}

int moat__wframe_decode(const char *buf, size_t len, moat__wframe_t *f) {
    rd_t r = {(const unsigned char *)buf, len, 0};
    moat__atom_t kind;
    uint32_t arity;
    int check, rc;

    memset(f, 0, sizeof *f);
    if (buf == NULL || len == 0) {
        wwhy(f, "an empty frame");
        return MOAT_EBADTERM;
    }
    check = moat_etf_check(buf, len);
    if (check == UV_ENOMEM)
        return UV_ENOMEM;
    if (check != 0) {
        wwhy(f, "not one well-formed term in the external term format");
        return MOAT_EBADTERM;
    }
    if (peek(&r) != ETF_VERSION || advance(&r, 1) < 0 ||
        read_tuple(&r, &arity) < 0 || arity < 1 ||
        read_atom(&r, &kind) < 0) {
        wwhy(f, "not a tuple tagged with an atom");
        return MOAT_EBADTERM;
    }
    if (atom_is(&kind, "done") && arity == 2) {
        f->kind = MOAT__WFRAME_DONE;
        rc = wdecode_done(&r, f);
    } else if (atom_is(&kind, "stopped") && arity == 2) {
        f->kind = MOAT__WFRAME_STOPPED;
        rc = wdecode_stopped(&r, f);
    } else if (atom_is(&kind, "log") && arity == 3) {
        f->kind = MOAT__WFRAME_LOG;
        rc = wdecode_log(&r, f);
    } else if (atom_is(&kind, "ready") && arity == 3) {
        uint64_t pid;
        f->kind = MOAT__WFRAME_READY;
        rc = read_u64(&r, &pid) == 0 && skip_proper_list(&r) == 0
                 ? 0
                 : MOAT_EBADTERM;
        if (rc != 0)
            wwhy(f, "a ready frame is not {ready, Pid, Tasks}");
    } else if ((atom_is(&kind, "error") || atom_is(&kind, "gave_up")) &&
               arity == 2) {
        size_t start = r.pos;
        f->kind = atom_is(&kind, "error") ? MOAT__WFRAME_ERROR
                                          : MOAT__WFRAME_GAVE_UP;
        rc = skip_term(&r) == 0 ? 0 : MOAT_EBADTERM;
        if (rc != 0)
            wwhy(f, "an error or gave_up frame's reason is malformed");
        f->reason = buf + start;
        f->reason_len = r.pos - start;
    } else if (atom_is(&kind, "restarts") && arity == 2) {
        uint64_t total;
        f->kind = MOAT__WFRAME_RESTARTS;
        rc = read_u64(&r, &total) == 0 ? 0 : MOAT_EBADTERM;
        if (rc != 0)
            wwhy(f, "a restarts frame is not {restarts, Total}");
    } else if (atom_is(&kind, "crashed") && arity == 4) {
        uint64_t n;
        f->kind = MOAT__WFRAME_CRASHED;
        rc = read_u64(&r, &n) == 0 && n > 0 && skip_term(&r) == 0 &&
                     skip_term(&r) == 0
                 ? 0
                 : MOAT_EBADTERM;
        if (rc != 0)
            wwhy(f, "a crashed frame is not {crashed, N, Id, Reason}");
    } else if (atom_is(&kind, "servers_stopped") && arity == 1) {
        f->kind = MOAT__WFRAME_SERVERS_STOPPED;
        rc = 0;
    } else {
        wwhy(f, "an unknown kind of frame");
        rc = MOAT_EBADTERM;
    }
    if (rc == 0 && r.pos != r.len) {
        wwhy(f, "bytes after the term");
        rc = MOAT_EBADTERM;
    }
    return rc;
}

void moat__wframe_free(moat__wframe_t *f) {
    free(f->done);
    free(f->tags);
    memset(f, 0, sizeof *f);
}

/* ------------------------------------------------ distribution packets */

static int read_pid(rd_t *r, moat__pid_t *pid) {
    const unsigned char *p;
    int tag = peek(r);

    if ((tag != TAG_NEW_PID && tag != TAG_PID) || advance(r, 1) < 0 ||
        read_atom(r, &pid->node) < 0 || !has(r, tag == TAG_PID ? 9 : 12))
        return -1;
    p = r->p + r->pos;
    pid->num = moat__be32(p);
    pid->serial = moat__be32(p + 4);
    pid->creation = tag == TAG_PID ? p[8] : moat__be32(p + 8);
    r->pos += tag == TAG_PID ? 9 : 12;
    return 0;
}

static int read_small_op(rd_t *r, long *op) {
    uint64_t v;
    if (read_u64(r, &v) < 0 || v > 255)
        return -1;
    *op = (long)v;
    return 0;
}

/* The fields of control tuple {Op, ...} this node reads; *used says how
 * many elements, Op's included, were read. */
static int read_control(rd_t *r, uint32_t arity, moat__dist_msg_t *m,
                        uint32_t *used) {
    int tt = 0;

    switch (m->op) {
    case MOAT__OP_SEND_TT:
        tt = 1;
        /* fall through */
    case MOAT__OP_SEND: /* {SEND, Unused, ToPid} */
        m->kind = MOAT__DIST_SEND;
        *used = 1;
        return arity == 3u + (uint32_t)tt ? 0 : -1;
    case MOAT__OP_REG_SEND_TT:
        tt = 1;
        /* fall through */
    case MOAT__OP_REG_SEND: /* {REG_SEND, FromPid, Unused, ToName} */
        m->kind = MOAT__DIST_REG_SEND;
        *used = 4;
        return arity == 4u + (uint32_t)tt && read_pid(r, &m->from) == 0 &&
                       skip_term(r) == 0 && read_atom(r, &m->toname) == 0
                   ? 0
                   : -1;
    case MOAT__OP_EXIT_TT:
    case MOAT__OP_EXIT2_TT:
        tt = 1;
        /* fall through */
    case MOAT__OP_EXIT:
    case MOAT__OP_EXIT2: /* {EXIT, FromPid, ToPid, Reason} */
        m->kind = MOAT__DIST_EXIT;
        *used = 2;
        return arity == 4u + (uint32_t)tt && read_pid(r, &m->from) == 0
                   ? 0
                   : -1;
    case MOAT__OP_UNLINK_ID: { /* {UNLINK_ID, Id, FromPid, ToPid} */
        size_t start = r->pos;
        m->kind = MOAT__DIST_UNLINK_ID;
        *used = 4;
        if (arity != 4 || skip_term(r) < 0)
            return -1;
        m->id = (const char *)r->p + start;
        m->id_len = r->pos - start;
        return read_pid(r, &m->from) == 0 && read_pid(r, &m->to) == 0 ? 0
                                                                       : -1;
    }
    default:
        m->kind = MOAT__DIST_OTHER;
        *used = 1;
        return 0;
    }
}

int moat__dist_decode(const char *buf, size_t len, moat__dist_msg_t *m) {
    rd_t r = {(const unsigned char *)buf, len, 0};
    uint32_t arity, used;

    memset(m, 0, sizeof *m);
    if (len == 0) {
        m->kind = MOAT__DIST_TICK;
        return 0;
    }
    if (peek(&r) != MOAT__PASS_THROUGH || advance(&r, 1) < 0 ||
        peek(&r) != ETF_VERSION || advance(&r, 1) < 0 ||
        read_tuple(&r, &arity) < 0 || arity < 1 ||
        read_small_op(&r, &m->op) < 0 || read_control(&r, arity, m, &used) < 0)
        return MOAT_EBADTERM;
    if (m->kind == MOAT__DIST_OTHER)
        return 0; /* read no further: nothing here acts on it */
    for (; used < arity; used++)
        if (skip_term(&r) < 0)
            return MOAT_EBADTERM;
    if (m->kind != MOAT__DIST_SEND && m->kind != MOAT__DIST_REG_SEND)
        return r.pos == r.len ? 0 : MOAT_EBADTERM;
    /* The message: one term, version byte first, to the packet's end. */
    m->msg = buf + r.pos;
    m->msg_len = r.len - r.pos;
    if (peek(&r) != ETF_VERSION || advance(&r, 1) < 0 || skip_term(&r) < 0 ||
        r.pos != r.len)
        return MOAT_EBADTERM;
    return 0;
}
