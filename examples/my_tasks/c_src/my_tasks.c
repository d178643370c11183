/*
 * my_tasks.c: an example task library for moat, built into
 * priv/my_tasks.so by c_src/Makefile (doc/task_library.md walks through
 * it).
 *
 * Tasks (each gets its arguments as a list):
 *   mean [Numbers]      the arithmetic mean of a list of integers and
 *                       floats, as a float.  An empty list is an error
 *                       value: {native_error, <<"mean of an empty list">>}.
 *   adler32 [Binary]    the Adler-32 checksum of the bytes, an integer;
 *                       reads the binary where it lies in the arguments.
 *   count_primes [N]    how many primes are below N, by trial division: slow
 *                       on purpose, and it checks moat_should_stop() as it
 *                       goes, so a timeout or a cancel frees its thread.
 * Arguments of any other shape end the task with the atom badarg, the
 * exit reason a BIF would give.
 */
#include <stdint.h>
#include <string.h>

#include <moat.h>

/* Adler-32's modulus, the largest prime below 2^16. */
#define ADLER_MOD 65521u

/* Encoding into an ei_x_buff fails only when memory runs out. */
static int encoded(moat_ctx_t *ctx, int status, int ei_rc) {
    if (ei_rc < 0)
        return moat_error(ctx, "out of memory");
    return status;
}

/* Ends the task with reason badarg: arguments it does not accept. */
static int badarg(moat_ctx_t *ctx, ei_x_buff *out) {
    return encoded(ctx, MOAT_EXIT, ei_x_encode_atom(out, "badarg"));
}

/*
 * Opens an argument list that must hold exactly one element, [X], and
 * leaves *index on X.  Returns 0, or -1 for anything else (another length,
 * an improper list, not a list).
 *
 * term_to_binary writes a list of integers 0..255 as a string, so [7]
 * arrives as STRING_EXT "\7", not as a one-element LIST_EXT: then *small
 * is set to 1, *byte to X, and *index means nothing.
 */
static int one_arg(const char *args, int *index, int *small, long *byte) {
    int type, size, arity, end;

    *index = 0;
    *small = 0;
    if (ei_decode_version(args, index, &size) < 0 ||
        ei_get_type(args, index, &type, &size) < 0)
        return -1;
    if (type == ERL_STRING_EXT) {
        /* STRING_EXT: tag, two length bytes, the bytes */
        if (size != 1)
            return -1;
        *small = 1;
        *byte = (unsigned char)args[*index + 3];
        return 0;
    }
    if (ei_decode_list_header(args, index, &arity) < 0 || arity != 1)
        return -1;
    /* a proper list: after X comes the tail [] */
    end = *index;
    if (ei_skip_term(args, &end) < 0 ||
        ei_get_type(args, &end, &type, &size) < 0 || type != ERL_NIL_EXT)
        return -1;
    return 0;
}

/* ----------------------------------------------------------------- mean */

/* Reads one integer or float at *index as a double. */
static int number(const char *buf, int *index, double *x) {
    long long i;

    if (ei_decode_double(buf, index, x) == 0)
        return 0;
    if (ei_decode_longlong(buf, index, &i) == 0) {
        *x = (double)i;
        return 0;
    }
    return -1;
}

static int task_mean(moat_ctx_t *ctx, const char *args, int len,
                     ei_x_buff *out) {
    int index, small, type, size, n, i;
    double sum = 0.0, x;
    long ignored;

    (void)len; /* moat checked that args is one well-formed term */
    if (one_arg(args, &index, &small, &ignored) < 0 || small)
        return badarg(ctx, out);
    if (ei_get_type(args, &index, &type, &size) < 0)
        return badarg(ctx, out);
    if (type == ERL_NIL_EXT)
        return moat_error(ctx, "mean of an empty list");
    if (type == ERL_STRING_EXT) {
        /* the numbers are all integers 0..255, one byte each */
        for (i = 0; i < size; i++)
            sum += (unsigned char)args[index + 3 + i];
        return encoded(ctx, MOAT_OK, ei_x_encode_double(out, sum / size));
    }
    if (type != ERL_LIST_EXT || ei_decode_list_header(args, &index, &n) < 0)
        return badarg(ctx, out);
    for (i = 0; i < n; i++) {
        if (number(args, &index, &x) < 0)
            return badarg(ctx, out);
        sum += x;
    }
    /* an improper list ([1 | 2]) has a tail other than [] */
    if (ei_get_type(args, &index, &type, &size) < 0 || type != ERL_NIL_EXT)
        return badarg(ctx, out);
    return encoded(ctx, MOAT_OK, ei_x_encode_double(out, sum / n));
}

/* -------------------------------------------------------------- adler32 */

static int task_adler32(moat_ctx_t *ctx, const char *args, int len,
                        ei_x_buff *out) {
    const unsigned char *data;
    uint32_t a = 1, b = 0;
    int index, small, type, size, i;
    long ignored;

    (void)len;
    if (one_arg(args, &index, &small, &ignored) < 0 || small ||
        ei_get_type(args, &index, &type, &size) < 0 ||
        type != ERL_BINARY_EXT)
        return badarg(ctx, out);
    /* BINARY_EXT: tag, four length bytes, the bytes.  Reading them in
     * place saves the copy ei_decode_binary would make. */
    data = (const unsigned char *)args + index + 5;
    for (i = 0; i < size; i++) {
        a = (a + data[i]) % ADLER_MOD;
        b = (b + a) % ADLER_MOD;
    }
    return encoded(ctx, MOAT_OK, ei_x_encode_ulong(out, b << 16 | a));
}

/* --------------------------------------------------------- count_primes */

static int is_prime(unsigned long long n) {
    unsigned long long d;

    if (n < 2)
        return 0;
    for (d = 2; d * d <= n; d++)
        if (n % d == 0)
            return 0;
    return 1;
}

static int task_count_primes(moat_ctx_t *ctx, const char *args, int len,
                             ei_x_buff *out) {
    unsigned long long n, k, count = 0;
    int index, small;
    long byte;
    long long v;

    (void)len;
    if (one_arg(args, &index, &small, &byte) < 0)
        return badarg(ctx, out);
    if (small)
        v = byte;
    else if (ei_decode_longlong(args, &index, &v) < 0 || v < 0)
        return badarg(ctx, out);
    n = (unsigned long long)v;
    for (k = 0; k < n; k++) {
        /* One look per candidate: the call is an atomic load, far
         * cheaper than the trial division it sits beside. */
        if (moat_should_stop(ctx)) {
            /* Cancelled, timed out, or the pool is stopping.  moat has
             * already given the caller this task's outcome and discards
             * whatever it returns now: returning is what matters, since
             * it gives the thread back to the pool. */
            return encoded(ctx, MOAT_EXIT, ei_x_encode_atom(out, "shutdown"));
        }
        count += is_prime(k);
    }
    return encoded(ctx, MOAT_OK, ei_x_encode_ulonglong(out, count));
}

/* ---------------------------------------------------------------- table */

static const moat_task_def_t tasks[] = {
    {"mean", task_mean},
    {"adler32", task_adler32},
    {"count_primes", task_count_primes},
    {NULL, NULL},
};

MOAT_LIBRARY("my_tasks", tasks, NULL)
