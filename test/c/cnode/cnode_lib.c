/*
 * cnode_lib.c: a task library of test_cnode's own, for what the demo
 * cannot show: tasks that write to stderr or stdout, whose lines the
 * C-node must forward to the VM as log frames (and whose stdout must not
 * reach the frames on the C-node's own stdout).
 *
 * Tasks:
 *   say [Binary]     writes Binary and a newline to stderr, returns ok
 *   print [Binary]   prints Binary and a newline to stdout (stdio,
 *                    flushed), returns ok
 */
#include <stdio.h>
#include <string.h>

#include "moat.h"

/* Reads [Binary] into text (NUL-terminated).  Returns its length or -1. */
static long one_binary(const char *args, int len, char *text, int cap) {
    int index = 0, arity, type, size;
    long n;

    if (ei_decode_version(args, &index, NULL) < 0 ||
        ei_decode_list_header(args, &index, &arity) < 0 || arity != 1 ||
        ei_get_type(args, &index, &type, &size) < 0 ||
        type != ERL_BINARY_EXT || size >= cap ||
        ei_decode_binary(args, &index, text, &n) < 0 || index > len)
        return -1;
    text[n] = '\0';
    return n;
}

/* Writes its one binary argument and a newline to `f`, and flushes it. */
static int say_on(FILE *f, const char *args, int len, ei_x_buff *out) {
    char text[256];

    if (one_binary(args, len, text, sizeof text) < 0) {
        ei_x_encode_atom(out, "badarg");
        return MOAT_EXIT;
    }
    fprintf(f, "%s\n", text);
    fflush(f);
    ei_x_encode_atom(out, "ok");
    return MOAT_OK;
}

static int task_say(moat_ctx_t *ctx, const char *args, int len,
                    ei_x_buff *out) {
    (void)ctx;
    return say_on(stderr, args, len, out);
}

static int task_print(moat_ctx_t *ctx, const char *args, int len,
                      ei_x_buff *out) {
    (void)ctx;
    return say_on(stdout, args, len, out);
}

static const moat_task_def_t tasks[] = {
    {"say", task_say},
    {"print", task_print},
    {NULL, NULL},
};

MOAT_LIBRARY("cnode_lib", tasks, NULL)
