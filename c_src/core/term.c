/*
 * term.c: immutable, reference-counted ETF blobs, and the validator every
 * blob from outside passes before anything decodes it.
 *
 * A term is its bytes plus a header: the reference count, where the bytes
 * live (inline after the header, or memory someone else releases), and two
 * facts computed once at creation because the signal code asks them on
 * every exit: which well-known atom the term is, if any, and whether it is
 * an abnormal exit reason.  Terms never change after creation, so any
 * thread may read one; only the count is shared state (C11 atomics).  The
 * well-known atoms are static objects whose count is never touched.
 *
 * moat_etf_check is the one gate between untrusted bytes and ei, whose
 * decoders take no length and trust the encoding: a lying length or a
 * wrong NEW_FUN_EXT size sends them past the end of the buffer, and
 * ei_skip_term recurses once per level of nesting.  The check therefore
 * reads with bounds everywhere, keeps its own stack of open containers
 * (nesting is capped at MAX_DEPTH so ei's recursion stays bounded), never
 * allocates in proportion to a length the input claims, and insists on
 * exactly one term filling the buffer.
 */
#include <locale.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "etf.h"
#include "moat_core.h"

/* The BEAM's limit on an atom, in characters (bytes for latin1). */
#define ATOM_MAX_CHARS 255

/* A reference carries at most five 32-bit words (ERTS_MAX_REF_NUMBERS). */
#define REF_MAX_WORDS 5

/* The text of an old FLOAT_EXT is a fixed 31-byte field. */
#define OLD_FLOAT_LEN 31

/* How deep containers may nest.  ei_skip_term and ei_print_term recurse
 * once per level, so this bounds their stack use on any checked term. */
#define MAX_DEPTH 10000

/* Open containers the check tracks on the C stack before it allocates:
 * enough for every term seen in practice. */
#define LOCAL_FRAMES 64

/* -------------------------------------------------------------- terms */

#define TERM_STATIC 1u   /* a well-known atom: never counted, never freed */
#define TERM_ABNORMAL 2u /* moat_term_is_abnormal's answer */

struct moat_term_s {
    atomic_size_t refs;
    unsigned flags;
    int atom; /* the moat_atom_t this term is, or -1 */
    const char *data;
    size_t len;
    void (*release)(void *opaque); /* NULL: nothing to release */
    void *opaque;
    char bytes[]; /* the copy, for terms moat allocated */
};

/* The well-known atoms, their names and whether each is an abnormal exit
 * reason (REFERENCE.md E9: all but normal and shutdown). */
#define ATOM_MAP(XX)                                                        \
    XX(NORMAL, "normal", 0)                                                 \
    XX(SHUTDOWN, "shutdown", 0)                                             \
    XX(KILL, "kill", 1)                                                     \
    XX(KILLED, "killed", 1)                                                 \
    XX(NOPROC, "noproc", 1)                                                 \
    XX(TIMEOUT, "timeout", 1)                                               \
    XX(OVERLOADED, "overloaded", 1)                                         \
    XX(BADARG, "badarg", 1)                                                 \
    XX(NOCONNECTION, "noconnection", 1)                                     \
    XX(OK, "ok", 1)                                                         \
    XX(ENOMEM, "enomem", 1)

enum {
#define XX(id, name, abnormal) ATOM_COUNT_##id,
    ATOM_MAP(XX)
#undef XX
    ATOM_MAP_COUNT
};
_Static_assert((int)ATOM_MAP_COUNT == (int)MOAT_A__COUNT,
               "ATOM_MAP must list every moat_atom_t");

/* A static atom's ETF, encoded as ei encodes atoms (SMALL_ATOM_UTF8_EXT):
 * version, tag, length, then the name. */
typedef struct {
    unsigned char head[3];
    char name[13];
} atom_etf_t;
_Static_assert(offsetof(atom_etf_t, name) == 3, "atom_etf_t has padding");

static const atom_etf_t atom_etf[MOAT_A__COUNT] = {
#define XX(id, text, abnormal)                                              \
    [MOAT_A_##id] = {{ETF_VERSION, TAG_SMALL_ATOM_UTF8, sizeof(text) - 1},  \
                     text},
    ATOM_MAP(XX)
#undef XX
};

static const struct {
    const char *name;
    size_t len;
} atom_names[MOAT_A__COUNT] = {
#define XX(id, text, abnormal) [MOAT_A_##id] = {text, sizeof(text) - 1},
    ATOM_MAP(XX)
#undef XX
};

static moat_term_t atoms[MOAT_A__COUNT] = {
#define XX(id, text, abnormal)                                              \
    [MOAT_A_##id] = {.flags = TERM_STATIC | ((abnormal) ? TERM_ABNORMAL : 0), \
                     .atom = MOAT_A_##id,                                   \
                     .data = (const char *)&atom_etf[MOAT_A_##id],          \
                     .len = 3 + sizeof(text) - 1},
    ATOM_MAP(XX)
#undef XX
};

static uint32_t get16(const unsigned char *p) {
    return (uint32_t)p[0] << 8 | p[1];
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
}

/* Reads an atom of any encoding at p[*pos..len) into (name, nlen) and
 * moves *pos past it.  Bounds only: the name's bytes are not validated. */
static int read_atom(const unsigned char *p, size_t len, size_t *pos,
                     const unsigned char **name, size_t *nlen) {
    size_t at = *pos, head, n;

    if (at >= len)
        return -1;
    switch (p[at]) {
    case TAG_ATOM:
    case TAG_ATOM_UTF8:
        if (len - at < 3)
            return -1;
        head = 3;
        n = get16(p + at + 1);
        break;
    case TAG_SMALL_ATOM:
    case TAG_SMALL_ATOM_UTF8:
        if (len - at < 2)
            return -1;
        head = 2;
        n = p[at + 1];
        break;
    default:
        return -1;
    }
    if (len - at - head < n)
        return -1;
    *name = p + at + head;
    *nlen = n;
    *pos = at + head + n;
    return 0;
}

/* Strict UTF-8 (no overlong forms, no surrogates, at most U+10FFFF) of at
 * most ATOM_MAX_CHARS code points, as the BEAM requires of an atom. */
static int utf8_atom_ok(const unsigned char *s, size_t n) {
    size_t i = 0, chars, k, j;
    uint32_t cp, min;

    /* Most atoms are ASCII: that run costs one compare a byte (every
     * crash reason {native_error, _} passes here). */
    while (i < n && s[i] < 0x80)
        i++;
    chars = i;
    if (chars > ATOM_MAX_CHARS)
        return -1;
    while (i < n) {
        if (s[i] < 0x80) {
            k = 1;
            cp = s[i];
            min = 0;
        } else if ((s[i] & 0xE0) == 0xC0) {
            k = 2;
            cp = s[i] & 0x1F;
            min = 0x80;
        } else if ((s[i] & 0xF0) == 0xE0) {
            k = 3;
            cp = s[i] & 0x0F;
            min = 0x800;
        } else if ((s[i] & 0xF8) == 0xF0) {
            k = 4;
            cp = s[i] & 0x07;
            min = 0x10000;
        } else {
            return -1;
        }
        if (n - i < k)
            return -1;
        for (j = 1; j < k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return -1;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return -1;
        i += k;
        if (++chars > ATOM_MAX_CHARS)
            return -1;
    }
    return 0;
}

static int name_is(const unsigned char *name, size_t nlen, moat_atom_t a) {
    return nlen == atom_names[a].len &&
           memcmp(name, atom_names[a].name, nlen) == 0;
}

/* Computes the cached facts.  Bounds-checked, so it is safe on bytes that
 * were never validated (moat_term_from_x): those are abnormal. */
static void classify(moat_term_t *t) {
    const unsigned char *p = (const unsigned char *)t->data;
    const unsigned char *name;
    size_t len = t->len, pos = 1, nlen;
    uint32_t arity;
    int a;

    t->atom = -1;
    t->flags |= TERM_ABNORMAL;
    if (len < 2 || p[0] != ETF_VERSION)
        return;
    if (read_atom(p, len, &pos, &name, &nlen) == 0) {
        if (pos != len)
            return;
        for (a = 0; a < MOAT_A__COUNT; a++) {
            if (name_is(name, nlen, (moat_atom_t)a)) {
                t->atom = a;
                if (a == MOAT_A_NORMAL || a == MOAT_A_SHUTDOWN)
                    t->flags &= ~TERM_ABNORMAL;
                return;
            }
        }
        return;
    }
    if (p[1] == TAG_SMALL_TUPLE && len >= 3) {
        arity = p[2];
        pos = 3;
    } else if (p[1] == TAG_LARGE_TUPLE && len >= 6) {
        arity = get32(p + 2);
        pos = 6;
    } else {
        return;
    }
    if (arity == 2 && read_atom(p, len, &pos, &name, &nlen) == 0 &&
        name_is(name, nlen, MOAT_A_SHUTDOWN))
        t->flags &= ~TERM_ABNORMAL;
}

static void init(moat_term_t *t, const char *data, size_t len,
                 void (*release)(void *), void *opaque) {
    atomic_init(&t->refs, 1);
    t->flags = 0;
    t->data = data;
    t->len = len;
    t->release = release;
    t->opaque = opaque;
    classify(t);
}

static moat_term_t *alloc_inline(size_t len) {
    if (len > SIZE_MAX - sizeof(moat_term_t))
        return NULL;
    return malloc(sizeof(moat_term_t) + len);
}

moat_term_t *moat_atom(moat_atom_t a) {
    if ((unsigned)a >= MOAT_A__COUNT)
        return NULL;
    return &atoms[a];
}

moat_term_t *moat_term_new(const char *etf, size_t len, int *err) {
    moat_term_t *t;
    int rc;

    rc = moat_etf_check(etf, len);
    if (rc != 0)
        goto fail;
    t = alloc_inline(len);
    if (t == NULL) {
        rc = UV_ENOMEM;
        goto fail;
    }
    memcpy(t->bytes, etf, len);
    init(t, t->bytes, len, NULL, NULL);
    if (err != NULL)
        *err = 0;
    return t;

fail:
    if (err != NULL)
        *err = rc;
    return NULL;
}

moat_term_t *moat_term_list1(const char *elem, size_t len) {
    static const char head[] = {(char)131, 108, 0, 0, 0, 1};
    moat_term_t *t;
    if (len > SIZE_MAX - sizeof head - 1 ||
        (t = alloc_inline(sizeof head + len + 1)) == NULL)
        return NULL;
    memcpy(t->bytes, head, sizeof head);
    memcpy(t->bytes + sizeof head, elem, len);
    t->bytes[sizeof head + len] = 106; /* NIL_EXT */
    init(t, t->bytes, sizeof head + len + 1, NULL, NULL);
    return t;
}

moat_term_t *moat_term_bare(const char *elem, size_t len) {
    moat_term_t *t;
    if (len > SIZE_MAX - 1 || (t = alloc_inline(len + 1)) == NULL)
        return NULL;
    t->bytes[0] = (char)131; /* VERSION_MAGIC */
    memcpy(t->bytes + 1, elem, len);
    init(t, t->bytes, len + 1, NULL, NULL);
    return t;
}

moat_term_t *moat_term_wrap(const char *etf, size_t len,
                            void (*release)(void *opaque), void *opaque) {
    moat_term_t *t = malloc(sizeof(*t));

    if (t == NULL)
        return NULL;
    init(t, etf, len, release, opaque);
    return t;
}

/* ei allocates an ei_x_buff's memory, so ei frees it. */
static void free_x_memory(void *buff) {
    ei_x_buff x = {buff, 0, 0};
    ei_x_free(&x);
}

moat_term_t *moat_term_from_x(ei_x_buff *x) {
    moat_term_t *t;

    if (x == NULL || x->buff == NULL || x->index < 0)
        return NULL;
    t = malloc(sizeof(*t));
    if (t == NULL)
        return NULL;
    init(t, x->buff, (size_t)x->index, free_x_memory, x->buff);
    x->buff = NULL;
    x->buffsz = 0;
    x->index = 0;
    return t;
}

moat_term_t *moat_term_tagged_binary(const char *tag, const char *msg,
                                     size_t len) {
    size_t taglen, size;
    moat_term_t *t;
    unsigned char *p;

    if (tag == NULL || (msg == NULL && len > 0))
        return NULL;
    taglen = strlen(tag);
    if (taglen > 255 || len > UINT32_MAX ||
        utf8_atom_ok((const unsigned char *)tag, taglen) != 0)
        return NULL;
    /* version, {, 2, atom tag, atom length, name, binary tag, length, data */
    size = 1 + 2 + 2 + taglen + 5;
    if (len > SIZE_MAX - size)
        return NULL;
    size += len;
    t = alloc_inline(size);
    if (t == NULL)
        return NULL;
    p = (unsigned char *)t->bytes;
    *p++ = ETF_VERSION;
    *p++ = TAG_SMALL_TUPLE;
    *p++ = 2;
    *p++ = TAG_SMALL_ATOM_UTF8;
    *p++ = (unsigned char)taglen;
    memcpy(p, tag, taglen);
    p += taglen;
    *p++ = TAG_BINARY;
    *p++ = (unsigned char)(len >> 24);
    *p++ = (unsigned char)(len >> 16);
    *p++ = (unsigned char)(len >> 8);
    *p++ = (unsigned char)len;
    if (len > 0)
        memcpy(p, msg, len);
    init(t, t->bytes, size, NULL, NULL);
    return t;
}

moat_term_t *moat_term_ref(moat_term_t *t) {
    if (t != NULL && !(t->flags & TERM_STATIC))
        atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
    return t;
}

void moat_term_unref(moat_term_t *t) {
    if (t == NULL || (t->flags & TERM_STATIC))
        return;
    /* acq_rel: the thread that frees must see every other thread's reads
     * of the term finished. */
    if (atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (t->release != NULL)
        t->release(t->opaque);
    free(t);
}

const char *moat_term_data(const moat_term_t *t, size_t *len) {
    if (len != NULL)
        *len = t->len;
    return t->data;
}

int moat_term_is_abnormal(const moat_term_t *t) {
    return (t->flags & TERM_ABNORMAL) != 0;
}

int moat_term_is(const moat_term_t *t, moat_atom_t a) {
    return t != NULL && (unsigned)a < MOAT_A__COUNT && t->atom == (int)a;
}

int moat_term_equal(const moat_term_t *a, const moat_term_t *b) {
    if (a == b)
        return 1;
    return a->len == b->len && memcmp(a->data, b->data, a->len) == 0;
}

/* -------------------------------------------------------------- check */

typedef struct {
    const unsigned char *p;
    size_t len;
    size_t pos; /* always <= len */
} reader_t;

/* An open container: how many terms it still needs, and for a fun the
 * offset its free variables must end at (its Size field), else 0. */
typedef struct {
    uint64_t left;
    size_t end;
} frame_t;

static int need(const reader_t *r, size_t n) {
    return r->len - r->pos >= n;
}

static int skip(reader_t *r, size_t n) {
    if (!need(r, n))
        return -1;
    r->pos += n;
    return 0;
}

static int check_atom(reader_t *r) {
    const unsigned char *name;
    size_t nlen;
    unsigned char tag;

    if (!need(r, 1))
        return -1;
    tag = r->p[r->pos];
    if (read_atom(r->p, r->len, &r->pos, &name, &nlen) < 0)
        return -1;
    if (tag == TAG_ATOM || tag == TAG_SMALL_ATOM)
        return nlen <= ATOM_MAX_CHARS ? 0 : -1; /* latin1: a byte a char */
    return utf8_atom_ok(name, nlen);
}

/* The text of an old FLOAT_EXT as the BEAM reads it: [+-]d+.d+[e[+-]d+],
 * then NUL padding (anything after the first NUL is ignored), and finite.
 * Unlike the BEAM we insist on a NUL inside the field: ei_decode_double
 * reads it with sscanf, which would run on past an unterminated field.
 * strtod_l in the C locale, because the process's locale may use a comma. */
static int check_old_float(const unsigned char *s) {
    char text[OLD_FLOAT_LEN + 1];
    size_t i = 0, digits;
    locale_t c;
    double d;

    if (s[i] == '+' || s[i] == '-')
        i++;
    for (digits = 0; i < OLD_FLOAT_LEN && s[i] >= '0' && s[i] <= '9'; i++)
        digits++;
    if (digits == 0 || i == OLD_FLOAT_LEN || s[i++] != '.')
        return -1;
    for (digits = 0; i < OLD_FLOAT_LEN && s[i] >= '0' && s[i] <= '9'; i++)
        digits++;
    if (digits == 0)
        return -1;
    if (i < OLD_FLOAT_LEN && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < OLD_FLOAT_LEN && (s[i] == '+' || s[i] == '-'))
            i++;
        for (digits = 0; i < OLD_FLOAT_LEN && s[i] >= '0' && s[i] <= '9';
             i++)
            digits++;
        if (digits == 0)
            return -1;
    }
    if (i == OLD_FLOAT_LEN || s[i] != '\0')
        return -1;
    memcpy(text, s, i);
    text[i] = '\0';
    c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (c == (locale_t)0)
        return -1;
    d = strtod_l(text, NULL, c);
    freelocale(c);
    return isfinite(d) ? 0 : -1;
}

/* OldIndex and OldUniq of a fun: SMALL_INTEGER_EXT or INTEGER_EXT. */
static int check_integer(reader_t *r) {
    if (!need(r, 1))
        return -1;
    switch (r->p[r->pos]) {
    case TAG_SMALL_INTEGER:
        return skip(r, 2);
    case TAG_INTEGER:
        return skip(r, 5);
    default:
        return -1;
    }
}

static int check_pid(reader_t *r) {
    unsigned char tag;

    if (!need(r, 1))
        return -1;
    tag = r->p[r->pos];
    if (tag != TAG_PID && tag != TAG_NEW_PID)
        return -1;
    r->pos++;
    if (check_atom(r) < 0)
        return -1;
    /* ID and Serial, then Creation: one byte (PID_EXT) or four */
    return skip(r, 8 + (tag == TAG_PID ? 1 : 4));
}

/* NEW_FUN_EXT up to its free variables.  Size counts from the Size field to
 * the end of the fun; ei skips free variables by it, so it must be exact. */
static int check_fun_head(reader_t *r, uint64_t *children, size_t *end) {
    /* tag, Size, Arity, Uniq, Index, NumFree */
    const size_t fixed = 1 + 4 + 1 + 16 + 4 + 4;
    size_t start = r->pos + 1, fun_end;
    uint32_t size, nfree;

    if (!need(r, fixed))
        return -1;
    size = get32(r->p + start);
    if (size > r->len - start)
        return -1;
    fun_end = start + size;
    nfree = get32(r->p + r->pos + fixed - 4);
    r->pos += fixed;
    if (check_atom(r) < 0 || check_integer(r) < 0 || check_integer(r) < 0 ||
        check_pid(r) < 0 || r->pos > fun_end)
        return -1;
    if (nfree == 0)
        return r->pos == fun_end ? 0 : -1;
    *children = nfree;
    *end = fun_end;
    return 0;
}

/* EXPORT_EXT: Module, Function, Arity (0..255, small or 32-bit integer). */
static int check_export(reader_t *r) {
    r->pos++;
    if (check_atom(r) < 0 || check_atom(r) < 0 || !need(r, 1))
        return -1;
    if (r->p[r->pos] == TAG_SMALL_INTEGER)
        return skip(r, 2);
    if (r->p[r->pos] == TAG_INTEGER && need(r, 5) &&
        get32(r->p + r->pos + 1) <= 255)
        return skip(r, 5);
    return -1;
}

/* NEW_REFERENCE_EXT and NEWER_REFERENCE_EXT: Len, Node, Creation (one byte
 * or four), then Len 32-bit words. */
static int check_ref(reader_t *r, size_t creation) {
    uint32_t words;

    if (!need(r, 3))
        return -1;
    words = get16(r->p + r->pos + 1);
    if (words == 0 || words > REF_MAX_WORDS)
        return -1;
    r->pos += 3;
    if (check_atom(r) < 0)
        return -1;
    return skip(r, creation + 4 * (size_t)words);
}

/*
 * Reads one term's head at r->pos and everything in it that is not itself
 * a term.  On return *children is how many terms follow as its contents (0
 * for a complete term) and *end the offset a fun must end at.
 */
static int check_head(reader_t *r, uint64_t *children, size_t *end) {
    const unsigned char *p;
    uint64_t bits;
    uint32_t n;

    *children = 0;
    *end = 0;
    if (!need(r, 1))
        return -1;
    p = r->p + r->pos;
    switch (p[0]) {
    case TAG_SMALL_INTEGER:
        return skip(r, 2);
    case TAG_INTEGER:
        return skip(r, 5);
    case TAG_FLOAT:
        if (!need(r, 1 + OLD_FLOAT_LEN) || check_old_float(p + 1) < 0)
            return -1;
        return skip(r, 1 + OLD_FLOAT_LEN);
    case TAG_NEW_FLOAT:
        if (!need(r, 9))
            return -1;
        bits = (uint64_t)get32(p + 1) << 32 | get32(p + 5);
        if ((bits >> 52 & 0x7FF) == 0x7FF) /* the BEAM has no inf or NaN */
            return -1;
        return skip(r, 9);
    case TAG_ATOM:
    case TAG_SMALL_ATOM:
    case TAG_ATOM_UTF8:
    case TAG_SMALL_ATOM_UTF8:
        return check_atom(r);
    case TAG_SMALL_TUPLE:
        if (skip(r, 2) < 0)
            return -1;
        *children = p[1];
        break;
    case TAG_LARGE_TUPLE:
        if (skip(r, 5) < 0)
            return -1;
        *children = get32(p + 1);
        break;
    case TAG_MAP:
        if (skip(r, 5) < 0)
            return -1;
        *children = 2 * (uint64_t)get32(p + 1);
        break;
    case TAG_NIL:
        return skip(r, 1);
    case TAG_STRING:
        if (skip(r, 3) < 0)
            return -1;
        return skip(r, get16(p + 1));
    case TAG_LIST:
        if (skip(r, 5) < 0)
            return -1;
        *children = (uint64_t)get32(p + 1) + 1; /* the elements, the tail */
        break;
    case TAG_BINARY:
        if (skip(r, 5) < 0)
            return -1;
        return skip(r, get32(p + 1));
    case TAG_BIT_BINARY:
        if (skip(r, 6) < 0)
            return -1;
        n = get32(p + 1);
        /* bits used in the last byte: 1..8, and 0 only when empty */
        if ((p[5] == 0) != (n == 0) || p[5] > 8)
            return -1;
        return skip(r, n);
    case TAG_SMALL_BIG:
        if (skip(r, 3) < 0 || p[2] > 1)
            return -1;
        return skip(r, p[1]);
    case TAG_LARGE_BIG:
        if (skip(r, 6) < 0 || p[5] > 1)
            return -1;
        return skip(r, get32(p + 1));
    case TAG_PID:
    case TAG_NEW_PID:
        return check_pid(r);
    case TAG_PORT:
    case TAG_REFERENCE:
        r->pos++;
        return check_atom(r) < 0 ? -1 : skip(r, 4 + 1);
    case TAG_NEW_PORT:
        r->pos++;
        return check_atom(r) < 0 ? -1 : skip(r, 4 + 4);
    case TAG_V4_PORT:
        r->pos++;
        return check_atom(r) < 0 ? -1 : skip(r, 8 + 4);
    case TAG_NEW_REFERENCE:
        return check_ref(r, 1);
    case TAG_NEWER_REFERENCE:
        return check_ref(r, 4);
    case TAG_NEW_FUN:
        if (check_fun_head(r, children, end) < 0)
            return -1;
        break;
    case TAG_EXPORT:
        return check_export(r);
    default:
        /* ATOM_CACHE_REF, compressed terms, the old FUN_EXT, distribution
         * headers and anything unknown. */
        return -1;
    }
    /* Every term takes at least one byte: a count the rest of the buffer
     * cannot hold is a lie, refused before anything iterates over it. */
    return *children <= r->len - r->pos ? 0 : -1;
}

static int grow(frame_t **stack, size_t *cap, frame_t *local) {
    size_t ncap = *cap * 2 > MAX_DEPTH ? MAX_DEPTH : *cap * 2;
    frame_t *n;

    if (*stack == local) {
        n = malloc(ncap * sizeof(*n));
        if (n != NULL)
            memcpy(n, local, *cap * sizeof(*n));
    } else {
        n = realloc(*stack, ncap * sizeof(*n));
    }
    if (n == NULL)
        return -1;
    *stack = n;
    *cap = ncap;
    return 0;
}

int moat_etf_check(const char *buf, size_t len) {
    frame_t local[LOCAL_FRAMES];
    frame_t *stack = local, *top;
    size_t cap = LOCAL_FRAMES, depth = 0, end;
    uint64_t children;
    reader_t r;
    int rc = MOAT_EBADTERM;

    if (buf == NULL || len < 2 || (unsigned char)buf[0] != ETF_VERSION)
        return MOAT_EBADTERM;
    r.p = (const unsigned char *)buf;
    r.len = len;
    r.pos = 1;
    for (;;) {
        if (check_head(&r, &children, &end) < 0)
            goto done;
        if (children > 0) {
            if (depth == MAX_DEPTH)
                goto done;
            if (depth == cap && grow(&stack, &cap, local) < 0) {
                rc = UV_ENOMEM;
                goto done;
            }
            stack[depth].left = children;
            stack[depth].end = end;
            depth++;
            continue;
        }
        /* A term is complete: close every container it completes. */
        while (depth > 0) {
            top = &stack[depth - 1];
            if (--top->left > 0)
                break;
            if (top->end != 0 && r.pos != top->end)
                goto done;
            depth--;
        }
        if (depth == 0)
            break;
    }
    rc = r.pos == len ? 0 : MOAT_EBADTERM;

done:
    if (stack != local)
        free(stack);
    return rc;
}
