/*
 * loader.c: loading and checking task libraries.
 *
 * dlopen returns the object already mapped for a path, so a library
 * rebuilt in place would never be loaded again.  Each load therefore copies
 * the file to a path of its own ($TMPDIR or /tmp, "moat-<pid>-<n>-<name>",
 * created with O_EXCL so no other process's file is ever opened), dlopens
 * the copy and unlinks it at once, whatever happened: the mapping keeps the
 * code and nothing is left behind on disk.
 *
 * The copy is opened without RTLD_NODELETE first and checked; only a
 * library that passes is pinned, by a second dlopen of the same name with
 * RTLD_NOLOAD | RTLD_NODELETE (glibc finds the loaded object by name, so
 * this works after the unlink).  A rejected library is unmapped again,
 * while an accepted one stays mapped for the life of the process, so a
 * thread still inside an abandoned task never runs unmapped code.
 *
 * A moat_lib_t is immutable once open returns: any thread may look tasks
 * up in it.  Look-ups go through two small open-addressing hash tables
 * keyed by the name's bytes, kept at most half full.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moat_core.h"

/* An atom's limit: task and server names become atoms on the Erlang side. */
#define NAME_MAX_BYTES 255

/* A table this long has most likely lost its NULL-name terminator; stop
 * before reading unrelated memory for ever. */
#define MAX_ENTRIES 65536

/* Enough of the original file name to recognise the copy in /proc/pid/maps
 * while keeping the copy's name well under NAME_MAX. */
#define COPY_BASENAME_MAX 128

/* Attempts at a fresh copy name before giving up: collisions come only from
 * files a dead process with the same pid left behind. */
#define COPY_NAME_TRIES 64

#define COPY_CHUNK 65536

typedef struct {
    const void *def; /* moat_task_def_t or moat_server_def_t; NULL: empty */
    const char *name;
    uint32_t hash;
    uint32_t len;
} slot_t;

typedef struct {
    slot_t *slots;
    uint32_t mask; /* capacity - 1, capacity a power of two */
} table_t;

struct moat_lib_s {
    void *handle;
    const moat_library_t *def;
    table_t tasks;
    table_t servers;
    slot_t storage[]; /* both tables' slots */
};

/* Numbers copies made by this process. */
static atomic_ulong copy_counter;

/* Sets *errmsg to "moat: <path>: <fault>" and returns err. */
static int fail(char **errmsg, int err, const char *path, const char *fmt,
                ...) __attribute__((format(printf, 4, 5)));
static int fail(char **errmsg, int err, const char *path, const char *fmt,
                ...) {
    char *fault = NULL, *msg = NULL;
    va_list ap;

    if (errmsg == NULL)
        return err;
    va_start(ap, fmt);
    if (vasprintf(&fault, fmt, ap) < 0)
        fault = NULL;
    va_end(ap);
    if (fault == NULL || asprintf(&msg, "moat: %s: %s", path, fault) < 0)
        msg = NULL;
    free(fault);
    free(*errmsg);
    *errmsg = msg;
    return err;
}

static int write_all(int fd, const char *buf, size_t len) {
    ssize_t n;

    while (len > 0) {
        n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int copy_fd(int from, int to) {
    char *buf = malloc(COPY_CHUNK);
    ssize_t n;
    int rc = 0;

    if (buf == NULL)
        return -ENOMEM;
    for (;;) {
        n = read(from, buf, COPY_CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            break;
        }
        if (n == 0)
            break;
        rc = write_all(to, buf, (size_t)n);
        if (rc < 0)
            break;
    }
    free(buf);
    return rc;
}

/* Copies `path` to a fresh file named into tmp[0..size). */
static int copy_to_temp(const char *path, char *tmp, size_t size,
                        char **errmsg) {
    const char *dir = getenv("TMPDIR"), *base = strrchr(path, '/');
    size_t blen;
    struct stat st;
    int src, dst = -1, rc, tries, n;

    src = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (src < 0)
        return fail(errmsg, -errno, path, "cannot open: %s", strerror(errno));
    if (fstat(src, &st) < 0) {
        rc = fail(errmsg, -errno, path, "cannot stat: %s", strerror(errno));
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = fail(errmsg, -EISDIR, path, "is a directory, not a library");
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = fail(errmsg, MOAT_EBADLIB, path, "not a regular file");
        goto fail;
    }
    if (dir == NULL || dir[0] == '\0')
        dir = "/tmp";
    base = base != NULL ? base + 1 : path;
    blen = strnlen(base, COPY_BASENAME_MAX);
    for (tries = 0; tries < COPY_NAME_TRIES; tries++) {
        n = snprintf(tmp, size, "%s/moat-%ld-%lu-%.*s", dir, (long)getpid(),
                     atomic_fetch_add(&copy_counter, 1), (int)blen, base);
        if (n < 0 || (size_t)n >= size) {
            rc = fail(errmsg, -ENAMETOOLONG, path,
                      "cannot copy: $TMPDIR path too long");
            goto fail;
        }
        dst = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0700);
        if (dst >= 0 || errno != EEXIST)
            break;
    }
    if (dst < 0) {
        rc = fail(errmsg, -errno, path, "cannot create %s: %s", tmp,
                  strerror(errno));
        goto fail;
    }
    rc = copy_fd(src, dst);
    if (close(dst) < 0 && rc == 0)
        rc = -errno;
    if (rc < 0) {
        unlink(tmp);
        rc = fail(errmsg, rc, path, "cannot copy to %s: %s", tmp,
                  strerror(-rc));
        goto fail;
    }
    close(src);
    return 0;

fail:
    close(src);
    return rc;
}

static uint32_t hash_name(const char *name, size_t len) {
    uint32_t h = 2166136261u; /* FNV-1a */
    size_t i;

    for (i = 0; i < len; i++) {
        h ^= (unsigned char)name[i];
        h *= 16777619u;
    }
    return h;
}

/* The smallest power of two at least twice n, so a probe always meets an
 * empty slot. */
static uint32_t capacity_for(size_t n) {
    uint32_t cap = 1;

    while (cap < 2 * n)
        cap <<= 1;
    return cap;
}

/* Inserts; returns the entry already holding the name, else NULL. */
static const void *insert(table_t *t, const char *name, size_t len,
                          const void *def) {
    uint32_t h = hash_name(name, len), i;
    slot_t *s;

    for (i = h & t->mask;; i = (i + 1) & t->mask) {
        s = &t->slots[i];
        if (s->def == NULL)
            break;
        if (s->hash == h && s->len == len && memcmp(s->name, name, len) == 0)
            return s->def;
    }
    s->def = def;
    s->name = name;
    s->hash = h;
    s->len = (uint32_t)len;
    return NULL;
}

static const void *lookup(const table_t *t, const char *name, size_t len) {
    uint32_t h, i;
    const slot_t *s;

    if (name == NULL || len == 0 || len > NAME_MAX_BYTES)
        return NULL;
    h = hash_name(name, len);
    for (i = h & t->mask;; i = (i + 1) & t->mask) {
        s = &t->slots[i];
        if (s->def == NULL)
            return NULL;
        if (s->hash == h && s->len == len && memcmp(s->name, name, len) == 0)
            return s->def;
    }
}

/* Checks one name; `what` and `i` say which entry for the message. */
static int check_name(const char *name, const char *what, size_t i,
                      const char *path, char **errmsg) {
    size_t len = strnlen(name, NAME_MAX_BYTES + 1);

    if (len == 0)
        return fail(errmsg, MOAT_EBADLIB, path, "%s %zu has an empty name",
                    what, i);
    if (len > NAME_MAX_BYTES)
        return fail(errmsg, MOAT_EBADLIB, path,
                    "%s %zu has a name longer than %d bytes (\"%.32s...\")",
                    what, i, NAME_MAX_BYTES, name);
    return 0;
}

static int too_many(char **errmsg, const char *what, const char *path) {
    return fail(errmsg, MOAT_EBADLIB, path,
                "more than %d %s (is the table missing its NULL-name "
                "terminator?)",
                MAX_ENTRIES, what);
}

static int check_library(const moat_library_t *def, size_t *ntasks,
                         size_t *nservers, const char *path, char **errmsg) {
    if (def == NULL)
        return fail(errmsg, MOAT_EBADLIB, path, "moat_library() returned NULL");
    if (def->abi_version != MOAT_ABI_VERSION)
        return fail(errmsg, MOAT_EABI, path,
                    "built for moat ABI version %u, this moat has ABI "
                    "version %d",
                    (unsigned)def->abi_version, MOAT_ABI_VERSION);
    if (def->size < sizeof(moat_library_t))
        return fail(errmsg, MOAT_EBADLIB, path,
                    "library table is %u bytes, expected at least %zu",
                    (unsigned)def->size, sizeof(moat_library_t));
    if (def->name == NULL)
        return fail(errmsg, MOAT_EBADLIB, path, "library has no name");
    if (def->tasks == NULL)
        return fail(errmsg, MOAT_EBADLIB, path, "library has no task table");
    for (*ntasks = 0; def->tasks[*ntasks].name != NULL; (*ntasks)++)
        if (*ntasks == MAX_ENTRIES)
            return too_many(errmsg, "tasks", path);
    *nservers = 0;
    if (def->servers != NULL)
        for (; def->servers[*nservers].name != NULL; (*nservers)++)
            if (*nservers == MAX_ENTRIES)
                return too_many(errmsg, "servers", path);
    return 0;
}

/* Fills the look-up tables, checking every entry on the way. */
static int index_library(moat_lib_t *lib, size_t ntasks, size_t nservers,
                         const char *path, char **errmsg) {
    const moat_task_def_t *t;
    const moat_server_def_t *s;
    size_t i;
    int rc;

    for (i = 0; i < ntasks; i++) {
        t = &lib->def->tasks[i];
        rc = check_name(t->name, "task", i, path, errmsg);
        if (rc < 0)
            return rc;
        if (t->run == NULL)
            return fail(errmsg, MOAT_EBADLIB, path,
                        "task \"%s\" has no function", t->name);
        if (insert(&lib->tasks, t->name, strlen(t->name), t) != NULL)
            return fail(errmsg, MOAT_EBADLIB, path,
                        "two tasks are named \"%s\"", t->name);
    }
    for (i = 0; i < nservers; i++) {
        s = &lib->def->servers[i];
        rc = check_name(s->name, "server", i, path, errmsg);
        if (rc < 0)
            return rc;
        if (s->init == NULL || s->handle_call == NULL)
            return fail(errmsg, MOAT_EBADLIB, path,
                        "server \"%s\" has no %s function", s->name,
                        s->init == NULL ? "init" : "handle_call");
        if (insert(&lib->servers, s->name, strlen(s->name), s) != NULL)
            return fail(errmsg, MOAT_EBADLIB, path,
                        "two servers are named \"%s\"", s->name);
    }
    return 0;
}

/* dlerror's text names the copy; the message names the original already. */
static const char *dl_fault(const char *tmp) {
    const char *e = dlerror();
    size_t n = strlen(tmp);

    if (e == NULL)
        return "unknown dynamic loader error";
    if (strncmp(e, tmp, n) == 0 && strncmp(e + n, ": ", 2) == 0)
        return e + n + 2;
    return e;
}

int moat_lib_open(const char *path, moat_lib_t **libp, char **errmsg) {
    char tmp[PATH_MAX];
    const moat_library_t *def;
    moat_library_fn entry;
    size_t ntasks = 0, nservers = 0;
    uint32_t tcap, scap;
    moat_lib_t *lib = NULL;
    void *handle, *pin, *sym;
    int rc;

    if (errmsg != NULL)
        *errmsg = NULL;
    if (libp == NULL || path == NULL)
        return fail(errmsg, MOAT_EINVAL, path ? path : "(null)",
                    "no path or no result pointer");
    *libp = NULL;
    rc = copy_to_temp(path, tmp, sizeof(tmp), errmsg);
    if (rc < 0)
        return rc;
    handle = dlopen(tmp, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        rc = fail(errmsg, MOAT_EBADLIB, path, "cannot load: %s",
                  dl_fault(tmp));
        unlink(tmp);
        return rc;
    }
    unlink(tmp);

    dlerror();
    sym = dlsym(handle, MOAT_LIBRARY_ENTRY);
    if (sym == NULL) {
        rc = fail(errmsg, MOAT_EBADLIB, path,
                  "not a task library (no %s symbol)", MOAT_LIBRARY_ENTRY);
        goto fail;
    }
    memcpy(&entry, &sym, sizeof(entry)); /* ISO C has no void * to fn cast */
    def = entry();
    rc = check_library(def, &ntasks, &nservers, path, errmsg);
    if (rc < 0)
        goto fail;

    tcap = capacity_for(ntasks);
    scap = capacity_for(nservers);
    lib = calloc(1, sizeof(*lib) + ((size_t)tcap + scap) * sizeof(slot_t));
    if (lib == NULL) {
        rc = fail(errmsg, -ENOMEM, path, "out of memory");
        goto fail;
    }
    lib->handle = handle;
    lib->def = def;
    lib->tasks.slots = lib->storage;
    lib->tasks.mask = tcap - 1;
    lib->servers.slots = lib->storage + tcap;
    lib->servers.mask = scap - 1;
    rc = index_library(lib, ntasks, nservers, path, errmsg);
    if (rc < 0)
        goto fail;

    pin = dlopen(tmp, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE | RTLD_NOLOAD);
    if (pin == NULL) {
        rc = fail(errmsg, MOAT_EBADLIB, path, "cannot pin: %s",
                  dl_fault(tmp));
        goto fail;
    }
    dlclose(pin); /* the flag stays; the reference was only borrowed */
    *libp = lib;
    return 0;

fail:
    free(lib);
    dlclose(handle);
    return rc;
}

void moat_lib_close(moat_lib_t *lib) {
    if (lib == NULL)
        return;
    dlclose(lib->handle); /* pinned: the code stays mapped */
    free(lib);
}

const char *moat_lib_name(const moat_lib_t *lib) {
    return lib->def->name;
}

const moat_library_t *moat_lib_def(const moat_lib_t *lib) { return lib->def; }

const moat_task_def_t *moat_lib_task(const moat_lib_t *lib, const char *name,
                                     size_t len) {
    return lookup(&lib->tasks, name, len);
}

const moat_server_def_t *moat_lib_server(const moat_lib_t *lib,
                                         const char *name, size_t len) {
    return lookup(&lib->servers, name, len);
}
