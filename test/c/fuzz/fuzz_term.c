/*
 * fuzz_term.c: libFuzzer target for moat_etf_check (c_src/core/term.c), the
 * one gate between bytes from the wire and ei, which trusts its input.
 *
 * Each input is a candidate term, version byte first.  What it checks, with
 * ASan and UBSan watching every read of the check, and abort() (which
 * libFuzzer reports as a crash) wherever a promise is broken:
 *
 *  - the check returns 0, MOAT_EBADTERM or UV_ENOMEM, and never reads
 *    outside the input;
 *  - moat_term_new agrees with it: it accepts exactly what the check
 *    accepts, copies those bytes unchanged, and otherwise returns NULL with
 *    the check's error;
 *  - on every accepted term ei_skip_term, started after the version byte,
 *    succeeds and consumes exactly the whole buffer (ei itself is not
 *    instrumented: this is how a check too lax for ei shows);
 *  - the facts a term computes once (which well-known atom it is, whether
 *    it is an abnormal exit reason) agree with what ei decodes, and are the
 *    same whether the term was made by moat_term_new or moat_term_bare.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "moat_core.h"

/* The well-known atoms' names, in moat_atom_t order (term.c's ATOM_MAP). */
static const char *const atom_names[MOAT_A__COUNT] = {
    [MOAT_A_NORMAL] = "normal",
    [MOAT_A_SHUTDOWN] = "shutdown",
    [MOAT_A_KILL] = "kill",
    [MOAT_A_KILLED] = "killed",
    [MOAT_A_NOPROC] = "noproc",
    [MOAT_A_TIMEOUT] = "timeout",
    [MOAT_A_OVERLOADED] = "overloaded",
    [MOAT_A_BADARG] = "badarg",
    [MOAT_A_NOCONNECTION] = "noconnection",
    [MOAT_A_OK] = "ok",
    [MOAT_A_ENOMEM] = "enomem",
};

/* Whether the term at *index is an atom named `want` (ASCII), by ei; moves
 * *index past it if it is an atom.  An atom may hold NUL bytes, so the
 * name's encoded length is compared too. */
static int ei_atom_is(const char *buf, int *index, const char *want) {
    char name[MAXATOMLEN_UTF8];
    int type, size;

    if (ei_get_type(buf, index, &type, &size) != 0 ||
        (type != ERL_ATOM_EXT && type != ERL_SMALL_ATOM_EXT &&
         type != ERL_ATOM_UTF8_EXT && type != ERL_SMALL_ATOM_UTF8_EXT) ||
        ei_decode_atom_as(buf, index, name, sizeof name, ERLANG_UTF8, NULL,
                          NULL) != 0)
        return 0;
    return (size_t)size == strlen(want) && strcmp(name, want) == 0;
}

/* The well-known atom a checked term is, by ei, or -1. */
static int expected_atom(const char *buf, size_t len) {
    for (int a = 0; a < MOAT_A__COUNT; a++) {
        int index = 1;
        if (ei_atom_is(buf, &index, atom_names[a]) && (size_t)index == len)
            return a;
    }
    return -1;
}

/* Whether a checked term is an abnormal exit reason, by ei: all but
 * `normal`, `shutdown` and {shutdown, _}. */
static int expected_abnormal(const char *buf, size_t len) {
    int index = 1, arity, a = expected_atom(buf, len);

    if (a == MOAT_A_NORMAL || a == MOAT_A_SHUTDOWN)
        return 0;
    if (ei_decode_tuple_header(buf, &index, &arity) == 0 && arity == 2 &&
        ei_atom_is(buf, &index, "shutdown"))
        return 0;
    return 1;
}

static void check_facts(const moat_term_t *t, const char *buf, size_t len) {
    int atom = expected_atom(buf, len);

    for (int a = 0; a < MOAT_A__COUNT; a++)
        if (moat_term_is(t, (moat_atom_t)a) != (a == atom))
            abort();
    if (moat_term_is_abnormal(t) != expected_abnormal(buf, len))
        abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    ei_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *buf = (const char *)data;
    moat_term_t *t, *bare;
    const char *copy;
    size_t clen;
    int rc, err = 12345, index = 1;

    rc = moat_etf_check(buf, size);
    if (rc != 0 && rc != MOAT_EBADTERM && rc != UV_ENOMEM)
        abort();

    t = moat_term_new(buf, size, &err);
    if (rc != 0) {
        if (t != NULL || err != rc)
            abort();
        return 0;
    }
    if (t == NULL) {
        if (err == UV_ENOMEM) /* allowed by the contract */
            return 0;
        abort();
    }
    if (err != 0)
        abort();
    copy = moat_term_data(t, &clen);
    if (clen != size || memcmp(copy, buf, size) != 0)
        abort();

    /* The promise callers rely on: ei can walk what the check passed, to
     * exactly its end. */
    if (ei_skip_term(buf, &index) != 0 || index < 0 || (size_t)index != size)
        abort();

    check_facts(t, buf, size);
    if (!moat_term_equal(t, t))
        abort();
    bare = moat_term_bare(buf + 1, size - 1);
    if (bare != NULL) {
        if (!moat_term_equal(t, bare) ||
            moat_term_is_abnormal(bare) != moat_term_is_abnormal(t))
            abort();
        check_facts(bare, buf, size);
        moat_term_unref(bare);
    }
    moat_term_unref(t);
    return 0;
}
