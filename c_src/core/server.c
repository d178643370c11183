/*
 * server.c: native servers, and the run loop the built-in servers (the
 * supervisor) share with them.
 *
 * DESIGN
 *
 * A server owns no thread.  proc.c schedules it (puts its sysitem on the
 * pool's sysq) when a message reaches its idle mailbox; a worker then runs
 * `run`, which handles up to BATCH messages, one at a time, and either
 * goes idle (mailbox empty) or asks to be scheduled again, so one busy
 * server cannot hold a thread from tasks and other servers.  `scheduled`
 * (under sig_lock) keeps it on at most one thread.
 *
 * A call is a task of the pool (pool.c) that waits in this mailbox instead
 * of the run queue: handle_call's reply or the server's exit reason goes
 * through the task's one claim, so a call has exactly one outcome, its
 * deadline works like a task's, and a reply after a timeout is dropped.
 *
 * Ending.  A stop comes from a callback (MOAT_EXIT / MOAT_ERROR) or from a
 * stop request that proc.c queued for an exit signal: terminate runs on
 * this thread, then the process exits.  A `kill` ends the process first;
 * the loop then finds it dead and runs terminate.  Either way `finish`
 * ends the calls still in the mailbox with the exit reason and frees the
 * server.  Restarting is starting again: init runs inline on the caller's
 * thread (the supervisor's), so a restart costs no thread hand-off; and
 * the exit signal that wakes the supervisor, like the server's first
 * message after init, puts it in the worker's local slot (pool.c), so
 * crash, signal, restart and init run one after another on one thread.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Messages handled in one turn on a thread (see DESIGN). */
#define BATCH 64

static void server_free(moat__server_t *s) {
    moat_msg_free(s->stop_msg);
    moat_term_unref(s->reason);
    free(s->errmsg);
    free(s);
}

/* Runs terminate (or a built-in's finish) once. */
static void terminate(moat__server_t *s, moat_term_t *reason) {
    size_t len;
    const char *d;
    if (s->terminated)
        return;
    s->terminated = 1;
    atomic_store(&s->stopping, 1);
    if (s->finish != NULL) {
        s->finish(s, reason);
    } else if (s->def->terminate != NULL) {
        d = moat_term_data(reason, &len);
        s->def->terminate(&s->ctx, s->state, d, (int)len);
    }
    s->state = NULL;
}

/* The process is dead: terminate if not yet, end the calls left in its
 * mailbox with its reason, free everything. */
static void finish(moat__server_t *s) {
    moat_msg_t *m = moat__proc_server_leftover(s);
    terminate(s, s->reason);
    if (s->current != NULL) {
        moat__task_unref(s->current);
        s->current = NULL;
    }
    while (m != NULL) {
        moat_msg_t *next = m->next;
        if (m->call != NULL) {
            moat__task_end(m->call, s->reason, 0);
            moat__task_unref(m->call);
        }
        moat_msg_free(m);
        m = next;
    }
    server_free(s);
}

static void stop(moat__server_t *s, moat_term_t *reason) {
    terminate(s, reason);
    moat__proc_server_exit(s, reason);
}

/* Runs handle_call or handle_cast; returns the reply or exit reason and
 * its kind (NULL for a cast that went on). */
static moat_term_t *callback(moat__server_t *s, moat_msg_t *m, int *kind) {
    ei_x_buff x;
    size_t len;
    const char *d = moat_term_data(m->term, &len);
    int rc;
    if (ei_x_new_with_version(&x) != 0) {
        *kind = MOAT_EXIT;
        return moat_atom(MOAT_A_ENOMEM);
    }
    if (m->kind == MOAT_MSG_CALL) {
        rc = s->def->handle_call(&s->ctx, s->state, d, (int)len, &x);
    } else {
        rc = s->def->handle_cast(&s->ctx, s->state, d, (int)len, &x);
        if (rc == MOAT_OK) { /* a cast has no reply to check */
            ei_x_free(&x);
            *kind = MOAT_OK;
            return NULL;
        }
    }
    return moat__result_term(rc, &x, s->errmsg, kind);
}

static void handle(moat__server_t *s, moat_msg_t *m) {
    moat_term_t *term;
    int kind;
    if (s->info != NULL) {
        s->info(s, m);
        return;
    }
    switch (m->kind) {
    case MOAT_MSG_CALL: /* its reference is s->current's now (proc.c) */
        term = callback(s, m, &kind);
        /* A call that stops the server is answered once the server is
         * dead (the process exit settles the call in progress), as a
         * monitor's DOWN follows a gen_server's end: a caller's next call
         * can no longer reach the dying server.  The finish after it is
         * for a call nothing else settled, and loses otherwise. */
        if (kind != MOAT_OK)
            stop(s, term);
        moat__task_finish(m->call, kind, term);
        moat_term_unref(term);
        break;
    case MOAT_MSG_CAST:
        if (s->def->handle_cast == NULL)
            break;
        term = callback(s, m, &kind);
        if (kind != MOAT_OK)
            stop(s, term);
        moat_term_unref(term);
        break;
    case MOAT_MSG_EXIT: /* the stop request of an exit signal */
        stop(s, m->term);
        break;
    default:
        /* ABI v1 servers have no handle_info: other messages are dropped,
         * as a gen_server without handle_info would log and drop them. */
        break;
    }
    moat_msg_free(m);
}

static void run(moat__sysitem_t *item) {
    moat__server_t *s = MOAT__CONTAINER(item, moat__server_t, item);
    for (int i = 0; i < BATCH; i++) {
        moat_msg_t *m;
        int rc = moat__proc_server_next(s, &m);
        if (rc < 0) {
            finish(s);
            return;
        }
        if (rc == 0)
            return;
        handle(s, m);
    }
    moat__proc_server_yield(s);
}

moat__server_t *moat__server_alloc(moat_pool_t *pool) {
    moat__server_t *s = malloc(sizeof *s); /* not calloc: moat__msg_new */
    if (s == NULL)
        return NULL;
    *s = (moat__server_t){.item.run = run,
                          .ctx.api = &moat__server_api,
                          .pool = pool};
    atomic_init(&s->stopping, 0);
    return s;
}

int moat__server_launch(moat__server_t *s, moat_pid_t parent, unsigned flags,
                        moat_term_t *(*init)(moat__server_t *s, void *arg),
                        void *arg, moat_pid_t *pid, moat_term_t **reason) {
    moat_term_t *failed;
    int rc = moat__proc_server_new(s->pool, s);
    if (rc != 0) {
        if (s->finish != NULL) /* a built-in's state is its to free */
            s->finish(s, moat_atom(MOAT_A_SHUTDOWN));
        server_free(s);
        return rc;
    }
    *pid = s->pid;
    failed = init(s, arg);
    if (failed != NULL) {
        /* init failed: no terminate; links and monitors init made see the
         * reason, and calls that reached the new id get it too. */
        s->terminated = 1;
        moat__proc_server_exit(s, failed);
        finish(s);
        *reason = failed;
        return MOAT_ESTART;
    }
    rc = moat__proc_server_publish(s->pool, s, parent, flags);
    if (rc != 0) {
        /* Not published, so no worker runs it: end it here.  terminate
         * gets the reason it died with (killed, if it was killed). */
        moat__proc_server_exit(s, moat_atom(MOAT_A_SHUTDOWN));
        finish(s);
        return rc;
    }
    return 0; /* s is the pool's now: it may be running, or freed */
}

/* arg: the start argument list. */
static moat_term_t *user_init(moat__server_t *s, void *arg) {
    ei_x_buff x;
    size_t len;
    const char *d = moat_term_data(arg, &len);
    moat_term_t *term;
    int rc, kind;
    if (ei_x_new_with_version(&x) != 0)
        return moat_atom(MOAT_A_ENOMEM);
    rc = s->def->init(&s->ctx, d, (int)len, &s->state, &x);
    if (rc == MOAT_OK) {
        ei_x_free(&x);
        return NULL;
    }
    term = moat__result_term(rc, &x, s->errmsg, &kind);
    return term;
}

int moat_server_start(moat_pool_t *pool, moat_pid_t parent,
                      const moat_server_def_t *def, const moat_lib_t *lib,
                      moat_term_t *args, unsigned flags, moat_pid_t *pid,
                      moat_term_t **reason) {
    moat__server_t *s;
    if (pool == NULL || def == NULL || def->init == NULL ||
        def->handle_call == NULL || args == NULL || pid == NULL ||
        reason == NULL || (flags & ~MOAT_SPAWN_LINK) != 0)
        return MOAT_EINVAL;
    if (atomic_load(&pool->stopping))
        return MOAT_ECLOSED;
    if ((s = moat__server_alloc(pool)) == NULL)
        return -ENOMEM;
    s->def = def;
    s->lib = lib;
    *reason = NULL;
    return moat__server_launch(s, parent, flags, user_init, args, pid, reason);
}

int moat_server_child_start(moat_pool_t *pool, moat_pid_t sup, void *arg,
                            moat_pid_t *pid, moat_term_t **reason) {
    moat_server_child_t *c = arg;
    return moat_server_start(pool, sup, c->def, c->lib, c->args,
                             MOAT_SPAWN_LINK, pid, reason);
}

int moat_server_call(moat_pool_t *pool, moat_pid_t server,
                     moat_term_t *request, uint64_t owner, int64_t timeout_ms,
                     void *data, moat_task_t **task) {
    moat_task_t *t;
    moat_msg_t *m;
    int rc;
    if (pool == NULL || request == NULL)
        return MOAT_EINVAL;
    t = moat__task_call_new(pool, owner, data, task != NULL, timeout_ms >= 0);
    if (t == NULL)
        return -ENOMEM;
    if ((m = moat__msg_new(MOAT_MSG_CALL)) == NULL) {
        moat__task_call_drop(t);
        return -ENOMEM;
    }
    m->term = moat_term_ref(request);
    m->call = t;
    /* Ours until the end of this call: the server may answer and drop
     * the message's reference at any moment after the post. */
    atomic_fetch_add(&t->refs, 1);
    rc = moat__proc_post(pool, server, m, 1);
    if (rc != 0) {
        moat_msg_free(m);
        moat__task_call_drop(t);
        return rc;
    }
    if (moat__task_call_posted(t, timeout_ms) != 0) {
        /* No memory to register the owner: end it now, a value. */
        moat_task_cancel(t, MOAT_A_ENOMEM, 0);
    }
    if (task != NULL)
        *task = t;
    moat__task_unref(t);
    return 0;
}

int moat_server_cast(moat_pool_t *pool, moat_pid_t server,
                     moat_term_t *request) {
    moat_msg_t *m;
    if (pool == NULL || request == NULL)
        return MOAT_EINVAL;
    if ((m = moat__msg_new(MOAT_MSG_CAST)) == NULL)
        return -ENOMEM;
    m->term = moat_term_ref(request);
    if (moat__proc_post(pool, server, m, 1) != 0)
        moat_msg_free(m); /* to a dead server: dropped */
    return 0;
}
