/* fake_cnode.h: private to test/c/nif.  The C-node's side of the port
 * protocol (doc/cnode.md), for test_nif.c to play the C-node: the frames
 * the NIF sends, parsed with ei, and frames for cnode_deliver, encoded
 * with ei.  Apart from test_nif.c, because ei.h brings in the socket API,
 * whose recv clashes with the test's helper.  Any thread. */
#ifndef MOAT_TEST_FAKE_CNODE_H
#define MOAT_TEST_FAKE_CNODE_H

#include <stddef.h>
#include <stdint.h>

/* moat_nif.c's BATCH: the most tasks one runs frame names. */
#define FAKE_FRAME_TASKS 64

/* A frame the NIF sent: {run, Tag, Task, Args}, {runs, [{Tag, Task,
 * Args}]} or {cancel, Tag, Reason}. */
typedef struct {
    char what[16];   /* run, runs or cancel */
    char text[2048]; /* the term as ei prints it: {run, 3, echo, [x]} */
    int n;           /* the tasks it names: 1 for run and cancel */
    uint64_t tag[FAKE_FRAME_TASKS];
    char task[FAKE_FRAME_TASKS][32];
    char reason[16]; /* cancel */
    /* Each task's first argument, encoded (no version byte). */
    char arg[FAKE_FRAME_TASKS][256];
    int arg_len[FAKE_FRAME_TASKS];
} fake_frame_t;

/* Parses one packet as the C-node reads it.  Returns 0, or -1 when it is
 * not exactly one run, runs or cancel frame (then f->text holds the term
 * if it is one, else ""). */
int fake_frame_parse(const unsigned char *pkt, size_t len, fake_frame_t *f);

/* A frame for cnode_deliver: the term written in ei_x_format's syntax
 * once printf's conversions are done, with the version byte.  Returns
 * malloc'd bytes (their length in *len), or NULL when ei cannot encode
 * the text. */
unsigned char *fake_frame_format(size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The done frame of a C-node whose tasks echo their first argument:
 * {done, [{Tag, ok, Arg}]} for each task of f, in order.  malloc'd. */
unsigned char *fake_frame_echo(const fake_frame_t *f, size_t *len);

/* {stopped, Tags}, the tags (each below 256) written as ei writes a list
 * of bytes: a string.  malloc'd. */
unsigned char *fake_frame_stopped_bytes(const uint64_t *tags, int n,
                                        size_t *len);

#endif
