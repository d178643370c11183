/*
 * fuzz_frame.c: libFuzzer target for moat__frame_decode (c_src/cnode/frame.c),
 * the C-node's decoder of the packets the VM sends (doc/cnode.md, "VM ->
 * C-node").
 *
 * Each input is one packet's bytes, as moat_cnode hands them to the decoder
 * once the 4-byte length is off.  That length step (parse() in
 * moat_cnode.c) is not exercised here: it is static and works on the
 * node's read buffer, its outbox and its pool, so no part of it can be
 * called without I/O.
 *
 * What it checks, with ASan and UBSan watching every read (libFuzzer hands
 * over a buffer of exactly the input's size, so a read one byte past it is
 * caught) and LeakSanitizer every allocation, and abort() (which libFuzzer
 * reports as a crash) wherever the contract in frame.h is broken:
 *
 *  - the decoder returns 0, MOAT_EBADTERM or UV_ENOMEM; 0 exactly when it
 *    gave no reason (f->why), and only for bytes moat_etf_check passes;
 *  - a run frame holds at most one entry, in f->one; only run and runs
 *    frames hold entries; entries and untagged elements are no more than
 *    the bytes that could carry them;
 *  - an entry to run (status 0) has a task atom inside the packet and
 *    arguments that are a checked term holding a list; any other entry has
 *    no arguments, and no entry of a packet the check refused runs;
 *  - moat__atom_utf8 stays within its buffer at every size, and cuts a
 *    checked UTF-8 name at a character boundary;
 *  - well-formed hello and cancel frames hold what frame.h says they hold,
 *    and hello's servers are within bounds, each with an id and start
 *    arguments that are checked terms (a list for the arguments) and a
 *    library index below the libraries' count;
 *  - a request (call, cast) is a checked term, held only by a call or cast
 *    frame that passed the check; a well-formed call or query is tagged;
 *  - moat__frame_free releases everything (LeakSanitizer) and is
 *    idempotent.
 *
 * The same bytes also go to moat__wframe_decode, the parent's decoder of
 * what a worker process sends (a task worker's or the servers' worker's
 * frames, as untrusted as the VM's are not): it returns 0 only for bytes
 * moat_etf_check passes, with a kind, and what it points at (outcome
 * terms, a log message, a reason) lies inside the packet.
 *
 * And to moat__dist_decode, the decoder of the distribution transport's
 * packets (dist.c): it returns 0 or MOAT_EBADTERM; a tick only for no
 * bytes; the pids, the name, an unlink's id and a send's message it
 * returns lie inside the packet, the message (version byte first) at its
 * end, and the atoms pass check_atom.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "frame.h"

static int inside(const char *p, size_t n, const char *buf, size_t len) {
    return p >= buf && n <= len && (size_t)(p - buf) <= len - n;
}

/* An atom read from the packet, and what moat__atom_utf8 makes of it. */
static void check_atom(const moat__atom_t *a, const char *buf, size_t len,
                       int trusted) {
    static const size_t caps[] = {1, 2, 3, 4, 7, 64, 1100};
    char out[1100];

    if (!inside(a->etf, a->etf_len, buf, len) ||
        !inside(a->name, a->len, a->etf, a->etf_len) ||
        a->name + a->len != a->etf + a->etf_len || a->etf_len < 2)
        abort();
    for (size_t i = 0; i < sizeof caps / sizeof caps[0]; i++) {
        size_t n;
        memset(out, 'Z', sizeof out);
        n = moat__atom_utf8(a, out, caps[i]);
        if (n >= caps[i] || out[n] != '\0')
            abort();
        /* ASan cannot see a write past caps[i] inside out: the fill can. */
        for (size_t j = caps[i]; j < sizeof out; j++)
            if (out[j] != 'Z')
                abort();
        /* A cut UTF-8 name ends before a character's first byte. */
        if (trusted && !a->latin1 && n < a->len &&
            ((unsigned char)a->name[n] & 0xC0) == 0x80)
            abort();
        /* Nothing was cut that fitted. */
        if (!a->latin1 && a->len < caps[i] && n != a->len)
            abort();
    }
}

static void check_run(const moat__run_t *e, const char *buf, size_t len,
                      int trusted) {
    const unsigned char *d;
    size_t dlen;

    if (e->status != 0) {
        if ((e->status != MOAT_EBADTERM && e->status != UV_ENOMEM) ||
            e->args != NULL)
            abort();
        return;
    }
    if (!trusted || e->args == NULL)
        abort();
    check_atom(&e->task, buf, len, trusted);
    d = (const unsigned char *)moat_term_data(e->args, &dlen);
    if (moat_etf_check((const char *)d, dlen) != 0 ||
        (d[1] != 106 && d[1] != 107 && d[1] != 108)) /* NIL, STRING, LIST */
        abort();
}

static void check_frame(int rc, const moat__frame_t *f, const char *buf,
                        size_t len) {
    int check = moat_etf_check(buf, len), trusted = check == 0;

    if (rc != 0 && rc != MOAT_EBADTERM && rc != UV_ENOMEM)
        abort();
    if (rc == UV_ENOMEM)
        return; /* the contract promises nothing else then */
    if (memchr(f->why, '\0', sizeof f->why) == NULL ||
        (rc == 0) != (f->why[0] == '\0'))
        abort();
    if (rc == 0 && (!trusted || f->kind == MOAT__FRAME_NONE))
        abort();

    switch (f->kind) {
    case MOAT__FRAME_RUN:
        if (f->nruns > 1 || f->untagged != 0 ||
            (f->nruns == 1 && f->runs != &f->one))
            abort();
        break;
    case MOAT__FRAME_RUNS:
        if (f->nruns + f->untagged > len)
            abort();
        break;
    default:
        if (f->nruns != 0 || f->untagged != 0)
            abort();
    }
    for (size_t i = 0; i < f->nruns; i++)
        check_run(&f->runs[i], buf, len, trusted);

    if (f->kind == MOAT__FRAME_HELLO) {
        const moat__hello_t *h = &f->hello;
        if (memchr(h->name, '\0', sizeof h->name) == NULL || h->size > 1024 ||
            (h->isolation != MOAT__ISOLATION_THREAD &&
             h->isolation != MOAT__ISOLATION_PROCESS) ||
            h->nlibraries > len || (h->nlibraries > 0 && h->libraries == NULL))
            abort();
        for (size_t i = 0; i < h->nlibraries; i++)
            if (h->libraries[i] == NULL || h->libraries[i][0] == '\0' ||
                strlen(h->libraries[i]) > len)
                abort();
    }
    if (f->kind == MOAT__FRAME_HELLO) {
        const moat__hello_t *h = &f->hello;
        if (h->nservers > len || (h->nservers > 0 && h->servers == NULL) ||
            (h->nservers > 0 && !trusted) ||
            (h->strategy != MOAT_ONE_FOR_ONE &&
             h->strategy != MOAT_ONE_FOR_ALL &&
             h->strategy != MOAT_REST_FOR_ONE))
            abort();
        for (size_t i = 0; rc == 0 && i < h->nservers; i++) {
            const moat__child_t *c = &h->servers[i];
            const unsigned char *d;
            size_t dlen;
            if (c->id == NULL || c->args == NULL || c->lib >= h->nlibraries ||
                c->shutdown_ms < MOAT_SHUTDOWN_INFINITY ||
                (c->restart != MOAT_PERMANENT &&
                 c->restart != MOAT_TRANSIENT &&
                 c->restart != MOAT_TEMPORARY))
                abort();
            check_atom(&c->server, buf, len, trusted);
            d = (const unsigned char *)moat_term_data(c->id, &dlen);
            if (moat_etf_check((const char *)d, dlen) != 0)
                abort();
            d = (const unsigned char *)moat_term_data(c->args, &dlen);
            if (moat_etf_check((const char *)d, dlen) != 0 ||
                (d[1] != 106 && d[1] != 107 && d[1] != 108))
                abort();
        }
    }
    if (f->msg != NULL) {
        const char *d;
        size_t dlen;
        if (!trusted ||
            (f->kind != MOAT__FRAME_CALL && f->kind != MOAT__FRAME_CAST))
            abort();
        d = moat_term_data(f->msg, &dlen);
        if (moat_etf_check(d, dlen) != 0)
            abort();
    }
    if (rc == 0 && (f->kind == MOAT__FRAME_CALL || f->kind == MOAT__FRAME_CAST) &&
        f->msg == NULL)
        abort();
    if (rc == 0 && !f->tagged &&
        (f->kind == MOAT__FRAME_CALL ||
         f->kind == MOAT__FRAME_WHICH_CHILDREN ||
         f->kind == MOAT__FRAME_COUNT_CHILDREN))
        abort();
    if (f->kind == MOAT__FRAME_CANCEL && rc == 0 &&
        f->reason != MOAT_A_SHUTDOWN && f->reason != MOAT_A_KILLED &&
        f->reason != MOAT_A_TIMEOUT)
        abort();
}

/* The contract of moat__wframe_decode (see the top). */
static void check_wframe(int rc, const moat__wframe_t *f, const char *buf,
                         size_t len) {
    if (rc != 0 && rc != MOAT_EBADTERM && rc != UV_ENOMEM)
        abort();
    if (rc != 0)
        return;
    if (f->kind == MOAT__WFRAME_NONE || moat_etf_check(buf, len) != 0)
        abort();
    for (size_t i = 0; i < f->ndone; i++)
        if (f->done[i].len == 0 ||
            !inside(f->done[i].term, f->done[i].len, buf, len))
            abort();
    if (f->kind == MOAT__WFRAME_LOG && !inside(f->msg, f->msg_len, buf, len))
        abort();
    if ((f->kind == MOAT__WFRAME_ERROR || f->kind == MOAT__WFRAME_GAVE_UP) &&
        (f->reason_len == 0 || !inside(f->reason, f->reason_len, buf, len)))
        abort();
}

/* The contract of moat__dist_decode (see the top). */
static void check_dist(int rc, const moat__dist_msg_t *m, const char *buf,
                       size_t len) {
    if (rc != 0 && rc != MOAT_EBADTERM)
        abort();
    if (rc != 0)
        return;
    if ((m->kind == MOAT__DIST_TICK) != (len == 0))
        abort();
    if (m->kind == MOAT__DIST_REG_SEND || m->kind == MOAT__DIST_EXIT ||
        m->kind == MOAT__DIST_UNLINK_ID)
        check_atom(&m->from.node, buf, len, 0);
    if (m->kind == MOAT__DIST_UNLINK_ID &&
        (m->id_len == 0 || !inside(m->id, m->id_len, buf, len)))
        abort();
    if (m->kind == MOAT__DIST_UNLINK_ID)
        check_atom(&m->to.node, buf, len, 0);
    if (m->kind == MOAT__DIST_REG_SEND)
        check_atom(&m->toname, buf, len, 0);
    if (m->kind == MOAT__DIST_SEND || m->kind == MOAT__DIST_REG_SEND) {
        if (m->msg_len < 2 || !inside(m->msg, m->msg_len, buf, len) ||
            m->msg + m->msg_len != buf + len ||
            (unsigned char)m->msg[0] != 131)
            abort();
    } else if (m->msg != NULL || m->msg_len != 0) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *buf = (const char *)data;
    static const moat__frame_t empty;
    moat__frame_t f;
    moat__wframe_t w;
    moat__dist_msg_t d;
    int rc;

    rc = moat__frame_decode(buf, size, &f);
    check_frame(rc, &f, buf, size);
    moat__frame_free(&f);
    if (memcmp(&f, &empty, sizeof f) != 0)
        abort();
    moat__frame_free(&f);
    rc = moat__wframe_decode(buf, size, &w);
    check_wframe(rc, &w, buf, size);
    moat__wframe_free(&w);
    rc = moat__dist_decode(buf, size, &d);
    check_dist(rc, &d, buf, size);
    return 0;
}
