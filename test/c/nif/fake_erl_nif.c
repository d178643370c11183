/*
 * fake_erl_nif.c: the enif_* functions moat_nif.c calls, over fake
 * processes, for the NIF glue's harness (test_nif.c).
 *
 * DESIGN
 *
 * Terms.  ERL_NIF_TERM is a word: atoms (interned, valid everywhere),
 * pids and small integers are immediates; everything else is a pointer to
 * a node on one heap.  A heap belongs to a process-independent env, to a
 * process, or to a message in a mailbox.  Freeing a heap frees its nodes,
 * so a term used after its env was cleared, freed or sent is a
 * use-after-free that ASan and valgrind report.  Constructors check that
 * the terms they are given live on the env's own heap (or are immediate),
 * as the real API requires.
 *
 * Envs.  A NIF call gets a fresh env struct bound to the caller's heap,
 * freed when the call returns, so an env pointer kept past its call is a
 * use-after-free too.  The thread running a call, a `down` callback, a
 * collection or a process exit counts as a scheduler for that time:
 * enif_send must be given the caller's env there and NULL elsewhere.
 *
 * Processes.  A table, never shrinking, maps pid serials to processes.
 * Each mailbox has a mutex and a condvar; enif_send copies the message
 * into a heap of its own and appends it, or drops it when the receiver is
 * dead.  A process is acted as by one test thread at a time; its heap is
 * touched by that thread only.
 *
 * Resources.  A block with an atomic reference count; the thread that
 * drops the last reference removes the resource's monitors and runs the
 * destructor.  Monitors sit in one list under `mon_lock`.  A dying
 * process takes its monitors off the list and, still under the lock,
 * keeps each resource alive for its `down` call unless its count already
 * reached zero (then the destroyer, which must take the lock to remove
 * the monitors, has not freed it yet and will not call `down`).
 *
 * Ordering.  TSan sees the fake too, so the fake adds no happens-before
 * edge the VM would not have: a message orders its sender before its
 * receiver (the mailbox lock), a resource's count orders its releases,
 * and nothing else does.  Atom look-ups take no lock, the test's
 * counters are relaxed, and the last release of a resource takes
 * mon_lock only if a monitor was ever made on it.
 *
 * Binaries.  One that enif_alloc_binary or enif_term_to_binary made
 * belongs to the NIF (a block whose magic says so, counted as live) until
 * enif_release_binary frees it or enif_make_binary hands it to a term: the
 * node then points at the block and frees it with its heap.  Releasing a
 * binary a term owns, or giving it to a second term, is a misuse; a
 * binary neither released nor given away stays counted (and leaks, for
 * ASan and valgrind).
 *
 * Ports.  A port is a table entry, never freed before fake_reset_procs,
 * connected to the process that fake_port made it for; its term is a node
 * on that process's heap, while ErlNifPort holds only its serial, which
 * stays valid everywhere, as the VM's port ids do.  enif_port_command,
 * allowed only in a NIF call with that call's env, copies the iodata's
 * bytes into the port's packet queue under the port's lock: that lock
 * orders the port's commands among themselves and before the test thread
 * that takes them, as the port's own queue does in the VM, and adds no
 * other edge.  A closed port (fake_port_close, or its process reaped) refuses
 * commands; packets already queued can still be taken.  A test may hook
 * the next command to a port (fake_port_hook): the hook runs on the
 * sending thread just before the packet is queued, so that what other
 * threads do in that window is staged, not left to chance.
 *
 * Janitor and reaper.  moat_nif.c's build for this harness renames its
 * queue's uv_cond_signal and uv_cond_wait to the hooks here (see the
 * Makefile): each signal counts a job pushed, and a thread that waits has
 * found its queue empty, so every job pushed before has been done.
 *
 * Lock order: procs_lock or mon_lock, then a mailbox lock; ports_lock,
 * then a port's lock; a queue's lock in moat_nif.c, then jq_lock;
 * atom_lock (adders only) and type_lock alone.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <ei.h>
#include <uv.h>

#include "fake_erl_nif.h"

/* ---------------------------------------------------------- reporting */

static atomic_long violations;

static void violation(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("fake_erl_nif: API misuse: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    atomic_fetch_add(&violations, 1);
}

/* For what cannot be carried on from: a bad pointer given as an env or
 * a resource. */
static void fatal(const char *what) {
    fprintf(stderr, "fake_erl_nif: fatal: %s\n", what);
    abort();
}

long fake_violations(void) { return atomic_load(&violations); }

/* -------------------------------------------------------------- terms */

enum { TAG_BOXED = 0, TAG_ATOM = 1, TAG_PID = 2, TAG_SMALL = 3 };
#define TAG(t) ((t)&3)
#define NON_VALUE ((ERL_NIF_TERM)0)
#define NIL ((ERL_NIF_TERM)TAG_ATOM) /* atom index 0 is [] */
/* The VM's small integers on 64 bits. */
#define SMALL_MIN (-(1LL << 59))
#define SMALL_MAX ((1LL << 59) - 1)

enum { N_TUPLE = 1, N_CONS, N_BIN, N_MAP, N_INT, N_RES, N_PORT,
       N_DEAD = 0x0dead };

typedef struct res_s res_t;
typedef struct heap_s heap_t;

typedef struct node_s {
    struct node_s *next; /* on its heap */
    heap_t *heap;
    int kind;
    size_t n; /* tuple arity, map pairs, binary bytes; cons: 2 */
    int neg;  /* N_INT: sign and magnitude; N_PORT: mag is its serial */
    uint64_t mag;
    res_t *res;       /* N_RES */
    void *ext;        /* N_BIN: the enif_make_binary block holding the bytes
                         (then not in v), which the node owns */
    ERL_NIF_TERM v[]; /* elements, head and tail, key-value pairs, bytes */
} node_t;

struct heap_s {
    node_t *first;
};

#define NODE(t) ((node_t *)(uintptr_t)(t))
#define IS_NODE(t, k)                                                          \
    (TAG(t) == TAG_BOXED && (t) != NON_VALUE && NODE(t)->kind == (k))

static void res_release(res_t *r);
static void res_keep(res_t *r);
static void bin_free(void *block);

static node_t *node_new(heap_t *h, int kind, size_t n, size_t bytes) {
    node_t *x = calloc(1, sizeof *x + bytes);
    if (x == NULL)
        fatal("out of memory");
    x->kind = kind;
    x->n = n;
    x->heap = h;
    x->next = h->first;
    h->first = x;
    return x;
}

static ERL_NIF_TERM boxed(node_t *x) { return (ERL_NIF_TERM)(uintptr_t)x; }

static void heap_clear(heap_t *h) {
    node_t *x = h->first;
    h->first = NULL;
    while (x != NULL) {
        node_t *next = x->next;
        if (x->kind == N_RES)
            res_release(x->res);
        if (x->kind == N_BIN && x->ext != NULL)
            bin_free(x->ext);
        x->kind = N_DEAD;
        free(x);
        x = next;
    }
}

/* Moves every node of `from` onto `to`. */
static void heap_move(heap_t *to, heap_t *from) {
    node_t *x = from->first, *last = NULL;
    for (; x != NULL; x = x->next) {
        x->heap = to;
        last = x;
    }
    if (last != NULL) {
        last->next = to->first;
        to->first = from->first;
    }
    from->first = NULL;
}

/* ---------------------------------------------------------------- atoms */

/* Entries are published with `natoms` (release) and never change or go,
 * so look-ups take no lock: a lock would order every thread that makes
 * an atom after every other, which the VM does not, and hide races from
 * TSan.  Adding takes atom_lock. */
#define MAX_ATOMS 4096
static pthread_mutex_t atom_lock = PTHREAD_MUTEX_INITIALIZER; /* adders */
static char *atoms[MAX_ATOMS];
static atomic_size_t natoms = 1; /* index 0 stands for [] */

static size_t atom_find(const char *name, size_t len, size_t from, size_t n) {
    for (size_t i = from; i < n; i++)
        if (strlen(atoms[i]) == len && memcmp(atoms[i], name, len) == 0)
            return i;
    return 0;
}

static ERL_NIF_TERM atom_of(const char *name, size_t len) {
    size_t n = atomic_load_explicit(&natoms, memory_order_acquire);
    size_t i = atom_find(name, len, 1, n);
    if (i == 0) {
        pthread_mutex_lock(&atom_lock);
        i = atom_find(name, len, n, atomic_load(&natoms));
        if (i == 0) {
            i = atomic_load(&natoms);
            if (i == MAX_ATOMS || (atoms[i] = malloc(len + 1)) == NULL)
                fatal("atom table full");
            memcpy(atoms[i], name, len);
            atoms[i][len] = 0;
            atomic_store_explicit(&natoms, i + 1, memory_order_release);
        }
        pthread_mutex_unlock(&atom_lock);
    }
    return (ERL_NIF_TERM)(i << 2 | TAG_ATOM);
}

/* The name of an atom: published before its term could be. */
static const char *atom_name(ERL_NIF_TERM t) { return atoms[t >> 2]; }

static int is_atom(ERL_NIF_TERM t) { return TAG(t) == TAG_ATOM && t != NIL; }

ERL_NIF_TERM fake_atom(const char *name) { return atom_of(name, strlen(name)); }

int fake_is_atom(ERL_NIF_TERM t, const char *name) {
    return is_atom(t) && strcmp(atom_name(t), name) == 0;
}

/* ----------------------------------------------------------------- envs */

#define ENV_MAGIC 0x454e5621u
enum { E_INDEP = 1, E_CALL, E_TEST, E_CALLBACK, E_LOAD };

struct enif_environment_t {
    unsigned magic;
    int kind;
    heap_t own;   /* E_INDEP, E_CALLBACK, E_LOAD */
    heap_t *heap; /* &own, or the process's heap */
    fake_proc_t *proc;
    int raised;
    ERL_NIF_TERM reason;
};

/* Counters for the test: relaxed, so that they order no thread after
 * another (the VM has no such counters; TSan must not see them). */
#define COUNT(c, d) atomic_fetch_add_explicit(&(c), (d), memory_order_relaxed)
#define READ(c) atomic_load_explicit(&(c), memory_order_relaxed)

static atomic_long live_envs;
/* Set while this thread runs as a scheduler would: in a NIF call, a
 * callback, a collection or a process exit. */
static _Thread_local int on_scheduler;

static void env_check(ErlNifEnv *env, const char *fn) {
    if (env == NULL || env->magic != ENV_MAGIC) {
        fprintf(stderr, "fake_erl_nif: %s: ", fn);
        fatal("not a live env (a NIF's env kept past its call?)");
    }
}

static ErlNifEnv *env_new(int kind, heap_t *heap, fake_proc_t *p) {
    ErlNifEnv *env = calloc(1, sizeof *env);
    if (env == NULL)
        fatal("out of memory");
    env->magic = ENV_MAGIC;
    env->kind = kind;
    env->heap = heap != NULL ? heap : &env->own;
    env->proc = p;
    return env;
}

static void env_free(ErlNifEnv *env) {
    heap_clear(&env->own);
    env->magic = 0;
    free(env);
}

/* A constructor's argument must live on env's heap. */
static void owned(ErlNifEnv *env, ERL_NIF_TERM t, const char *fn) {
    if (t == NON_VALUE)
        violation("%s: given the non-value (an exception) as a term", fn);
    else if (TAG(t) == TAG_BOXED && NODE(t)->heap != env->heap)
        violation("%s: a term of another env (use enif_make_copy)", fn);
}

ErlNifEnv *enif_alloc_env(void) {
    COUNT(live_envs, 1);
    return env_new(E_INDEP, NULL, NULL);
}

void enif_free_env(ErlNifEnv *env) {
    env_check(env, "enif_free_env");
    if (env->kind != E_INDEP) {
        violation("enif_free_env: not a process-independent env");
        return;
    }
    env_free(env);
    COUNT(live_envs, -1);
}

void enif_clear_env(ErlNifEnv *env) {
    env_check(env, "enif_clear_env");
    if (env->kind != E_INDEP) {
        violation("enif_clear_env: not a process-independent env");
        return;
    }
    heap_clear(&env->own);
}

long fake_live_envs(void) { return READ(live_envs); }

ERL_NIF_TERM enif_raise_exception(ErlNifEnv *env, ERL_NIF_TERM reason) {
    env_check(env, "enif_raise_exception");
    owned(env, reason, "enif_raise_exception");
    env->raised = 1;
    env->reason = reason;
    return NON_VALUE;
}

ERL_NIF_TERM enif_make_badarg(ErlNifEnv *env) {
    return enif_raise_exception(env, fake_atom("badarg"));
}

int enif_is_exception(ErlNifEnv *env, ERL_NIF_TERM term) {
    env_check(env, "enif_is_exception");
    return term == NON_VALUE && env->raised;
}

/* ------------------------------------------------------------ binaries */

/* The block behind ErlNifBinary.ref_bin: the NIF's (BIN_MAGIC) until it
 * is released or handed to a term (BIN_TERM). */
#define BIN_MAGIC 0x42494e21u
#define BIN_TERM 0x42544d21u

typedef struct {
    unsigned magic;
    size_t size;
    max_align_t data[];
} bin_t;

static atomic_long live_bins;

/* A binary node's bytes: in the node, or in the block it was made from. */
static unsigned char *bin_data(const node_t *x) {
    return x->ext != NULL ? (unsigned char *)((bin_t *)x->ext)->data
                          : (unsigned char *)x->v;
}

static void bin_free(void *block) {
    bin_t *b = block;
    b->magic = 0;
    free(b);
}

/* The block of a binary the NIF was given (NULL for an inspected one,
 * which has none). */
static bin_t *bin_of(const ErlNifBinary *bin, const char *fn) {
    bin_t *b = bin->ref_bin;
    if (b != NULL && b->magic != BIN_MAGIC && b->magic != BIN_TERM) {
        fprintf(stderr, "fake_erl_nif: %s: ", fn);
        fatal("not a live binary (released already?)");
    }
    return b;
}

/* Any thread, as in the VM. */
int enif_alloc_binary(size_t size, ErlNifBinary *bin) {
    bin_t *b;
    if (size > SIZE_MAX - sizeof *b || (b = malloc(sizeof *b + size)) == NULL)
        return 0;
    b->magic = BIN_MAGIC;
    b->size = size;
    memset(bin, 0, sizeof *bin);
    bin->size = size;
    bin->data = (unsigned char *)b->data;
    bin->ref_bin = b;
    COUNT(live_bins, 1);
    return 1;
}

/* The VM leaves the struct as it was: a second release is caught by ASan
 * and valgrind reading the freed block. */
void enif_release_binary(ErlNifBinary *bin) {
    bin_t *b = bin_of(bin, "enif_release_binary");
    if (b == NULL)
        return; /* an inspected binary: nothing to release */
    if (b->magic == BIN_TERM) {
        violation("enif_release_binary: the binary belongs to a term "
                  "(enif_make_binary took it)");
        return;
    }
    bin_free(b);
    COUNT(live_bins, -1);
}

ERL_NIF_TERM enif_make_binary(ErlNifEnv *env, ErlNifBinary *bin) {
    bin_t *b = bin_of(bin, "enif_make_binary");
    node_t *x;
    env_check(env, "enif_make_binary");
    if (b != NULL && b->magic == BIN_MAGIC && bin->size <= b->size) {
        x = node_new(env->heap, N_BIN, bin->size, 0);
        x->ext = b;
        b->magic = BIN_TERM;
        COUNT(live_bins, -1);
        return boxed(x);
    }
    if (b != NULL && b->magic == BIN_TERM)
        violation("enif_make_binary: the binary belongs to a term already");
    else if (b != NULL)
        violation("enif_make_binary: size %zu is past the %zu allocated "
                  "(use enif_realloc_binary)",
                  bin->size, b->size);
    /* An inspected binary (or, after a misuse, any): a copy, as the VM
     * makes of a binary it does not own. */
    x = node_new(env->heap, N_BIN, bin->size, bin->size);
    memcpy(x->v, bin->data, bin->size);
    return boxed(x);
}

long fake_live_binaries(void) { return READ(live_bins); }

/* ------------------------------------------------------- constructors */

ERL_NIF_TERM enif_make_atom(ErlNifEnv *env, const char *name) {
    (void)env;
    if (strlen(name) > 255)
        violation("enif_make_atom: over 255 characters");
    return fake_atom(name);
}

static ERL_NIF_TERM make_int(ErlNifEnv *env, int neg, uint64_t mag) {
    node_t *x;
    if (!neg && mag <= (uint64_t)SMALL_MAX)
        return (ERL_NIF_TERM)((uint64_t)mag << 2 | TAG_SMALL);
    if (neg && mag <= (uint64_t)SMALL_MAX + 1)
        return (ERL_NIF_TERM)((uint64_t)(-(int64_t)(mag - 1) - 1) << 2 |
                              TAG_SMALL);
    x = node_new(env->heap, N_INT, 0, 0);
    x->neg = neg;
    x->mag = mag;
    return boxed(x);
}

static ERL_NIF_TERM make_i64(ErlNifEnv *env, int64_t v) {
    return v < 0 ? make_int(env, 1, -(uint64_t)v)
                 : make_int(env, 0, (uint64_t)v);
}

ERL_NIF_TERM enif_make_long(ErlNifEnv *env, long i) {
    env_check(env, "enif_make_long");
    return make_i64(env, i);
}

ERL_NIF_TERM enif_make_ulong(ErlNifEnv *env, unsigned long i) {
    env_check(env, "enif_make_ulong");
    return make_int(env, 0, i);
}

ERL_NIF_TERM enif_make_uint(ErlNifEnv *env, unsigned i) {
    env_check(env, "enif_make_uint");
    return make_int(env, 0, i);
}

static ERL_NIF_TERM make_tuple(ErlNifEnv *env, unsigned n, va_list ap,
                               const char *fn) {
    node_t *x = node_new(env->heap, N_TUPLE, n, n * sizeof(ERL_NIF_TERM));
    for (unsigned i = 0; i < n; i++) {
        x->v[i] = va_arg(ap, ERL_NIF_TERM);
        owned(env, x->v[i], fn);
    }
    return boxed(x);
}

ERL_NIF_TERM enif_make_tuple(ErlNifEnv *env, unsigned cnt, ...) {
    va_list ap;
    ERL_NIF_TERM t;
    env_check(env, "enif_make_tuple");
    va_start(ap, cnt);
    t = make_tuple(env, cnt, ap, "enif_make_tuple");
    va_end(ap);
    return t;
}

static ERL_NIF_TERM cons(ErlNifEnv *env, ERL_NIF_TERM h, ERL_NIF_TERM t) {
    node_t *x = node_new(env->heap, N_CONS, 2, 2 * sizeof(ERL_NIF_TERM));
    x->v[0] = h;
    x->v[1] = t;
    return boxed(x);
}

ERL_NIF_TERM enif_make_list_cell(ErlNifEnv *env, ERL_NIF_TERM car,
                                 ERL_NIF_TERM cdr) {
    env_check(env, "enif_make_list_cell");
    owned(env, car, "enif_make_list_cell");
    owned(env, cdr, "enif_make_list_cell");
    return cons(env, car, cdr);
}

ERL_NIF_TERM enif_make_list(ErlNifEnv *env, unsigned cnt, ...) {
    ERL_NIF_TERM *e, list = NIL;
    va_list ap;
    env_check(env, "enif_make_list");
    if (cnt == 0)
        return NIL;
    if ((e = malloc(cnt * sizeof *e)) == NULL)
        fatal("out of memory");
    va_start(ap, cnt);
    for (unsigned i = 0; i < cnt; i++) {
        e[i] = va_arg(ap, ERL_NIF_TERM);
        owned(env, e[i], "enif_make_list");
    }
    va_end(ap);
    for (unsigned i = cnt; i-- > 0;)
        list = cons(env, e[i], list);
    free(e);
    return list;
}

unsigned char *enif_make_new_binary(ErlNifEnv *env, size_t size,
                                    ERL_NIF_TERM *termp) {
    node_t *x;
    env_check(env, "enif_make_new_binary");
    x = node_new(env->heap, N_BIN, size, size);
    *termp = boxed(x);
    return (unsigned char *)x->v;
}

ERL_NIF_TERM enif_make_new_map(ErlNifEnv *env) {
    env_check(env, "enif_make_new_map");
    return boxed(node_new(env->heap, N_MAP, 0, 0));
}

int enif_make_map_put(ErlNifEnv *env, ERL_NIF_TERM map_in, ERL_NIF_TERM key,
                      ERL_NIF_TERM value, ERL_NIF_TERM *map_out) {
    node_t *m, *x;
    size_t i, n;
    env_check(env, "enif_make_map_put");
    owned(env, map_in, "enif_make_map_put");
    owned(env, key, "enif_make_map_put");
    owned(env, value, "enif_make_map_put");
    if (!IS_NODE(map_in, N_MAP))
        return 0;
    m = NODE(map_in);
    for (i = 0; i < m->n; i++)
        if (enif_is_identical(m->v[2 * i], key))
            break;
    n = i < m->n ? m->n : m->n + 1;
    x = node_new(env->heap, N_MAP, n, 2 * n * sizeof(ERL_NIF_TERM));
    memcpy(x->v, m->v, 2 * m->n * sizeof(ERL_NIF_TERM));
    x->v[2 * i] = key;
    x->v[2 * i + 1] = value;
    *map_out = boxed(x);
    return 1;
}

/* A deep copy of t onto heap h. */
static ERL_NIF_TERM copy(heap_t *h, ERL_NIF_TERM t) {
    node_t *s, *x;
    if (TAG(t) != TAG_BOXED || t == NON_VALUE)
        return t;
    s = NODE(t);
    switch (s->kind) {
    case N_BIN:
        x = node_new(h, N_BIN, s->n, s->n);
        memcpy(x->v, bin_data(s), s->n);
        return boxed(x);
    case N_PORT:
        x = node_new(h, N_PORT, 0, 0);
        x->mag = s->mag;
        return boxed(x);
    case N_INT:
        x = node_new(h, N_INT, 0, 0);
        x->neg = s->neg;
        x->mag = s->mag;
        return boxed(x);
    case N_RES:
        x = node_new(h, N_RES, 0, 0);
        res_keep(s->res);
        x->res = s->res;
        return boxed(x);
    case N_TUPLE:
    case N_CONS:
    case N_MAP: {
        size_t n = s->kind == N_MAP ? 2 * s->n : s->n;
        x = node_new(h, s->kind, s->n, n * sizeof(ERL_NIF_TERM));
        for (size_t i = 0; i < n; i++)
            x->v[i] = copy(h, s->v[i]);
        return boxed(x);
    }
    default:
        fatal("copy of a freed term");
        return NON_VALUE;
    }
}

ERL_NIF_TERM enif_make_copy(ErlNifEnv *dst_env, ERL_NIF_TERM src_term) {
    env_check(dst_env, "enif_make_copy");
    return copy(dst_env->heap, src_term);
}

/* ---------------------------------------------------------- inspection */

int enif_is_atom(ErlNifEnv *env, ERL_NIF_TERM term) {
    (void)env;
    return is_atom(term);
}

int enif_is_identical(ERL_NIF_TERM a, ERL_NIF_TERM b) {
    node_t *x, *y;
    size_t n;
    if (a == b)
        return 1;
    if (TAG(a) != TAG_BOXED || TAG(b) != TAG_BOXED || a == NON_VALUE ||
        b == NON_VALUE)
        return 0;
    x = NODE(a);
    y = NODE(b);
    if (x->kind != y->kind || x->n != y->n)
        return 0;
    switch (x->kind) {
    case N_BIN:
        return memcmp(bin_data(x), bin_data(y), x->n) == 0;
    case N_PORT:
        return x->mag == y->mag;
    case N_INT:
        return x->neg == y->neg && x->mag == y->mag;
    case N_RES:
        return x->res == y->res;
    default:
        n = x->kind == N_MAP ? 2 * x->n : x->n;
        for (size_t i = 0; i < n; i++)
            if (!enif_is_identical(x->v[i], y->v[i]))
                return 0;
        return 1;
    }
}

/* Enough of the term order for what moat_nif.c compares: pids. */
int enif_compare(ERL_NIF_TERM lhs, ERL_NIF_TERM rhs) {
    if (enif_is_identical(lhs, rhs))
        return 0;
    return lhs < rhs ? -1 : 1;
}

static int get_int(ERL_NIF_TERM t, int *neg, uint64_t *mag) {
    if (TAG(t) == TAG_SMALL) {
        int64_t v = (int64_t)t >> 2;
        *neg = v < 0;
        *mag = v < 0 ? -(uint64_t)v : (uint64_t)v;
        return 1;
    }
    if (IS_NODE(t, N_INT)) {
        *neg = NODE(t)->neg;
        *mag = NODE(t)->mag;
        return 1;
    }
    return 0;
}

int enif_get_long(ErlNifEnv *env, ERL_NIF_TERM term, long *ip) {
    int neg;
    uint64_t mag;
    (void)env;
    if (!get_int(term, &neg, &mag))
        return 0;
    if (neg ? mag > (uint64_t)INT64_MAX + 1 : mag > (uint64_t)INT64_MAX)
        return 0;
    *ip = neg ? (long)(-(int64_t)(mag - 1) - 1) : (long)mag;
    return 1;
}

int enif_get_ulong(ErlNifEnv *env, ERL_NIF_TERM term, unsigned long *ip) {
    int neg;
    uint64_t mag;
    (void)env;
    if (!get_int(term, &neg, &mag) || neg)
        return 0;
    *ip = mag;
    return 1;
}

int enif_get_int(ErlNifEnv *env, ERL_NIF_TERM term, int *ip) {
    long v;
    if (!enif_get_long(env, term, &v) || v < INT32_MIN || v > INT32_MAX)
        return 0;
    *ip = (int)v;
    return 1;
}

ERL_NIF_TERM enif_make_int(ErlNifEnv *env, int i) {
    env_check(env, "enif_make_int");
    return make_int(env, i < 0, i < 0 ? -(uint64_t)(int64_t)i : (uint64_t)i);
}

int enif_get_tuple(ErlNifEnv *env, ERL_NIF_TERM tpl, int *arity,
                   const ERL_NIF_TERM **array) {
    (void)env;
    if (!IS_NODE(tpl, N_TUPLE))
        return 0;
    *arity = (int)NODE(tpl)->n;
    *array = NODE(tpl)->v;
    return 1;
}

int enif_get_uint(ErlNifEnv *env, ERL_NIF_TERM term, unsigned *ip) {
    unsigned long v;
    if (!enif_get_ulong(env, term, &v) || v > UINT32_MAX)
        return 0;
    *ip = (unsigned)v;
    return 1;
}

int enif_get_atom(ErlNifEnv *env, ERL_NIF_TERM atom, char *buf, unsigned len,
                  ErlNifCharEncoding enc) {
    const char *s;
    size_t n;
    (void)env;
    (void)enc;
    if (!is_atom(atom))
        return 0;
    s = atom_name(atom);
    n = strlen(s);
    if (n + 1 > len)
        return 0;
    memcpy(buf, s, n + 1);
    return (int)(n + 1);
}

int enif_get_list_cell(ErlNifEnv *env, ERL_NIF_TERM term, ERL_NIF_TERM *head,
                       ERL_NIF_TERM *tail) {
    (void)env;
    if (!IS_NODE(term, N_CONS))
        return 0;
    *head = NODE(term)->v[0];
    *tail = NODE(term)->v[1];
    return 1;
}

int enif_get_list_length(ErlNifEnv *env, ERL_NIF_TERM term, unsigned *len) {
    unsigned n = 0;
    (void)env;
    while (IS_NODE(term, N_CONS)) {
        n++;
        term = NODE(term)->v[1];
    }
    if (term != NIL)
        return 0;
    *len = n;
    return 1;
}

int enif_get_map_value(ErlNifEnv *env, ERL_NIF_TERM map, ERL_NIF_TERM key,
                       ERL_NIF_TERM *value) {
    (void)env;
    if (!IS_NODE(map, N_MAP))
        return 0;
    for (size_t i = 0; i < NODE(map)->n; i++) {
        if (enif_is_identical(NODE(map)->v[2 * i], key)) {
            *value = NODE(map)->v[2 * i + 1];
            return 1;
        }
    }
    return 0;
}

int enif_inspect_binary(ErlNifEnv *env, ERL_NIF_TERM bin_term,
                        ErlNifBinary *bin) {
    (void)env;
    if (!IS_NODE(bin_term, N_BIN))
        return 0;
    memset(bin, 0, sizeof *bin);
    bin->size = NODE(bin_term)->n;
    bin->data = bin_data(NODE(bin_term));
    return 1;
}

/* iodata: bytes, binaries and lists of them; returns the size, or -1. */
static long iolist_size(ERL_NIF_TERM t, int depth) {
    long n = 0, m;
    if (depth > 100)
        return -1;
    while (IS_NODE(t, N_CONS)) {
        ERL_NIF_TERM h = NODE(t)->v[0];
        long b;
        if (enif_get_long(NULL, h, &b) && b >= 0 && b <= 255)
            n++;
        else if ((m = iolist_size(h, depth + 1)) >= 0)
            n += m;
        else
            return -1;
        t = NODE(t)->v[1];
    }
    if (IS_NODE(t, N_BIN))
        return n + (long)NODE(t)->n;
    return t == NIL ? n : -1;
}

static unsigned char *iolist_fill(ERL_NIF_TERM t, unsigned char *p) {
    while (IS_NODE(t, N_CONS)) {
        ERL_NIF_TERM h = NODE(t)->v[0];
        long b;
        if (enif_get_long(NULL, h, &b))
            *p++ = (unsigned char)b;
        else
            p = iolist_fill(h, p);
        t = NODE(t)->v[1];
    }
    if (IS_NODE(t, N_BIN)) {
        memcpy(p, bin_data(NODE(t)), NODE(t)->n);
        p += NODE(t)->n;
    }
    return p;
}

int enif_inspect_iolist_as_binary(ErlNifEnv *env, ERL_NIF_TERM term,
                                  ErlNifBinary *bin) {
    long n;
    ERL_NIF_TERM b;
    env_check(env, "enif_inspect_iolist_as_binary");
    if (IS_NODE(term, N_BIN))
        return enif_inspect_binary(env, term, bin);
    if ((n = iolist_size(term, 0)) < 0)
        return 0;
    iolist_fill(term, enif_make_new_binary(env, (size_t)n, &b));
    return enif_inspect_binary(env, b, bin);
}

int fake_arity(ERL_NIF_TERM t) {
    return IS_NODE(t, N_TUPLE) ? (int)NODE(t)->n : -1;
}

ERL_NIF_TERM fake_elem(ERL_NIF_TERM t, int i) {
    if (!IS_NODE(t, N_TUPLE) || i < 0 || (size_t)i >= NODE(t)->n)
        return NON_VALUE;
    return NODE(t)->v[i];
}

int fake_get_long(ERL_NIF_TERM t, long *v) { return enif_get_long(NULL, t, v); }

const unsigned char *fake_bytes(ERL_NIF_TERM t, size_t *len) {
    if (!IS_NODE(t, N_BIN))
        return NULL;
    *len = NODE(t)->n;
    return bin_data(NODE(t));
}

/* ------------------------------------------------------------ resources */

#define RES_MAGIC 0x52455321u

struct enif_resource_type_t {
    struct enif_resource_type_t *next;
    char name[64];
    /* Replaced by a takeover while other threads may destroy. */
    _Atomic(ErlNifResourceDtor *) dtor;
    _Atomic(ErlNifResourceDown *) down;
    atomic_long dtors;
};

struct res_s {
    unsigned magic;
    ErlNifResourceType *type;
    atomic_long refs;
    /* Set once a monitor was made: only then does the last release take
     * mon_lock, which would otherwise order every destroying thread
     * after every other.  Set while the monitoring caller holds a
     * reference, so the last release (ordered after it by `refs`) sees
     * it. */
    atomic_int monitored;
    max_align_t data[];
};

typedef struct mon_s {
    struct mon_s *next;
    res_t *res;
    fake_proc_t *proc;
    uint64_t id;
} mon_t;

static pthread_mutex_t type_lock = PTHREAD_MUTEX_INITIALIZER; /* guards types */
static ErlNifResourceType *types;
static atomic_long live_res;
static pthread_mutex_t mon_lock =
    PTHREAD_MUTEX_INITIALIZER; /* guards mons, mon_ids */
static mon_t *mons;
static uint64_t mon_ids;

static res_t *res_of(void *obj, const char *fn) {
    res_t *r =
        obj != NULL ? (res_t *)((char *)obj - offsetof(res_t, data)) : NULL;
    if (r == NULL || r->magic != RES_MAGIC) {
        fprintf(stderr, "fake_erl_nif: %s: ", fn);
        fatal("not a live resource");
    }
    return r;
}

static void res_keep(res_t *r) {
    if (atomic_fetch_add(&r->refs, 1) <= 0)
        fatal("a resource kept after its last reference was dropped");
}

static void res_release(res_t *r) {
    long was = atomic_fetch_sub(&r->refs, 1);
    ErlNifResourceDtor *dtor;
    ErlNifEnv *env;
    if (was > 1)
        return;
    if (was < 1)
        fatal("a resource released more often than referenced");
    /* Its monitors go first: a `down` that has not started by now never
     * will (the dying process found the count at zero). */
    if (atomic_load_explicit(&r->monitored, memory_order_relaxed)) {
        pthread_mutex_lock(&mon_lock);
        for (mon_t **m = &mons; *m != NULL;) {
            if ((*m)->res == r) {
                mon_t *dead = *m;
                *m = dead->next;
                free(dead);
            } else {
                m = &(*m)->next;
            }
        }
        pthread_mutex_unlock(&mon_lock);
    }
    env = env_new(E_CALLBACK, NULL, NULL);
    if ((dtor = atomic_load_explicit(&r->type->dtor, memory_order_relaxed)))
        dtor(env, r->data);
    env_free(env);
    COUNT(r->type->dtors, 1);
    r->magic = 0;
    free(r);
    COUNT(live_res, -1);
}

ErlNifResourceType *enif_open_resource_type_x(
    ErlNifEnv *env, const char *name_str, const ErlNifResourceTypeInit *init,
    ErlNifResourceFlags flags, ErlNifResourceFlags *tried) {
    ErlNifResourceType *t;
    env_check(env, "enif_open_resource_type_x");
    if (env->kind != E_LOAD) {
        violation("enif_open_resource_type_x outside load/upgrade");
        return NULL;
    }
    pthread_mutex_lock(&type_lock);
    for (t = types; t != NULL; t = t->next)
        if (strcmp(t->name, name_str) == 0)
            break;
    if (t != NULL && (flags & ERL_NIF_RT_TAKEOVER)) {
        atomic_store_explicit(&t->dtor, init->dtor, memory_order_relaxed);
        atomic_store_explicit(&t->down, init->down, memory_order_relaxed);
        if (tried != NULL)
            *tried = ERL_NIF_RT_TAKEOVER;
    } else if (t == NULL && (flags & ERL_NIF_RT_CREATE) &&
               strlen(name_str) < sizeof t->name &&
               (t = calloc(1, sizeof *t)) != NULL) {
        strcpy(t->name, name_str);
        atomic_store_explicit(&t->dtor, init->dtor, memory_order_relaxed);
        atomic_store_explicit(&t->down, init->down, memory_order_relaxed);
        t->next = types;
        types = t;
        if (tried != NULL)
            *tried = ERL_NIF_RT_CREATE;
    } else {
        t = NULL;
    }
    pthread_mutex_unlock(&type_lock);
    return t;
}

/* A type whose next allocation fails, as on out of memory. */
static ErlNifResourceType *_Atomic fail_next;

void fake_fail_next_alloc(const char *type) {
    pthread_mutex_lock(&type_lock);
    for (ErlNifResourceType *t = types; t != NULL; t = t->next)
        if (strcmp(t->name, type) == 0)
            atomic_store(&fail_next, t);
    pthread_mutex_unlock(&type_lock);
}

void *enif_alloc_resource(ErlNifResourceType *type, size_t size) {
    res_t *r;
    ErlNifResourceType *failing = type;
    if (type == NULL)
        fatal("enif_alloc_resource: no type");
    if (atomic_load_explicit(&fail_next, memory_order_relaxed) == type &&
        atomic_compare_exchange_strong(&fail_next, &failing, NULL))
        return NULL;
    if ((r = malloc(sizeof *r + size)) == NULL)
        return NULL;
    r->magic = RES_MAGIC;
    r->type = type;
    atomic_init(&r->refs, 1);
    atomic_init(&r->monitored, 0);
    COUNT(live_res, 1);
    return r->data;
}

void enif_keep_resource(void *obj) {
    res_keep(res_of(obj, "enif_keep_resource"));
}

void enif_release_resource(void *obj) {
    res_release(res_of(obj, "enif_release_resource"));
}

ERL_NIF_TERM enif_make_resource(ErlNifEnv *env, void *obj) {
    res_t *r = res_of(obj, "enif_make_resource");
    node_t *x;
    env_check(env, "enif_make_resource");
    res_keep(r);
    x = node_new(env->heap, N_RES, 0, 0);
    x->res = r;
    return boxed(x);
}

int enif_get_resource(ErlNifEnv *env, ERL_NIF_TERM term,
                      ErlNifResourceType *type, void **objp) {
    (void)env;
    if (!IS_NODE(term, N_RES) || NODE(term)->res->type != type)
        return 0;
    *objp = NODE(term)->res->data;
    return 1;
}

long fake_live_resources(void) { return READ(live_res); }

long fake_dtor_calls(const char *type) {
    long n = 0;
    pthread_mutex_lock(&type_lock);
    for (ErlNifResourceType *t = types; t != NULL; t = t->next)
        if (strcmp(t->name, type) == 0)
            n = READ(t->dtors);
    pthread_mutex_unlock(&type_lock);
    return n;
}

int fake_is_resource(ERL_NIF_TERM t, const char *type) {
    return IS_NODE(t, N_RES) && strcmp(NODE(t)->res->type->name, type) == 0;
}

/* ------------------------------------------------------------ processes */

typedef struct msg_s {
    struct msg_s *next;
    heap_t heap;
    ERL_NIF_TERM term;
} msg_t;

struct fake_proc_s {
    uint64_t serial;
    ERL_NIF_TERM pid;
    heap_t heap; /* the acting thread's only */
    ErlNifEnv *env;
    int raised;
    ERL_NIF_TERM reason;
    int reaped;
    pthread_mutex_t lock; /* guards alive, first, last, count */
    pthread_cond_t cond;
    int alive;
    msg_t *first, **last;
    size_t count;
};

static void ports_close_of(const fake_proc_t *p);
static void ports_free(void);

static pthread_rwlock_t procs_lock =
    PTHREAD_RWLOCK_INITIALIZER; /* guards procs, nprocs, capprocs */
static fake_proc_t **procs;
static size_t nprocs, capprocs;
/* Serials of processes freed by fake_reset_procs: never used again. */
static uint64_t serial_base;

static fake_proc_t *proc_find(ERL_NIF_TERM pid) {
    fake_proc_t *p = NULL;
    uint64_t serial = pid >> 2;
    if (TAG(pid) != TAG_PID)
        return NULL;
    pthread_rwlock_rdlock(&procs_lock);
    if (serial > serial_base && serial - serial_base <= nprocs)
        p = procs[serial - serial_base - 1];
    pthread_rwlock_unlock(&procs_lock);
    return p;
}

fake_proc_t *fake_spawn(void) {
    fake_proc_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        fatal("out of memory");
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->alive = 1;
    p->last = &p->first;
    p->env = env_new(E_TEST, &p->heap, p);
    pthread_rwlock_wrlock(&procs_lock);
    if (nprocs == capprocs) {
        size_t cap = capprocs ? capprocs * 2 : 64;
        fake_proc_t **n = realloc(procs, cap * sizeof *n);
        if (n == NULL)
            fatal("out of memory");
        procs = n;
        capprocs = cap;
    }
    procs[nprocs++] = p;
    p->serial = serial_base + nprocs;
    p->pid = (ERL_NIF_TERM)(p->serial << 2 | TAG_PID);
    pthread_rwlock_unlock(&procs_lock);
    return p;
}

ErlNifPid fake_pid(const fake_proc_t *p) {
    ErlNifPid pid;
    pid.pid = p->pid;
    return pid;
}

ErlNifEnv *fake_env(fake_proc_t *p) { return p->env; }

void fake_gc(fake_proc_t *p) {
    int sched = on_scheduler;
    on_scheduler = 1;
    heap_clear(&p->heap);
    on_scheduler = sched;
}

static void mailbox_free(fake_proc_t *p) {
    msg_t *m;
    pthread_mutex_lock(&p->lock);
    m = p->first;
    p->first = NULL;
    p->last = &p->first;
    p->count = 0;
    pthread_mutex_unlock(&p->lock);
    while (m != NULL) {
        msg_t *next = m->next;
        heap_clear(&m->heap);
        free(m);
        m = next;
    }
}

void fake_die(fake_proc_t *p) {
    pthread_mutex_lock(&p->lock);
    p->alive = 0;
    pthread_mutex_unlock(&p->lock);
}

void fake_reap(fake_proc_t *p) {
    mon_t *fire = NULL;
    int sched = on_scheduler;
    on_scheduler = 1;
    pthread_mutex_lock(&mon_lock);
    for (mon_t **m = &mons; *m != NULL;) {
        mon_t *x = *m;
        long refs;
        if (x->proc != p) {
            m = &x->next;
            continue;
        }
        *m = x->next;
        /* Keep the resource for the call, unless it is being destroyed. */
        refs = atomic_load(&x->res->refs);
        while (refs > 0 &&
               !atomic_compare_exchange_weak(&x->res->refs, &refs, refs + 1))
            ;
        if (refs > 0) {
            x->next = fire;
            fire = x;
        } else {
            free(x);
        }
    }
    pthread_mutex_unlock(&mon_lock);
    while (fire != NULL) {
        mon_t *x = fire;
        ErlNifEnv *env = env_new(E_CALLBACK, NULL, NULL);
        ErlNifPid pid = {p->pid};
        ErlNifMonitor mon;
        memset(&mon, 0, sizeof mon);
        memcpy(mon.data, &x->id, sizeof x->id);
        fire = x->next;
        atomic_load_explicit(&x->res->type->down, memory_order_relaxed)(
            env, x->res->data, &pid, &mon);
        env_free(env);
        res_release(x->res);
        free(x);
    }
    /* Its ports close, as a port whose connected process exits. */
    ports_close_of(p);
    mailbox_free(p);
    heap_clear(&p->heap);
    p->reaped = 1;
    on_scheduler = sched;
}

void fake_exit(fake_proc_t *p) {
    fake_die(p);
    fake_reap(p);
}

void fake_exit_all(void) {
    fake_proc_t **all;
    size_t n;
    /* Called between tests, when no other thread spawns. */
    pthread_rwlock_rdlock(&procs_lock);
    all = procs;
    n = nprocs;
    pthread_rwlock_unlock(&procs_lock);
    for (size_t i = 0; i < n; i++)
        if (!all[i]->reaped)
            fake_exit(all[i]);
}

void fake_reset_procs(void) {
    fake_proc_t **all;
    size_t n;
    fake_exit_all();
    pthread_rwlock_wrlock(&procs_lock);
    all = procs;
    n = nprocs;
    procs = NULL;
    serial_base += nprocs;
    nprocs = capprocs = 0;
    pthread_rwlock_unlock(&procs_lock);
    for (size_t i = 0; i < n; i++) {
        /* Ordered after the last sender, which took this lock. */
        pthread_mutex_lock(&all[i]->lock);
        pthread_mutex_unlock(&all[i]->lock);
        env_free(all[i]->env);
        pthread_mutex_destroy(&all[i]->lock);
        pthread_cond_destroy(&all[i]->cond);
        free(all[i]);
    }
    free(all);
    ports_free();
}

int enif_is_process_alive(ErlNifEnv *env, ErlNifPid *pid) {
    fake_proc_t *p = proc_find(pid->pid);
    int alive = 0;
    env_check(env, "enif_is_process_alive");
    if (p != NULL) {
        pthread_mutex_lock(&p->lock);
        alive = p->alive;
        pthread_mutex_unlock(&p->lock);
    }
    return alive;
}

int enif_is_current_process_alive(ErlNifEnv *env) {
    int alive;
    env_check(env, "enif_is_current_process_alive");
    if (env->proc == NULL)
        return 0;
    pthread_mutex_lock(&env->proc->lock);
    alive = env->proc->alive;
    pthread_mutex_unlock(&env->proc->lock);
    return alive;
}

ErlNifPid *enif_self(ErlNifEnv *caller_env, ErlNifPid *pid) {
    env_check(caller_env, "enif_self");
    if (caller_env->proc == NULL)
        return NULL;
    pid->pid = caller_env->proc->pid;
    return pid;
}

int enif_get_local_pid(ErlNifEnv *env, ERL_NIF_TERM term, ErlNifPid *pid) {
    (void)env;
    if (TAG(term) != TAG_PID)
        return 0;
    pid->pid = term;
    return 1;
}

/* The VM's undefined pid is the atom; made at load. */
static ERL_NIF_TERM am_undefined;

void enif_set_pid_undefined(ErlNifPid *pid) { pid->pid = am_undefined; }

int enif_is_pid_undefined(const ErlNifPid *pid) {
    return pid->pid == am_undefined;
}

int enif_monitor_process(ErlNifEnv *env, void *obj, const ErlNifPid *target,
                         ErlNifMonitor *monitor) {
    res_t *r = res_of(obj, "enif_monitor_process");
    fake_proc_t *p = proc_find(target->pid);
    mon_t *m;
    int alive = 0;
    if (env != NULL)
        env_check(env, "enif_monitor_process");
    if (atomic_load_explicit(&r->type->down, memory_order_relaxed) == NULL)
        return -1;
    if ((m = calloc(1, sizeof *m)) == NULL)
        fatal("out of memory");
    m->res = r;
    m->proc = p;
    /* Under mon_lock, so that a process dying now either is seen dead
     * here or finds the monitor when it is reaped. */
    pthread_mutex_lock(&mon_lock);
    if (p != NULL) {
        pthread_mutex_lock(&p->lock);
        alive = p->alive;
        pthread_mutex_unlock(&p->lock);
    }
    if (alive) {
        atomic_store_explicit(&r->monitored, 1, memory_order_relaxed);
        m->id = ++mon_ids;
        m->next = mons;
        mons = m;
    }
    pthread_mutex_unlock(&mon_lock);
    if (!alive) {
        free(m);
        return 1;
    }
    if (monitor != NULL) {
        memset(monitor, 0, sizeof *monitor);
        memcpy(monitor->data, &m->id, sizeof m->id);
    }
    return 0;
}

/* ------------------------------------------------------------- sending */

int enif_send(ErlNifEnv *caller_env, const ErlNifPid *to_pid,
              ErlNifEnv *msg_env, ERL_NIF_TERM msg) {
    fake_proc_t *p;
    msg_t *m;
    ErlNifEnv *src = msg_env != NULL ? msg_env : caller_env;
    if (caller_env != NULL)
        env_check(caller_env, "enif_send (caller_env)");
    if (on_scheduler && caller_env == NULL)
        violation("enif_send on a scheduler thread without the caller's env");
    if (!on_scheduler && caller_env != NULL)
        violation(
            "enif_send with a caller env on a thread the VM did not start");
    if (src == NULL) {
        violation("enif_send with neither env");
        return 0;
    }
    env_check(src, "enif_send (msg_env)");
    if (msg_env != NULL && msg_env->kind != E_INDEP)
        violation("enif_send: msg_env is not process-independent");
    owned(src, msg, "enif_send");
    if ((p = proc_find(to_pid->pid)) == NULL)
        return 0;
    if ((m = calloc(1, sizeof *m)) == NULL)
        fatal("out of memory");
    m->term = copy(&m->heap, msg);
    pthread_mutex_lock(&p->lock);
    if (!p->alive) {
        pthread_mutex_unlock(&p->lock);
        heap_clear(&m->heap);
        free(m);
        return 0;
    }
    *p->last = m;
    p->last = &m->next;
    p->count++;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    /* Sent: msg_env and all its terms are invalid now (the real send
     * moves the heap into the message). */
    if (msg_env != NULL)
        heap_clear(&msg_env->own);
    return 1;
}

size_t fake_mailbox_len(fake_proc_t *p) {
    size_t n;
    pthread_mutex_lock(&p->lock);
    n = p->count;
    pthread_mutex_unlock(&p->lock);
    return n;
}

ERL_NIF_TERM fake_recv(fake_proc_t *p, int timeout_ms) {
    struct timespec until;
    msg_t *m;
    ERL_NIF_TERM t;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&p->lock);
    while (p->first == NULL)
        if (pthread_cond_timedwait(&p->cond, &p->lock, &until) == ETIMEDOUT)
            break;
    m = p->first;
    if (m != NULL) {
        p->first = m->next;
        if (p->first == NULL)
            p->last = &p->first;
        p->count--;
    }
    pthread_mutex_unlock(&p->lock);
    if (m == NULL)
        return NON_VALUE;
    heap_move(&p->heap, &m->heap);
    t = m->term;
    free(m);
    return t;
}

/* ---------------------------------------------------------------- ports */

typedef struct pkt_s {
    struct pkt_s *next;
    size_t len;
    unsigned char *data; /* malloc'd: handed to the test as it is */
} pkt_t;

typedef struct {
    uint64_t serial;
    const fake_proc_t *owner; /* its connected process; never changes */
    pthread_mutex_t lock; /* guards open, first, last, count, hook, hook_arg */
    pthread_cond_t cond;
    int open;
    pkt_t *first, **last;
    size_t count;
    void (*hook)(void *arg); /* fake_port_hook's, until a command takes it */
    void *hook_arg;
} port_t;

static pthread_rwlock_t ports_lock =
    PTHREAD_RWLOCK_INITIALIZER; /* guards ports, nports, capports */
static port_t **ports;
static size_t nports, capports;
/* Serials of ports freed by fake_reset_procs: never used again. */
static uint64_t port_base;

/* ErlNifPort.port_id: the serial, tagged as a small integer, so that it
 * is no pointer into any heap. */
#define PORT_ID(serial) ((ERL_NIF_TERM)((serial) << 2 | TAG_SMALL))

static port_t *port_find(uint64_t serial) {
    port_t *pt = NULL;
    pthread_rwlock_rdlock(&ports_lock);
    if (serial > port_base && serial - port_base <= nports)
        pt = ports[serial - port_base - 1];
    pthread_rwlock_unlock(&ports_lock);
    return pt;
}

static port_t *port_of_id(int id) {
    port_t *pt = id > 0 ? port_find((uint64_t)id) : NULL;
    if (pt == NULL)
        fatal("no such port (made before fake_reset_procs?)");
    return pt;
}

ERL_NIF_TERM fake_port(fake_proc_t *p, int *id) {
    port_t *pt = calloc(1, sizeof *pt);
    node_t *x;
    if (pt == NULL)
        fatal("out of memory");
    pthread_mutex_init(&pt->lock, NULL);
    pthread_cond_init(&pt->cond, NULL);
    pt->owner = p;
    pt->open = 1;
    pt->last = &pt->first;
    pthread_rwlock_wrlock(&ports_lock);
    if (nports == capports) {
        size_t cap = capports ? capports * 2 : 16;
        port_t **n = realloc(ports, cap * sizeof *n);
        if (n == NULL)
            fatal("out of memory");
        ports = n;
        capports = cap;
    }
    ports[nports++] = pt;
    pt->serial = port_base + nports;
    pthread_rwlock_unlock(&ports_lock);
    if (pt->serial > INT32_MAX)
        fatal("too many ports");
    *id = (int)pt->serial;
    x = node_new(&p->heap, N_PORT, 0, 0);
    x->mag = pt->serial;
    return boxed(x);
}

static void port_shut(port_t *pt) {
    pthread_mutex_lock(&pt->lock);
    pt->open = 0;
    pthread_cond_broadcast(&pt->cond);
    pthread_mutex_unlock(&pt->lock);
}

void fake_port_close(int id) { port_shut(port_of_id(id)); }

void fake_port_hook(int id, void (*fn)(void *arg), void *arg) {
    port_t *pt = port_of_id(id);
    pthread_mutex_lock(&pt->lock);
    pt->hook = fn;
    pt->hook_arg = arg;
    pthread_mutex_unlock(&pt->lock);
}

static void ports_close_of(const fake_proc_t *p) {
    pthread_rwlock_rdlock(&ports_lock);
    for (size_t i = 0; i < nports; i++)
        if (ports[i]->owner == p)
            port_shut(ports[i]);
    pthread_rwlock_unlock(&ports_lock);
}

static void ports_free(void) {
    port_t **all;
    size_t n;
    pthread_rwlock_wrlock(&ports_lock);
    all = ports;
    n = nports;
    ports = NULL;
    port_base += nports;
    nports = capports = 0;
    pthread_rwlock_unlock(&ports_lock);
    for (size_t i = 0; i < n; i++) {
        /* Ordered after the last sender, which took this lock. */
        pthread_mutex_lock(&all[i]->lock);
        pthread_mutex_unlock(&all[i]->lock);
        for (pkt_t *k = all[i]->first, *next; k != NULL; k = next) {
            next = k->next;
            free(k->data);
            free(k);
        }
        pthread_mutex_destroy(&all[i]->lock);
        pthread_cond_destroy(&all[i]->cond);
        free(all[i]);
    }
    free(all);
}

size_t fake_port_len(int id) {
    port_t *pt = port_of_id(id);
    size_t n;
    pthread_mutex_lock(&pt->lock);
    n = pt->count;
    pthread_mutex_unlock(&pt->lock);
    return n;
}

unsigned char *fake_port_take(int id, size_t *len, int timeout_ms) {
    port_t *pt = port_of_id(id);
    struct timespec until;
    unsigned char *data = NULL;
    pkt_t *k;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&pt->lock);
    while (pt->first == NULL && pt->open)
        if (pthread_cond_timedwait(&pt->cond, &pt->lock, &until) == ETIMEDOUT)
            break;
    k = pt->first;
    if (k != NULL) {
        pt->first = k->next;
        if (pt->first == NULL)
            pt->last = &pt->first;
        pt->count--;
    }
    pthread_mutex_unlock(&pt->lock);
    if (k != NULL) {
        data = k->data;
        *len = k->len;
        free(k);
    }
    return data;
}

int enif_is_port(ErlNifEnv *env, ERL_NIF_TERM term) {
    (void)env;
    return IS_NODE(term, N_PORT);
}

int enif_get_local_port(ErlNifEnv *env, ERL_NIF_TERM term, ErlNifPort *port) {
    (void)env;
    if (!IS_NODE(term, N_PORT))
        return 0;
    port->port_id = PORT_ID(NODE(term)->mag);
    return 1;
}

/* The VM's rules: env is the calling process's (a NIF call's env, on
 * its thread); msg lives in msg_env, a process-independent env, or in
 * env when msg_env is NULL; msg is iodata, as for port_command/2.  The
 * VM returns false for a msg that is not iodata: here that is also a
 * misuse, since the data would be lost without a word. */
int enif_port_command(ErlNifEnv *env, const ErlNifPort *to_port,
                      ErlNifEnv *msg_env, ERL_NIF_TERM msg) {
    ErlNifEnv *src = msg_env != NULL ? msg_env : env;
    port_t *pt;
    pkt_t *k;
    long n;
    void (*hook)(void *arg);
    void *hook_arg;
    env_check(env, "enif_port_command");
    if (env->kind != E_CALL || !on_scheduler) {
        violation("enif_port_command: env is not the env of a NIF call "
                  "running on this thread");
        return 0;
    }
    if (msg_env != NULL) {
        env_check(msg_env, "enif_port_command (msg_env)");
        if (msg_env->kind != E_INDEP)
            violation("enif_port_command: msg_env is not process-independent");
    }
    owned(src, msg, "enif_port_command");
    if (TAG(to_port->port_id) != TAG_SMALL ||
        (pt = port_find(to_port->port_id >> 2)) == NULL) {
        violation("enif_port_command: not a port (enif_get_local_port "
                  "fills ErlNifPort)");
        return 0;
    }
    if ((n = iolist_size(msg, 0)) < 0) {
        violation("enif_port_command: the message is not iodata");
        return 0;
    }
    if ((k = calloc(1, sizeof *k)) == NULL ||
        (k->data = malloc(n > 0 ? (size_t)n : 1)) == NULL)
        fatal("out of memory");
    k->len = (size_t)n;
    iolist_fill(msg, k->data);
    pthread_mutex_lock(&pt->lock);
    hook = pt->hook;
    hook_arg = pt->hook_arg;
    pt->hook = NULL;
    if (hook != NULL) {
        /* Run without the lock, so that it may send to this port too. */
        pthread_mutex_unlock(&pt->lock);
        hook(hook_arg);
        pthread_mutex_lock(&pt->lock);
    }
    if (!pt->open) {
        pthread_mutex_unlock(&pt->lock);
        free(k->data);
        free(k);
        return 0;
    }
    *pt->last = k;
    pt->last = &k->next;
    pt->count++;
    pthread_cond_broadcast(&pt->cond);
    pthread_mutex_unlock(&pt->lock);
    return 1;
}

/* ------------------------------------------------------------------ ETF */

#define FAKE_NODE "fake@localhost"

static int encode(ei_x_buff *x, ERL_NIF_TERM t) {
    node_t *n;
    switch (TAG(t)) {
    case TAG_ATOM:
        if (t == NIL)
            return ei_x_encode_empty_list(x);
        return ei_x_encode_atom(x, atom_name(t));
    case TAG_SMALL:
        return ei_x_encode_longlong(x, (int64_t)t >> 2);
    case TAG_PID: {
        erlang_pid pid;
        memset(&pid, 0, sizeof pid);
        strcpy(pid.node, FAKE_NODE);
        pid.num = (unsigned)(t >> 2);
        pid.creation = 1;
        return ei_x_encode_pid(x, &pid);
    }
    default:
        break;
    }
    if (t == NON_VALUE)
        return -1;
    n = NODE(t);
    switch (n->kind) {
    case N_INT: {
        long v;
        if (!n->neg)
            return ei_x_encode_ulonglong(x, n->mag);
        if (!enif_get_long(NULL, t, &v))
            return -1; /* below -2^63: none of moat's business */
        return ei_x_encode_longlong(x, v);
    }
    case N_BIN:
        return ei_x_encode_binary(x, bin_data(n), (long)n->n);
    case N_PORT: {
        erlang_port port;
        memset(&port, 0, sizeof port);
        strcpy(port.node, FAKE_NODE);
        port.id = n->mag;
        port.creation = 1;
        return ei_x_encode_port(x, &port);
    }
    case N_TUPLE:
        if (ei_x_encode_tuple_header(x, (long)n->n) < 0)
            return -1;
        for (size_t i = 0; i < n->n; i++)
            if (encode(x, n->v[i]) < 0)
                return -1;
        return 0;
    case N_MAP:
        if (ei_x_encode_map_header(x, (long)n->n) < 0)
            return -1;
        for (size_t i = 0; i < 2 * n->n; i++)
            if (encode(x, n->v[i]) < 0)
                return -1;
        return 0;
    case N_CONS: {
        long len = 0;
        ERL_NIF_TERM l = t;
        for (; IS_NODE(l, N_CONS); l = NODE(l)->v[1])
            len++;
        if (ei_x_encode_list_header(x, len) < 0)
            return -1;
        for (l = t; IS_NODE(l, N_CONS); l = NODE(l)->v[1])
            if (encode(x, NODE(l)->v[0]) < 0)
                return -1;
        return l == NIL ? ei_x_encode_empty_list(x) : encode(x, l);
    }
    case N_RES: {
        /* The VM encodes a resource as a reference; so does this. */
        erlang_ref ref;
        uintptr_t a = (uintptr_t)n->res;
        memset(&ref, 0, sizeof ref);
        strcpy(ref.node, FAKE_NODE);
        ref.len = 3;
        ref.n[0] = (unsigned)(a & 0x3ffff);
        ref.n[1] = (unsigned)(a >> 18);
        ref.n[2] = (unsigned)(a >> 50);
        ref.creation = 1;
        return ei_x_encode_ref(x, &ref);
    }
    default:
        fatal("encoding a freed term");
        return -1;
    }
}

int enif_term_to_binary(ErlNifEnv *env, ERL_NIF_TERM term, ErlNifBinary *bin) {
    ei_x_buff x;
    env_check(env, "enif_term_to_binary");
    if (ei_x_new_with_version(&x) < 0)
        return 0;
    if (encode(&x, term) < 0 || !enif_alloc_binary((size_t)x.index, bin)) {
        ei_x_free(&x);
        return 0;
    }
    memcpy(bin->data, x.buff, (size_t)x.index);
    ei_x_free(&x);
    return 1;
}

/* Decodes one term at *i; the bytes were checked by the core. */
static int decode(ErlNifEnv *env, const char *b, int *i, ERL_NIF_TERM *t,
                  int depth) {
    int type, size;
    if (depth > 1000 || ei_get_type(b, i, &type, &size) < 0)
        return -1;
    switch (type) {
    case ERL_SMALL_INTEGER_EXT:
    case ERL_INTEGER_EXT:
    case ERL_SMALL_BIG_EXT:
    case ERL_LARGE_BIG_EXT: {
        long long v;
        unsigned long long u;
        int j = *i;
        if (ei_decode_longlong(b, &j, &v) == 0) {
            *i = j;
            *t = make_i64(env, v);
            return 0;
        }
        if (ei_decode_ulonglong(b, i, &u) < 0)
            return -1;
        *t = make_int(env, 0, u);
        return 0;
    }
    case ERL_ATOM_EXT:
    case ERL_SMALL_ATOM_EXT:
    case ERL_ATOM_UTF8_EXT:
    case ERL_SMALL_ATOM_UTF8_EXT: {
        char name[MAXATOMLEN_UTF8];
        if (ei_decode_atom_as(b, i, name, sizeof name, ERLANG_UTF8, NULL,
                              NULL) < 0)
            return -1;
        *t = fake_atom(name);
        return 0;
    }
    case ERL_SMALL_TUPLE_EXT:
    case ERL_LARGE_TUPLE_EXT: {
        int arity;
        node_t *x;
        if (ei_decode_tuple_header(b, i, &arity) < 0)
            return -1;
        x = node_new(env->heap, N_TUPLE, (size_t)arity,
                     (size_t)arity * sizeof(ERL_NIF_TERM));
        for (int k = 0; k < arity; k++)
            if (decode(env, b, i, &x->v[k], depth + 1) < 0)
                return -1;
        *t = boxed(x);
        return 0;
    }
    case ERL_NIL_EXT:
        *i += 1;
        *t = NIL;
        return 0;
    case ERL_STRING_EXT: {
        /* Bytes, as a list of small integers. */
        const unsigned char *s = (const unsigned char *)b + *i + 3;
        ERL_NIF_TERM l = NIL;
        for (int k = size; k-- > 0;)
            l = cons(env, make_i64(env, s[k]), l);
        *i += 3 + size;
        *t = l;
        return 0;
    }
    case ERL_LIST_EXT: {
        int arity;
        ERL_NIF_TERM *e, tail, l;
        if (ei_decode_list_header(b, i, &arity) < 0 ||
            (e = malloc((size_t)arity * sizeof *e)) == NULL)
            return -1;
        for (int k = 0; k < arity; k++) {
            if (decode(env, b, i, &e[k], depth + 1) < 0) {
                free(e);
                return -1;
            }
        }
        if (decode(env, b, i, &tail, depth + 1) < 0) {
            free(e);
            return -1;
        }
        l = tail;
        for (int k = arity; k-- > 0;)
            l = cons(env, e[k], l);
        free(e);
        *t = l;
        return 0;
    }
    case ERL_BINARY_EXT: {
        long len;
        unsigned char *p = enif_make_new_binary(env, (size_t)size, t);
        return ei_decode_binary(b, i, p, &len);
    }
    case ERL_MAP_EXT: {
        int arity;
        node_t *x;
        if (ei_decode_map_header(b, i, &arity) < 0)
            return -1;
        x = node_new(env->heap, N_MAP, (size_t)arity,
                     2 * (size_t)arity * sizeof(ERL_NIF_TERM));
        for (int k = 0; k < 2 * arity; k++)
            if (decode(env, b, i, &x->v[k], depth + 1) < 0)
                return -1;
        *t = boxed(x);
        return 0;
    }
    case ERL_PID_EXT:
    case ERL_NEW_PID_EXT: {
        erlang_pid pid;
        if (ei_decode_pid(b, i, &pid) < 0 || strcmp(pid.node, FAKE_NODE) != 0)
            return -1;
        *t = (ERL_NIF_TERM)((uint64_t)pid.num << 2 | TAG_PID);
        return 0;
    }
    case ERL_PORT_EXT:
    case ERL_NEW_PORT_EXT:
    case ERL_V4_PORT_EXT: {
        erlang_port port;
        node_t *x;
        if (ei_decode_port(b, i, &port) < 0 ||
            strcmp(port.node, FAKE_NODE) != 0)
            return -1;
        x = node_new(env->heap, N_PORT, 0, 0);
        x->mag = port.id;
        *t = boxed(x);
        return 0;
    }
    default:
        return -1; /* floats, refs, funs: not needed here */
    }
}

size_t enif_binary_to_term(ErlNifEnv *env, const unsigned char *data, size_t sz,
                           ERL_NIF_TERM *term, unsigned int opts) {
    int i = 0, version;
    (void)opts;
    env_check(env, "enif_binary_to_term");
    if (sz < 2 || sz > INT32_MAX ||
        ei_decode_version((const char *)data, &i, &version) < 0 ||
        decode(env, (const char *)data, &i, term, 0) < 0 || (size_t)i > sz)
        return 0;
    return (size_t)i;
}

/* -------------------------------------------------------------- calling */

static ErlNifEntry *entry;
static void *priv;

int fake_load(ErlNifEntry *e) {
    ErlNifEnv *env = env_new(E_LOAD, NULL, NULL);
    int rc;
    entry = e;
    am_undefined = fake_atom("undefined");
    on_scheduler = 1;
    rc = e->load(env, &priv, fake_atom("undefined"));
    on_scheduler = 0;
    env_free(env);
    return rc;
}

int fake_upgrade(void) {
    ErlNifEnv *env = env_new(E_LOAD, NULL, NULL);
    void *old = priv;
    int rc;
    on_scheduler = 1;
    rc = entry->upgrade(env, &priv, &old, fake_atom("undefined"));
    on_scheduler = 0;
    env_free(env);
    return rc;
}

ERL_NIF_TERM fake_call(fake_proc_t *p, const char *name, unsigned argc, ...) {
    ERL_NIF_TERM argv[16], ret;
    const ErlNifFunc *f = NULL;
    ErlNifEnv *env;
    va_list ap;
    for (int i = 0; i < entry->num_of_funcs; i++)
        if (strcmp(entry->funcs[i].name, name) == 0 &&
            entry->funcs[i].arity == argc)
            f = &entry->funcs[i];
    if (f == NULL || argc > 16) {
        fprintf(stderr, "fake_erl_nif: no NIF %s/%u\n", name, argc);
        abort();
    }
    env = env_new(E_CALL, &p->heap, p);
    va_start(ap, argc);
    for (unsigned i = 0; i < argc; i++) {
        argv[i] = va_arg(ap, ERL_NIF_TERM);
        owned(env, argv[i], "fake_call (an argument)");
    }
    va_end(ap);
    on_scheduler = 1;
    ret = f->fptr(env, (int)argc, argv);
    on_scheduler = 0;
    p->raised = env->raised;
    p->reason = env->reason;
    if (ret == NON_VALUE && !env->raised)
        violation("%s/%u returned the non-value without raising", name, argc);
    else if (ret != NON_VALUE && env->raised)
        violation("%s/%u raised but returned a term", name, argc);
    else if (ret != NON_VALUE)
        owned(env, ret, name);
    env->magic = 0;
    free(env);
    return ret;
}

int fake_raised(const fake_proc_t *p, ERL_NIF_TERM *reason) {
    if (p->raised && reason != NULL)
        *reason = p->reason;
    return p->raised;
}

/* ------------------------------------------------------------ printing */

static size_t fmt(ERL_NIF_TERM t, char *buf, size_t size) {
    size_t n = 0;
#define PUT(...)                                                               \
    do {                                                                       \
        int k_ = snprintf(buf + (n < size ? n : size),                         \
                          n < size ? size - n : 0, __VA_ARGS__);               \
        n += k_ > 0 ? (size_t)k_ : 0;                                          \
    } while (0)
    if (t == NON_VALUE) {
        PUT("THE_NON_VALUE");
    } else if (t == NIL) {
        PUT("[]");
    } else if (TAG(t) == TAG_ATOM) {
        PUT("%s", atom_name(t));
    } else if (TAG(t) == TAG_SMALL) {
        PUT("%lld", (long long)((int64_t)t >> 2));
    } else if (TAG(t) == TAG_PID) {
        PUT("<0.%llu.0>", (unsigned long long)(t >> 2));
    } else {
        node_t *x = NODE(t);
        size_t k;
        switch (x->kind) {
        case N_INT:
            PUT("%s%llu", x->neg ? "-" : "", (unsigned long long)x->mag);
            break;
        case N_BIN:
            PUT("<<\"%.*s\">>", (int)x->n, (const char *)bin_data(x));
            break;
        case N_PORT:
            PUT("#Port<0.%llu>", (unsigned long long)x->mag);
            break;
        case N_RES:
            PUT("#Ref<%s>", x->res->type->name);
            break;
        case N_TUPLE:
            PUT("{");
            for (k = 0; k < x->n; k++) {
                n += fmt(x->v[k], buf + (n < size ? n : size),
                         n < size ? size - n : 0);
                if (k + 1 < x->n)
                    PUT(",");
            }
            PUT("}");
            break;
        case N_MAP:
            PUT("#{");
            for (k = 0; k < x->n; k++) {
                n += fmt(x->v[2 * k], buf + (n < size ? n : size),
                         n < size ? size - n : 0);
                PUT("=>");
                n += fmt(x->v[2 * k + 1], buf + (n < size ? n : size),
                         n < size ? size - n : 0);
                if (k + 1 < x->n)
                    PUT(",");
            }
            PUT("}");
            break;
        case N_CONS:
            PUT("[");
            for (; IS_NODE(t, N_CONS); t = NODE(t)->v[1]) {
                n += fmt(NODE(t)->v[0], buf + (n < size ? n : size),
                         n < size ? size - n : 0);
                if (IS_NODE(NODE(t)->v[1], N_CONS))
                    PUT(",");
            }
            if (t != NIL) {
                PUT("|");
                n += fmt(t, buf + (n < size ? n : size),
                         n < size ? size - n : 0);
            }
            PUT("]");
            break;
        default:
            PUT("#freed");
        }
    }
#undef PUT
    return n;
}

void fake_format(ERL_NIF_TERM t, char *buf, size_t size) {
    if (size == 0)
        return;
    buf[0] = 0;
    fmt(t, buf, size);
    buf[size - 1] = 0;
}

/* ------------------------------------------- hooks into moat_nif.c's build */

/* The janitor's and the reaper's queues, told apart by their condvars. */
typedef struct {
    uv_cond_t *cond;
    atomic_long pushes;  /* signals: jobs pushed */
    atomic_long drained; /* pushes seen by the last wait: all done */
} jq_t;

static pthread_mutex_t jq_lock =
    PTHREAD_MUTEX_INITIALIZER; /* guards jqs, njqs */
static jq_t jqs[8];
static int njqs;

static jq_t *jq_of(uv_cond_t *c) {
    jq_t *q = NULL;
    pthread_mutex_lock(&jq_lock);
    for (int i = 0; i < njqs; i++)
        if (jqs[i].cond == c)
            q = &jqs[i];
    if (q == NULL) {
        if (njqs == 8)
            fatal("more job queues than moat_nif.c has");
        q = &jqs[njqs++];
        q->cond = c;
    }
    pthread_mutex_unlock(&jq_lock);
    return q;
}

/* Both are called with the queue's lock held. */
void fake_uv_cond_signal(uv_cond_t *cond);
void fake_uv_cond_signal(uv_cond_t *cond) {
    atomic_fetch_add(&jq_of(cond)->pushes, 1);
    uv_cond_signal(cond);
}

void fake_uv_cond_wait(uv_cond_t *cond, uv_mutex_t *mutex);
void fake_uv_cond_wait(uv_cond_t *cond, uv_mutex_t *mutex) {
    jq_t *q = jq_of(cond);
    atomic_store(&q->drained, atomic_load(&q->pushes));
    uv_cond_wait(cond, mutex);
}

static long jq_pushes(int *all_drained) {
    long sum = 0;
    *all_drained = 1;
    pthread_mutex_lock(&jq_lock);
    for (int i = 0; i < njqs; i++) {
        long p = atomic_load(&jqs[i].pushes);
        sum += p;
        if (atomic_load(&jqs[i].drained) != p)
            *all_drained = 0;
    }
    pthread_mutex_unlock(&jq_lock);
    return sum;
}

int fake_quiesce(int timeout_ms) {
    for (long waited_us = 0; waited_us <= (long)timeout_ms * 1000;
         waited_us += 200) {
        int drained, again;
        long before = jq_pushes(&drained);
        if (drained && READ(live_res) == 0) {
            /* No job was pushed while we looked: every queue is empty. */
            long after = jq_pushes(&again);
            if (again && after == before)
                return 1;
        }
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static _Thread_local int frozen;
static _Thread_local uint64_t frozen_at, frozen_until;

void fake_freeze_clock(int on) {
    frozen = on;
    frozen_at = uv_hrtime();
    frozen_until = frozen_at + 10ull * 1000000000ull;
}

uint64_t fake_uv_hrtime(void);
uint64_t fake_uv_hrtime(void) {
    uint64_t now = uv_hrtime();
    return frozen && now < frozen_until ? frozen_at : now;
}
