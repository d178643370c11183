/*
 * fake_cnode.c: the C-node's side of the port protocol for the NIF
 * harness (see fake_cnode.h).  Parsing follows doc/cnode.md to the
 * letter, so that a frame of another shape, or a packet holding anything
 * but one term, fails the test that reads it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ei.h>

#include "fake_cnode.h"

/* A task's argument list; its first element goes to f->arg[k]. */
static int parse_args(const char *b, int *i, fake_frame_t *f, int k) {
    int type, size, n, start;
    if (ei_get_type(b, i, &type, &size) < 0)
        return -1;
    if (type == ERL_STRING_EXT) { /* bytes: the first, as an integer */
        f->arg_len[k] = 0;
        if (size > 0)
            ei_encode_ulong(f->arg[k], &f->arg_len[k],
                            (unsigned char)b[*i + 3]);
        return ei_skip_term(b, i);
    }
    if (ei_decode_list_header(b, i, &n) < 0)
        return -1;
    for (int a = 0; a < n; a++) {
        start = *i;
        if (ei_skip_term(b, i) < 0)
            return -1;
        if (a == 0) {
            if (*i - start > (int)sizeof f->arg[k])
                return -1;
            memcpy(f->arg[k], b + start, (size_t)(*i - start));
            f->arg_len[k] = *i - start;
        }
    }
    if (n == 0)
        return 0;
    return ei_get_type(b, i, &type, &size) == 0 && type == ERL_NIL_EXT
               ? ei_skip_term(b, i)
               : -1; /* an improper list */
}

/* Tag, Task, Args: the elements of a run frame after its atom. */
static int parse_task(const char *b, int *i, fake_frame_t *f) {
    EI_ULONGLONG tag;
    int k = f->n++;
    if (k == FAKE_FRAME_TASKS || ei_decode_ulonglong(b, i, &tag) < 0 ||
        ei_decode_atom_as(b, i, f->task[k], sizeof f->task[k], ERLANG_UTF8,
                          NULL, NULL) < 0)
        return -1;
    f->tag[k] = tag;
    return parse_args(b, i, f, k);
}

int fake_frame_parse(const unsigned char *pkt, size_t len, fake_frame_t *f) {
    const char *b = (const char *)pkt;
    char *s = NULL;
    int i = 0, v, arity, n, start, ok = 0;
    memset(f, 0, sizeof *f);
    if (len < 2 || len > INT32_MAX || ei_decode_version(b, &i, &v) < 0)
        return -1;
    start = i;
    if (ei_s_print_term(&s, b, &i) < 0 || (size_t)i != len) {
        free(s);
        return -1;
    }
    snprintf(f->text, sizeof f->text, "%s", s);
    free(s);
    i = start;
    if (ei_decode_tuple_header(b, &i, &arity) < 0 ||
        ei_decode_atom_as(b, &i, f->what, sizeof f->what, ERLANG_UTF8, NULL,
                          NULL) < 0)
        return -1;
    if (strcmp(f->what, "run") == 0 && arity == 4) {
        ok = parse_task(b, &i, f) == 0;
    } else if (strcmp(f->what, "runs") == 0 && arity == 2 &&
               ei_decode_list_header(b, &i, &n) == 0 && n > 0) {
        ok = 1;
        for (int k = 0; k < n && ok; k++)
            ok = ei_decode_tuple_header(b, &i, &arity) == 0 && arity == 3 &&
                 parse_task(b, &i, f) == 0;
        ok = ok && ei_skip_term(b, &i) == 0; /* the list's tail */
    } else if (strcmp(f->what, "cancel") == 0 && arity == 3) {
        EI_ULONGLONG tag;
        ok = ei_decode_ulonglong(b, &i, &tag) == 0 &&
             ei_decode_atom_as(b, &i, f->reason, sizeof f->reason, ERLANG_UTF8,
                               NULL, NULL) == 0 &&
             (strcmp(f->reason, "shutdown") == 0 ||
              strcmp(f->reason, "killed") == 0 ||
              strcmp(f->reason, "timeout") == 0);
        f->tag[0] = tag;
        f->n = 1;
    }
    return ok && (size_t)i == len ? 0 : -1;
}

/* The buffer of x, handed to the caller (ei allocates with malloc). */
static unsigned char *take_buff(ei_x_buff *x, size_t *len) {
    *len = (size_t)x->index;
    return (unsigned char *)x->buff;
}

unsigned char *fake_frame_format(size_t *len, const char *fmt, ...) {
    char text[4096];
    ei_x_buff x;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (ei_x_new_with_version(&x) < 0)
        return NULL;
    if (ei_x_format_wo_ver(&x, text) < 0) {
        ei_x_free(&x);
        return NULL;
    }
    return take_buff(&x, len);
}

unsigned char *fake_frame_echo(const fake_frame_t *f, size_t *len) {
    ei_x_buff x;
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "done");
    ei_x_encode_list_header(&x, f->n);
    for (int i = 0; i < f->n; i++) {
        ei_x_encode_tuple_header(&x, 3);
        ei_x_encode_ulonglong(&x, f->tag[i]);
        ei_x_encode_atom(&x, "ok");
        ei_x_append_buf(&x, f->arg[i], f->arg_len[i]);
    }
    ei_x_encode_empty_list(&x);
    return take_buff(&x, len);
}

unsigned char *fake_frame_stopped_bytes(const uint64_t *tags, int n,
                                        size_t *len) {
    char s[256];
    ei_x_buff x;
    for (int i = 0; i < n && i < (int)sizeof s; i++)
        s[i] = (char)tags[i];
    ei_x_new_with_version(&x);
    ei_x_encode_tuple_header(&x, 2);
    ei_x_encode_atom(&x, "stopped");
    ei_x_encode_string_len(&x, s, n);
    return take_buff(&x, len);
}
