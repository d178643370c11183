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
 *   close_frames []  in a worker of process isolation, closes the
 *                    descriptor its frames go out on (the write-only pipe
 *                    whose read end its parent holds), as a library that
 *                    closes every descriptor might; returns ok, which
 *                    cannot reach the parent any more
 *   fault_big [N]    touches N MiB of memory it keeps, then segfaults: a
 *                    worker that takes a while to be torn down
 *
 * Server `closer` (any start args): every call closes the frames'
 * descriptor of the servers' worker it runs in, as close_frames does,
 * and replies ok, which cannot reach the parent any more.
 */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* Whether process `pid` holds a descriptor on the pipe of inode `ino`. */
static int holds_pipe(pid_t pid, ino_t ino) {
    char path[64], link[64], want[64];
    struct dirent *de;
    DIR *d;
    int found = 0;

    snprintf(path, sizeof path, "/proc/%ld/fd", (long)pid);
    snprintf(want, sizeof want, "pipe:[%lu]", (unsigned long)ino);
    if ((d = opendir(path)) == NULL)
        return 0;
    while (!found && (de = readdir(d)) != NULL) {
        char fd_path[64 + 256];
        ssize_t n;
        snprintf(fd_path, sizeof fd_path, "%s/%s", path, de->d_name);
        n = readlink(fd_path, link, sizeof link - 1);
        if (n > 0) {
            link[n] = '\0';
            found = strcmp(link, want) == 0;
        }
    }
    closedir(d);
    return found;
}

/* Closes this process's write-only pipes whose read end its parent
 * holds: in a worker, its frames' descriptor. */
static void close_frames(void) {
    for (int fd = 3; fd < 1024; fd++) {
        struct stat st;
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || (fl & O_ACCMODE) != O_WRONLY || fstat(fd, &st) != 0 ||
            !S_ISFIFO(st.st_mode) || !holds_pipe(getppid(), st.st_ino))
            continue;
        close(fd);
    }
}

static int task_close_frames(moat_ctx_t *ctx, const char *args, int len,
                             ei_x_buff *out) {
    (void)ctx;
    (void)args;
    (void)len;
    close_frames();
    ei_x_encode_atom(out, "ok");
    return MOAT_OK;
}

static int task_fault_big(moat_ctx_t *ctx, const char *args, int len,
                          ei_x_buff *out) {
    int index = 0, arity;
    long mib;
    volatile char *p;

    if (ei_decode_version(args, &index, NULL) < 0 ||
        ei_decode_list_header(args, &index, &arity) < 0 || arity != 1 ||
        ei_decode_long(args, &index, &mib) < 0 || index > len || mib < 0 ||
        mib > 4096 || (p = malloc((size_t)mib << 20)) == NULL)
        return moat_error(ctx, "badarg");
    for (size_t i = 0; i < (size_t)mib << 20; i += 4096)
        p[i] = 1;
    (void)out;
    raise(SIGSEGV);
    return MOAT_OK; /* not reached */
}

static int closer_init(moat_ctx_t *ctx, const char *args, int len,
                       void **state, ei_x_buff *out) {
    (void)ctx;
    (void)args;
    (void)len;
    (void)out;
    *state = NULL;
    return MOAT_OK;
}

static int closer_call(moat_ctx_t *ctx, void *state, const char *req,
                       int len, ei_x_buff *out) {
    (void)state;
    (void)req;
    (void)len;
    return task_close_frames(ctx, NULL, 0, out);
}

static int closer_cast(moat_ctx_t *ctx, void *state, const char *req,
                       int len, ei_x_buff *out) {
    (void)ctx;
    (void)state;
    (void)req;
    (void)len;
    (void)out;
    return MOAT_OK;
}

static void closer_terminate(moat_ctx_t *ctx, void *state, const char *reason,
                             int reason_len) {
    (void)ctx;
    (void)state;
    (void)reason;
    (void)reason_len;
}

static const moat_task_def_t tasks[] = {
    {"say", task_say},
    {"print", task_print},
    {"close_frames", task_close_frames},
    {"fault_big", task_fault_big},
    {NULL, NULL},
};

static const moat_server_def_t servers[] = {
    {"closer", closer_init, closer_call, closer_cast, closer_terminate},
    {NULL, NULL, NULL, NULL, NULL},
};

MOAT_LIBRARY("cnode_lib", tasks, servers)
