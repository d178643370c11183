/* frame.h: private to c_src/cnode.  The decoders of the frames the VM sends
 * to moat_cnode (doc/cnode.md, "VM -> C-node"), and of those a worker
 * process sends to its parent in process isolation (the "C-node -> VM"
 * frames): one packet's bytes in, one C struct out.
 *
 * It is pure and bounds-checked: it does no I/O, keeps no state between
 * calls, never reads outside buf[0..len) and never crashes, whatever the
 * bytes, so a fuzz target can call it directly.  A frame is trusted only
 * after moat_etf_check has passed it; a frame that fails is still read as
 * far as bounded reads go, so that the tags of the tasks it meant to run
 * can be answered `badarg`. */
#ifndef MOAT_CNODE_FRAME_H
#define MOAT_CNODE_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "moat_core.h"

/* A packet's length, and the integers inside ETF, are 4 bytes big-endian. */
static inline uint32_t moat__be32(const void *p) {
    const unsigned char *u = p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 |
           u[3];
}

static inline void moat__put_be32(void *p, uint32_t v) {
    unsigned char *u = p;
    u[0] = (unsigned char)(v >> 24);
    u[1] = (unsigned char)(v >> 16);
    u[2] = (unsigned char)(v >> 8);
    u[3] = (unsigned char)v;
}

/* A worker's notice carries an 8-byte big-endian value (cnode.h). */
static inline uint64_t moat__be64(const void *p) {
    const unsigned char *u = p;
    return (uint64_t)moat__be32(u) << 32 | moat__be32(u + 4);
}

static inline void moat__put_be64(void *p, uint64_t v) {
    unsigned char *u = p;
    moat__put_be32(u, (uint32_t)(v >> 32));
    moat__put_be32(u + 4, (uint32_t)v);
}

typedef enum {
    MOAT__FRAME_NONE = 0, /* not even the frame's kind could be read */
    MOAT__FRAME_HELLO,
    MOAT__FRAME_RUN,
    MOAT__FRAME_RUNS,
    MOAT__FRAME_CANCEL,
    MOAT__FRAME_CALL,           /* {call, Tag, Child, Request} */
    MOAT__FRAME_CAST,           /* {cast, Child, Request} */
    MOAT__FRAME_WHICH_CHILDREN, /* {which_children, Tag} */
    MOAT__FRAME_COUNT_CHILDREN, /* {count_children, Tag} */
    MOAT__FRAME_STOP_SERVERS    /* {stop_servers} */
} moat__frame_kind_t;

typedef enum {
    MOAT__ISOLATION_THREAD = 0, /* also when the option is absent */
    MOAT__ISOLATION_PROCESS
} moat__isolation_t;

/* An atom as it appears in the frame.  `name` points into the frame's
 * buffer: Latin-1 bytes when `latin1`, else UTF-8 (moat__atom_utf8 gives
 * UTF-8 either way).  `etf` and `etf_len` are the atom's whole encoding,
 * to copy into a reply as it is. */
typedef struct moat__atom_s {
    const char *name;
    size_t len;
    int latin1;
    const char *etf;
    size_t etf_len;
} moat__atom_t;

/* The defaults of process isolation's options (doc/cnode.md). */
#define MOAT__HELLO_SPARES 1
#define MOAT__HELLO_MAX_RESTARTS 3
#define MOAT__HELLO_MAX_SECONDS 5

/* One native server of hello's `servers`, {Id, Lib, Server, Args,
 * Restart, Shutdown}. */
typedef struct moat__child_s {
    moat_term_t *id;      /* any term, with the version byte */
    uint32_t lib;         /* an index into `libraries` */
    moat__atom_t server;  /* the server's name: points into the frame */
    moat_term_t *args;    /* the start argument list, with the version byte */
    int restart;          /* a moat_restart_t */
    int shutdown_ms;      /* >= 0, MOAT_SHUTDOWN_BRUTAL or _INFINITY */
} moat__child_t;

/* {hello, Opts}.  Absent options are 0, NULL or empty, except those of
 * process isolation, which take the defaults above. */
typedef struct moat__hello_s {
    unsigned size;          /* threads (workers), 1..1024; 0: absent */
    unsigned max_queue;     /* 0: absent (or 0) */
    char **libraries;       /* NUL-terminated paths, malloc'd */
    size_t nlibraries;
    moat__isolation_t isolation;
    char name[64];          /* UTF-8, cut at a character boundary */
    uint64_t max_memory;    /* bytes of address space; 0: no limit */
    unsigned spares;        /* process: idle workers beyond size, 0..1024 */
    unsigned max_restarts;  /* process: workers that may die on their own */
    unsigned max_seconds;   /* ... within this many seconds, 1..; also the
                               native supervisor's intensity, with
                               max_restarts */
    moat__child_t *servers; /* the native servers, in start order; the
                               ids and args are freed by moat__frame_free
                               (take a reference to keep them) */
    size_t nservers;
    int strategy;           /* a moat_strategy_t; one_for_one if absent */
} moat__hello_t;

/* One task to run, from a run frame or an element of a runs frame. */
typedef struct moat__run_s {
    uint64_t tag;
    /* 0: run it.  MOAT_EBADTERM: the entry is malformed, answer the tag
     * with `badarg`.  UV_ENOMEM: no memory for its arguments, answer the
     * tag with `enomem`. */
    int status;
    moat__atom_t task;  /* status 0 only */
    moat_term_t *args;  /* status 0 only: the argument list (a list, with
                           the version byte).  moat__frame_free unrefs it
                           unless the caller took it and set it to NULL. */
} moat__run_t;

typedef struct moat__frame_s {
    moat__frame_kind_t kind;
    moat__hello_t hello;   /* MOAT__FRAME_HELLO */
    /* MOAT__FRAME_RUN and _RUNS: the entries whose tag could be read, in
     * frame order.  A run frame has at most one, in `one`. */
    moat__run_t *runs;
    size_t nruns;
    moat__run_t one;
    size_t untagged;       /* runs elements whose tag could not be read */
    uint64_t tag;          /* MOAT__FRAME_CANCEL, and call, which_children
                              and count_children when `tagged` */
    int tagged;            /* call, which_children, count_children: the
                              tag could be read (a malformed frame is then
                              answered badarg) */
    uint32_t child;        /* call and cast: the server's index in hello's
                              `servers` */
    moat_term_t *msg;      /* call and cast, well formed: the request, with
                              the version byte.  moat__frame_free unrefs
                              it unless the caller took it (set to NULL). */
    moat_atom_t reason;    /* MOAT__FRAME_CANCEL: shutdown, killed or
                              timeout; any other atom reads as shutdown */
    char why[160];         /* when malformed: what is wrong, as a phrase */
} moat__frame_t;

/*
 * Decodes one packet, buf[0..len) (the version byte, then one term), into
 * *f, which the caller then releases with moat__frame_free whatever this
 * returns.  Returns 0 when the frame is well formed; a runs frame may then
 * still hold entries whose status is not 0 (an element with a readable tag
 * but the wrong shape).  Returns MOAT_EBADTERM when the frame is malformed:
 * f->why says why, f->kind is set when the kind could be read, and for run
 * and runs frames f->runs holds the entries whose tag could be read, each
 * with a status of MOAT_EBADTERM, except the well-formed elements of a runs
 * frame whose other elements have the wrong shape.  Returns UV_ENOMEM when
 * no memory was left for the frame's own tables.
 *
 * Never reads outside buf[0..len) and never crashes on any input.  Any
 * thread; reentrant.
 */
int moat__frame_decode(const char *buf, size_t len, moat__frame_t *f);

/* Frees what moat__frame_decode allocated (argument terms not taken,
 * library paths, the runs table) and leaves *f empty.  Idempotent. */
void moat__frame_free(moat__frame_t *f);

/* Writes an atom's name as NUL-terminated UTF-8 into out[0..cap), cut at a
 * character boundary when it does not fit.  cap must be at least 1.
 * Returns the length written, not counting the NUL. */
size_t moat__atom_utf8(const moat__atom_t *a, char *out, size_t cap);

/* ------------------------------------------------ frames from a worker */

typedef enum {
    MOAT__WFRAME_NONE = 0,
    MOAT__WFRAME_READY,
    MOAT__WFRAME_ERROR,
    MOAT__WFRAME_DONE,
    MOAT__WFRAME_STOPPED,
    MOAT__WFRAME_LOG,
    /* The native servers' reports, from the servers' worker (srvworker.c
     * relays them to the VM as they are): */
    MOAT__WFRAME_RESTARTS,       /* {restarts, Total} */
    MOAT__WFRAME_CRASHED,        /* {crashed, N, Id, Reason} */
    MOAT__WFRAME_GAVE_UP,        /* {gave_up, Reason} */
    MOAT__WFRAME_SERVERS_STOPPED /* {servers_stopped} */
} moat__wframe_kind_t;

/* One {Tag, ok | exit, Term} of a done frame.  `term` points into the
 * frame's buffer: the term's encoding without a version byte. */
typedef struct moat__wdone_s {
    uint64_t tag;
    int kind;               /* MOAT_OK or MOAT_EXIT */
    const char *term;
    size_t len;
} moat__wdone_t;

typedef struct moat__wframe_s {
    moat__wframe_kind_t kind;
    moat__wdone_t *done;    /* MOAT__WFRAME_DONE, malloc'd */
    size_t ndone;
    uint64_t *tags;         /* MOAT__WFRAME_STOPPED, malloc'd */
    size_t ntags;
    char level[8];          /* MOAT__WFRAME_LOG: error, warning or info */
    const char *msg;        /* MOAT__WFRAME_LOG: into the buffer */
    size_t msg_len;
    const char *reason;     /* MOAT__WFRAME_ERROR and _GAVE_UP: the
                               Reason's encoding, no version byte, into the
                               buffer */
    size_t reason_len;
    char why[160];          /* when malformed: what is wrong */
} moat__wframe_t;

/*
 * Decodes one packet a worker sent, buf[0..len), into *f, which the
 * caller then releases with moat__wframe_free whatever this returns.  A
 * worker's bytes are not trusted (a task may have scribbled over its
 * memory before dying): the frame must pass moat_etf_check and then have
 * one of the shapes {ready, Pid, Tasks}, {error, Reason}, {done, [{Tag, ok
 * | exit, Term}]}, {stopped, [Tag]}, {log, Level, Binary}, or a server
 * worker's {restarts, Total}, {crashed, N, Id, Reason}, {gave_up, Reason}
 * or {servers_stopped}, else this
 * returns MOAT_EBADTERM (f->why says why) and nothing in *f counts.
 * Returns 0, MOAT_EBADTERM or UV_ENOMEM.  Never reads outside
 * buf[0..len).  Any thread; reentrant.
 */
int moat__wframe_decode(const char *buf, size_t len, moat__wframe_t *f);

/* Frees what moat__wframe_decode allocated.  Idempotent. */
void moat__wframe_free(moat__wframe_t *f);


/* ------------------------------------------------ distribution packets */

/* The byte that starts a packet sent without an atom cache, and the
 * operations of the control messages this node reads or writes (the
 * distribution protocol's). */
enum {
    MOAT__PASS_THROUGH = 112,
    MOAT__OP_SEND = 2,
    MOAT__OP_EXIT = 3,
    MOAT__OP_REG_SEND = 6,
    MOAT__OP_EXIT2 = 8,
    MOAT__OP_SEND_TT = 12,
    MOAT__OP_EXIT_TT = 13,
    MOAT__OP_REG_SEND_TT = 16,
    MOAT__OP_EXIT2_TT = 18,
    MOAT__OP_UNLINK_ID = 35,
    MOAT__OP_UNLINK_ID_ACK = 36
};

/* What a packet of the distribution transport's connection says
 * (dist.c).  The VM talks to a C-node without an atom cache, so a packet
 * is empty (a tick) or the pass-through byte, a control message and, for
 * a send, the message: each term with its version byte. */
typedef enum {
    MOAT__DIST_TICK = 0,  /* an empty packet: answer with one */
    MOAT__DIST_SEND,      /* SEND or SEND_TT: a message to a pid here */
    MOAT__DIST_REG_SEND,  /* REG_SEND or REG_SEND_TT: to a registered name */
    MOAT__DIST_EXIT,      /* EXIT, EXIT2 or their _TT: an exit signal */
    MOAT__DIST_UNLINK_ID, /* an unlink, which the protocol acknowledges */
    MOAT__DIST_OTHER      /* any other control message (LINK, MONITOR_P,
                             ...): nothing here acts on it */
} moat__dist_kind_t;

/* A pid as its encoding gives it; `node` points into the packet. */
typedef struct moat__pid_s {
    moat__atom_t node;
    uint32_t num, serial, creation;
} moat__pid_t;

typedef struct moat__dist_msg_s {
    moat__dist_kind_t kind;
    long op;              /* the control message's operation, 0 for a tick */
    moat__pid_t from;     /* REG_SEND, EXIT, UNLINK_ID: the sender */
    moat__pid_t to;       /* UNLINK_ID */
    moat__atom_t toname;  /* REG_SEND */
    const char *id;       /* UNLINK_ID: the Id's encoding, no version byte */
    size_t id_len;
    const char *msg;      /* SEND, REG_SEND: the message, version byte first */
    size_t msg_len;
} moat__dist_msg_t;

/*
 * Decodes one packet's body, buf[0..len) (its length taken off), into *m,
 * whose pointers point into buf.  The fields of the control message that
 * *m has must be well formed, and a send's message must be one term that
 * ends the packet; of any other control message only the operation is
 * read.  Returns 0 or MOAT_EBADTERM.  Never reads outside buf[0..len).
 * Any thread; reentrant.
 */
int moat__dist_decode(const char *buf, size_t len, moat__dist_msg_t *m);

#endif

