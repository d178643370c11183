/*
 * jobs.c: moat_cnode's tasks in flight, known by the VM's tags: submitting
 * them to the core pool, sending their outcomes, and cancelling them.
 *
 * DESIGN
 *
 * Threads.  The loop thread adds jobs (run frames), submits them in
 * batches, sends calls to native servers (call frames: a call is a job
 * whose task is the core's call, its outcome the reply or the server's
 * exit reason), and cancels them (cancel frames).  Pool threads run the
 * bodies and the servers, and call moat__jobs_complete with each outcome,
 * which the outbox writes
 * (outbox.c).  A silent cancel never calls back, so only the loop thread
 * reports stopped tags.
 *
 * The map.  Tag -> job, a chained hash table under `lock`; it exists for
 * cancels.  A job is in the map from just before its submission until its
 * outcome is decided: the complete callback takes it out before the
 * outcome is queued (so a tag the VM reuses afterwards is never confused
 * with the old one), and a cancel takes it out before it ends the task.
 *
 * Who frees a job.  Whoever takes it out of the map owns it (`in_map`
 * says whether anyone has, under the lock), with one exception: the
 * handle of a submitted task is attached to its job only after
 * moat_pool_submit_batch returns, and a fast body can complete first.
 * Then the callback takes the job out but leaves it to the loop thread,
 * which finds it out of the map when it attaches, and releases the handle
 * and frees the job itself.  When a cancel takes a job out and
 * moat_task_cancel returns 0, the callback has already returned (the
 * core's claim guarantees it), so the loop thread frees the job safely.
 *
 * Stopped.  A cancel that decided a queued task's outcome reports the tag
 * at once.  One that decided a running task's puts the job on the
 * `cancelling` list, which a libuv timer polls every POLL_MS with
 * moat_task_running while the list is not empty; a tag is reported once
 * its body has left its thread.
 *
 * Watching.  In thread isolation over the port, a round trip crossed
 * CPUs twice on two cores: the VM's scheduler wakes the loop on its own
 * CPU, the loop hands the run to a pool thread spinning on the other,
 * and that thread, writing the outcome, woke the scheduler back on the
 * first CPU, idle by then, which on a virtual machine costs 20-30 us.
 * So after a flush that submitted runs (or a call), the loop becomes the
 * outbox's writer (moat__outbox_hold) and polls with an idle handle,
 * writing the outcomes that pool threads queue, until every run it
 * submitted is answered (`unanswered`, which the complete callback
 * decrements once the outcome is queued) or WATCH_NS pass without a run
 * or an outcome; then it writes what is left and lets go.  The outcome
 * is thus written from the scheduler's CPU, as a port program's would
 * be.  Each poll yields the CPU first, as in Run here.  A body longer
 * than WATCH_NS writes its outcome itself, as before.
 *
 * Order.  In a node of one thread (a worker of process isolation), an
 * outcome is written before the thread takes its next task: the complete
 * callback waits while another thread (the loop, writing a log or a
 * stopped frame) is the outbox's writer with the outcome queued behind.
 * The parent holds several runs of a worker and, when the worker dies,
 * takes the oldest one not answered for the one that was running; an
 * outcome left queued in a dead process would make it blame the wrong
 * task and run the next one twice (procs.c).
 *
 * Run here.  A worker of process isolation forked by the fork server
 * runs its tasks on its loop thread (moat_pool_run_here), not on a pool
 * thread: that saves a thread per worker and, per task, the wake-up of
 * the pool thread, one of the five a round trip through a worker costs.
 * Runs wait in `queue`, off the map, and an idle handle runs them one a
 * loop turn, oldest first, each outcome written before the next begins
 * (as `ordered`).  After a run the idle handle stays armed for
 * HERE_SPIN_NS, so that the loop polls instead of sleeping, as an idle
 * pool thread spins: a caller's next run in a round-trip loop is then
 * read without a wake-up.  Each poll yields the CPU first: on two cores
 * the parent or the VM, woken on this one, must not wait for the spin
 * to end (without the yield, one round-trip trial in three took twice
 * as long).  While a body runs the loop reads nothing, so a cancel
 * comes twice: as a frame, and as MOAT__CANCEL_SIGNAL carrying the run's
 * rank (its place among the runs sent: the parent counts them as the
 * worker does), which the parent queues to this thread once the frame is
 * written.  The handler looks at the `armed` job (the one running, or
 * the one that runs at the next turn): if the rank is its, it sets its
 * stop flag (moat_here_stop); if the run is not armed yet (queued, or not
 * even read), it marks it skipped and says so on the notice pipe, and
 * the parent reports it stopped at once; else its outcome is written and
 * there is nothing to do.  A job is armed (before it stops counting as
 * waiting) at the end of the turn before the one that runs it, and its
 * skipped mark is looked at just before it runs, so a signal finds every
 * run in one of those states, and a skipped one never begins.  The
 * cancel frame, read later, finds the job gone or skipped (nothing more
 * is said), or queued or armed (it takes it out and
 * reports it stopped, with the signal blocked meanwhile so that the two
 * never both report it).  A body stopped by the flag returns with an
 * outcome of its own, which is dropped: the tag is reported stopped, as
 * after a cancel on a pool thread (the parent forwards only cancels the
 * VM sent, so the VM has decided).  A body that ignores the flag holds
 * the worker, and the runs behind it wait, as they wait behind any long
 * task, until it returns or the parent kills the worker (procs.c,
 * Cancels).
 *
 * Shutdown.  moat__jobs_close runs after moat_pool_close has decided every
 * outcome, so the map is empty then; it releases the cancelling list, and
 * the runs still waiting to run here, whose outcomes nobody reads any
 * more.
 *
 * Lock: `lock` (the map lock) guards buckets, mask, count, and each job's
 * in_map and task.  The outbox's lock is never taken under it.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cnode.h"

/* How often the loop looks at cancelled bodies still running: the demo's
 * sleep notices a cancel within 1 ms, so a stopped frame follows it
 * within 2 ms. */
#define POLL_MS 1

#define INITIAL_BUCKETS 1024

/* Submitting in batches this large starts the first bodies of a large
 * runs frame before the whole frame is submitted. */
#define FLUSH_AT 1024

#define INITIAL_PEND 64

/* How long the loop of a node that runs its tasks here polls for the
 * next run after one, without sleeping: the pool threads' spin (50 us,
 * moat_core.h).  On this 2-core VM a sleeping loop's wake-up costs
 * 20-30 us, and the next run of a caller in a round-trip loop comes
 * 30-60 us after the last outcome. */
#define HERE_SPIN_NS 50000u

/* How long the loop polls for outcomes (DESIGN, Watching) after the last
 * run it submitted or the last outcome it wrote: as long as it polls for
 * the next run after one run here. */
#define WATCH_NS HERE_SPIN_NS

/* ---------------------------------------------------------------- map */

static size_t slot(const moat__jobs_t *jobs, uint64_t tag) {
    /* Tags are often consecutive: mix them (MurmurHash3's finaliser). */
    tag ^= tag >> 33;
    tag *= 0xff51afd7ed558ccdULL;
    tag ^= tag >> 33;
    return (size_t)tag & jobs->mask;
}

/* Doubles the table; on failure keeps the old one (longer chains).  map
 * lock held. */
static void grow(moat__jobs_t *jobs) {
    size_t n = (jobs->mask + 1) * 2, old = jobs->mask + 1;
    moat__job_t **b = calloc(n, sizeof *b), **ob = jobs->buckets;

    if (b == NULL)
        return;
    jobs->buckets = b;
    jobs->mask = n - 1;
    for (size_t i = 0; i < old; i++) {
        moat__job_t *j = ob[i];
        while (j != NULL) {
            moat__job_t *next = j->next;
            size_t s = slot(jobs, j->tag);
            j->next = b[s];
            b[s] = j;
            j = next;
        }
    }
    free(ob);
}

/* map lock held. */
static void map_insert(moat__jobs_t *jobs, moat__job_t *job) {
    size_t s = slot(jobs, job->tag);

    job->next = jobs->buckets[s];
    jobs->buckets[s] = job;
    job->in_map = 1;
    if (++jobs->count > jobs->mask + 1)
        grow(jobs);
}

/* Takes `job` (in the map) out.  map lock held. */
static void map_unlink(moat__jobs_t *jobs, moat__job_t *job) {
    moat__job_t **pp = &jobs->buckets[slot(jobs, job->tag)];

    while (*pp != job)
        pp = &(*pp)->next;
    *pp = job->next;
    job->next = NULL;
    job->in_map = 0;
    jobs->count--;
}

/* Takes the job with this tag out; NULL when there is none.  map lock
 * held. */
static moat__job_t *map_take(moat__jobs_t *jobs, uint64_t tag) {
    moat__job_t *j = jobs->buckets[slot(jobs, tag)];

    while (j != NULL && j->tag != tag)
        j = j->next;
    if (j != NULL)
        map_unlink(jobs, j);
    return j;
}

/* ------------------------------------------------------------ helpers */

/* Waits until no thread is writing the outbox, so that everything queued
 * so far is written (or dropped).  A writer only waits on stdout, which
 * the parent keeps reading: yield at first, then sleep 50 us at a time. */
static void wait_written(moat__outbox_t *ob) {
    const struct timespec nap = {0, 50000};

    for (int i = 0;; i++) {
        int busy;
        uv_mutex_lock(&ob->lock);
        busy = ob->writing && !ob->discard;
        uv_mutex_unlock(&ob->lock);
        if (!busy)
            return;
        if (i < 64)
            sched_yield();
        else
            nanosleep(&nap, NULL);
    }
}

/* Answers {Tag, exit, Atom}. */
static void answer(moat__jobs_t *jobs, uint64_t tag, moat_atom_t a) {
    size_t len;
    const char *etf = moat_term_data(moat_atom(a), &len);

    moat__outbox_done(jobs->ob, tag, MOAT_EXIT, etf + 1, len - 1);
}

/* The reason a refused submission gets. */
static moat_atom_t refusal(int err) {
    if (err == MOAT_EOVERLOADED)
        return MOAT_A_OVERLOADED;
    if (err == MOAT_ECLOSED)
        return MOAT_A_NOPROC;
    return MOAT_A_ENOMEM;
}

static int grow_pend(moat__jobs_t *jobs) {
    size_t cap = jobs->cappend * 2;
    moat_job_t *p = realloc(jobs->pend, cap * sizeof *p);
    moat_task_t **t;

    if (p == NULL)
        return UV_ENOMEM;
    jobs->pend = p;
    t = realloc(jobs->pend_tasks, cap * sizeof *t);
    if (t == NULL)
        return UV_ENOMEM;
    jobs->pend_tasks = t;
    jobs->cappend = cap;
    return 0;
}

/* Reports the cancelled bodies that have left their threads. */
static void poll_cancelling(uv_timer_t *timer) {
    moat__jobs_t *jobs = timer->data;
    moat__job_t **pp = &jobs->cancelling;
    uint64_t tags[64];
    size_t n = 0;

    while (*pp != NULL) {
        moat__job_t *job = *pp;
        if (moat_task_running(job->task)) {
            pp = &job->next;
            continue;
        }
        *pp = job->next;
        tags[n++] = job->tag;
        moat_task_release(job->task);
        free(job);
        if (n == sizeof tags / sizeof tags[0]) {
            moat__outbox_stopped(jobs->ob, tags, n);
            n = 0;
        }
    }
    if (n > 0)
        moat__outbox_stopped(jobs->ob, tags, n);
    if (jobs->cancelling == NULL)
        uv_timer_stop(timer);
}

/* ----------------------------------------------------------- run here */

/* What the cancel signal's handler reads and writes (DESIGN, Run here).
 * Static, for a handler has no argument; there is one node a process.
 * Runs are known by rank (seq); the parent holds at most PIPELINE
 * unanswered runs of a worker, so ranks in flight never share a bit. */
static _Atomic(moat__job_t *) armed; /* runs, or runs at the next turn */
static atomic_uint_fast64_t received;   /* the rank of the last run read */
static atomic_uint_fast64_t waiting;    /* bit: queued, not armed yet */
static atomic_uint_fast64_t skipped;    /* bit: the parent was told it
                                           never begins */
static int notice_fd = -1;
static sigset_t cancel_set;             /* MOAT__CANCEL_SIGNAL alone */

#define BIT(seq) ((uint_fast64_t)1 << ((seq) % 64))

/* Whether run seq was skipped by the signal (and forgets it). */
static int take_skipped(uint64_t seq) {
    return (atomic_fetch_and(&skipped, ~BIT(seq)) & BIT(seq)) != 0;
}

/* The parent cancelled run `seq` (si_value) and wrote the frame: the
 * armed job is flagged; one not begun (not read yet, or queued) will
 * never be, and the parent hears so now, through the notice pipe, since
 * the loop may not read the frame for as long as a body runs.  Atomic
 * read-modify-writes only: this interrupts the loop thread anywhere. */
static void on_cancel_signal(int sig, siginfo_t *si, void *uc) {
    moat__job_t *job = atomic_load(&armed);
    uint64_t seq = (uint64_t)(uintptr_t)si->si_value.sival_ptr;

    (void)sig;
    (void)uc;
    if (si->si_code != SI_QUEUE || si->si_pid != getppid() || seq == 0)
        return; /* not the parent's */
    if (job != NULL && job->seq == seq) {
        moat_here_stop(&job->here);
    } else if (seq > atomic_load(&received) ||
               (atomic_fetch_and(&waiting, ~BIT(seq)) & BIT(seq))) {
        atomic_fetch_or(&skipped, BIT(seq));
        (void)moat__notice(notice_fd, MOAT__NOTICE_SKIP, seq);
    } /* else its outcome is written (or it was stopped): nothing to do */
}

/* The idle handle: runs the armed job, then arms the next one, which runs
 * at the next turn, after the loop's read. */
static void run_armed(uv_idle_t *h) {
    moat__jobs_t *jobs = h->data;
    moat__job_t *job = atomic_load(&armed);

    if (job != NULL) {
        int rc = 0;
        if (!take_skipped(job->seq)) {
            rc = moat_pool_run_here(jobs->pool, &job->spec, &job->here);
            jobs->last_run = uv_hrtime();
        } else
            moat_term_unref(job->spec.args); /* reported: not run */
        atomic_store(&armed, NULL);
        if (rc != 0) {
            moat_term_unref(job->spec.args); /* refused: still ours */
            answer(jobs, job->tag, refusal(rc));
        }
        free(job);
    }
    if ((job = jobs->queue) == NULL) {
        /* Polled, not slept, for a while after a run (DESIGN). */
        if (uv_hrtime() - jobs->last_run < HERE_SPIN_NS) {
            sched_yield(); /* to a thread woken on this CPU */
            return;
        }
        uv_idle_stop(h);
        return;
    }
    jobs->queue = job->next;
    if (jobs->queue == NULL)
        jobs->queue_tail = &jobs->queue;
    job->next = NULL;
    /* Armed, then no longer waiting: a signal in between finds it armed. */
    atomic_store(&armed, job);
    atomic_fetch_and(&waiting, ~BIT(job->seq));
}

/* A cancel frame for a job run here: one not begun is taken out and
 * reported stopped, unless the signal has reported it already; the
 * running one is the signal's.  With the signal blocked, so that the
 * two never both report it. */
static void cancel_here(moat__jobs_t *jobs, uint64_t tag) {
    moat__job_t *job, **pp;
    sigset_t old;
    int told;

    pthread_sigmask(SIG_BLOCK, &cancel_set, &old);
    job = atomic_load(&armed);
    if (job != NULL && job->tag == tag) {
        atomic_store(&armed, NULL);
    } else {
        for (pp = &jobs->queue; *pp != NULL && (*pp)->tag != tag;
             pp = &(*pp)->next)
            ;
        if ((job = *pp) != NULL) {
            *pp = job->next;
            if (jobs->queue_tail == &job->next)
                jobs->queue_tail = pp;
        }
    }
    if (job != NULL) {
        atomic_fetch_and(&waiting, ~BIT(job->seq));
        told = take_skipped(job->seq);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (job == NULL)
        return; /* its outcome is sent, or it never was ours */
    moat_term_unref(job->spec.args);
    if (!told)
        moat__outbox_stopped(jobs->ob, &job->tag, 1);
    free(job);
}

int moat__jobs_answering(moat__jobs_t *jobs) {
    sigset_t old;
    uint64_t seq;
    int told;

    if (!jobs->here)
        return 1;
    seq = ++jobs->nruns;
    pthread_sigmask(SIG_BLOCK, &cancel_set, &old);
    atomic_store(&received, seq);
    told = take_skipped(seq);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return !told;
}

int moat__jobs_run_here(moat__jobs_t *jobs, uv_loop_t *loop, int notice) {
    struct sigaction sa;
    int rc = uv_idle_init(loop, &jobs->idle);

    if (rc != 0)
        return rc;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_cancel_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigemptyset(&cancel_set);
    sigaddset(&cancel_set, MOAT__CANCEL_SIGNAL);
    notice_fd = notice;
    if (sigaction(MOAT__CANCEL_SIGNAL, &sa, NULL) != 0 ||
        (rc = pthread_sigmask(SIG_UNBLOCK, &cancel_set, NULL)) != 0) {
        rc = rc != 0 ? -rc : -errno;
        uv_close((uv_handle_t *)&jobs->idle, NULL);
        return rc;
    }
    jobs->idle.data = jobs;
    jobs->idle_open = 1;
    jobs->here = 1;
    jobs->ordered = 1;
    jobs->queue_tail = &jobs->queue;
    return 0;
}

/* ----------------------------------------------------------- watching */

/* The loop found the outbox idle after a batch of runs: it becomes the
 * writer and polls until their outcomes are written (DESIGN, Watching). */
static void watch_poll(uv_idle_t *h) {
    moat__jobs_t *jobs = h->data;
    /* Read before the flush: an outcome counted out is queued by then. */
    long left = atomic_load(&jobs->unanswered);
    size_t written = moat__outbox_flush(jobs->ob);
    uint64_t now = uv_hrtime();

    if (written > 0)
        jobs->watch_last = now;
    if (left <= 0 || now - jobs->watch_last >= WATCH_NS) {
        moat__jobs_unwatch(jobs);
        return;
    }
    sched_yield(); /* to a thread woken on this CPU */
}

/* After a flush that submitted runs. */
static void watch_start(moat__jobs_t *jobs) {
    jobs->watch_last = uv_hrtime();
    if (!uv_is_active((uv_handle_t *)&jobs->watch) &&
        moat__outbox_hold(jobs->ob))
        uv_idle_start(&jobs->watch, watch_poll);
}

int moat__jobs_watch(moat__jobs_t *jobs, uv_loop_t *loop) {
    int rc = uv_idle_init(loop, &jobs->watch);

    if (rc != 0)
        return rc;
    jobs->watch.data = jobs;
    jobs->watching = 1;
    return 0;
}

void moat__jobs_unwatch(moat__jobs_t *jobs) {
    if (jobs->watching && uv_is_active((uv_handle_t *)&jobs->watch)) {
        uv_idle_stop(&jobs->watch);
        moat__outbox_release(jobs->ob);
    }
}

/* ---------------------------------------------------------------- API */

int moat__jobs_init(moat__jobs_t *jobs, uv_loop_t *loop, moat__outbox_t *ob) {
    int rc;

    memset(jobs, 0, sizeof *jobs);
    jobs->ob = ob;
    jobs->buckets = calloc(INITIAL_BUCKETS, sizeof *jobs->buckets);
    jobs->pend = malloc(INITIAL_PEND * sizeof *jobs->pend);
    jobs->pend_tasks = malloc(INITIAL_PEND * sizeof *jobs->pend_tasks);
    if (jobs->buckets == NULL || jobs->pend == NULL ||
        jobs->pend_tasks == NULL) {
        rc = UV_ENOMEM;
        goto fail;
    }
    jobs->mask = INITIAL_BUCKETS - 1;
    jobs->cappend = INITIAL_PEND;
    rc = uv_mutex_init(&jobs->lock);
    if (rc != 0)
        goto fail;
    rc = uv_timer_init(loop, &jobs->timer);
    if (rc != 0) {
        uv_mutex_destroy(&jobs->lock);
        goto fail;
    }
    jobs->timer.data = jobs;
    return 0;

fail:
    free(jobs->buckets);
    free(jobs->pend);
    free(jobs->pend_tasks);
    return rc;
}

void moat__jobs_complete(moat_task_t *task, const moat_outcome_t *o,
                         void *data) {
    moat__jobs_t *jobs = data;
    moat__job_t *job = moat_task_data(task);
    uint64_t tag = job->tag;
    /* Run here and stopped by the cancel signal: the VM has decided its
     * outcome already, and hears that the body is gone, as from a cancel
     * on a pool thread.  Read now: a job run on a pool thread may be
     * freed by the loop thread once out of the map. */
    int stopped = jobs->here && atomic_load(&job->here.stop);
    moat_task_t *handle = NULL;
    const char *etf;
    size_t len;

    uv_mutex_lock(&jobs->lock);
    if (job->in_map) {
        map_unlink(jobs, job);
        handle = job->task; /* NULL: the loop thread has yet to attach it */
    }
    uv_mutex_unlock(&jobs->lock);
    etf = moat_term_data(o->term, &len);
    if (stopped)
        moat__outbox_stopped(jobs->ob, &tag, 1);
    else
        moat__outbox_done(jobs->ob, tag, o->kind, etf + 1, len - 1);
    if (jobs->watching)
        atomic_fetch_sub(&jobs->unanswered, 1);
    if (jobs->ordered)
        wait_written(jobs->ob);
    if (handle != NULL) {
        moat_task_release(handle);
        free(job);
    }
}

void moat__jobs_add(moat__jobs_t *jobs, uint64_t tag,
                    const moat_task_def_t *def, const moat_lib_t *lib,
                    moat_term_t *args) {
    moat__job_t *job = NULL;

    if (jobs->here) {
        if ((job = calloc(1, sizeof *job)) == NULL) {
            moat_term_unref(args);
            answer(jobs, tag, MOAT_A_ENOMEM);
            return;
        }
        job->tag = tag;
        job->spec = (moat_job_t){def->run, def->name, lib, args, 0, -1, job};
        /* Waiting, then read: a signal in between finds it one or the
         * other (see on_cancel_signal); one that came before it was read
         * has marked it skipped, which its arming finds. */
        job->seq = ++jobs->nruns;
        atomic_fetch_or(&waiting, BIT(job->seq));
        atomic_store(&received, job->seq);
        *jobs->queue_tail = job;
        jobs->queue_tail = &job->next;
        if (!uv_is_active((uv_handle_t *)&jobs->idle))
            uv_idle_start(&jobs->idle, run_armed);
        return;
    }
    if ((jobs->npend == jobs->cappend && grow_pend(jobs) < 0) ||
        (job = calloc(1, sizeof *job)) == NULL) {
        moat_term_unref(args);
        answer(jobs, tag, MOAT_A_ENOMEM);
        return;
    }
    job->tag = tag;
    jobs->pend[jobs->npend++] =
        (moat_job_t){def->run, def->name, lib, args, 0, -1, job};
    if (jobs->npend >= FLUSH_AT)
        moat__jobs_flush(jobs);
}

void moat__jobs_flush(moat__jobs_t *jobs) {
    size_t n = jobs->npend, i;
    moat_job_t *pend = jobs->pend;
    moat_task_t **tasks = jobs->pend_tasks;

    if (n == 0)
        return;
    jobs->npend = 0;
    /* In the map before any of them can complete. */
    uv_mutex_lock(&jobs->lock);
    for (i = 0; i < n; i++)
        map_insert(jobs, pend[i].data);
    uv_mutex_unlock(&jobs->lock);

    for (i = 0; i < n;) {
        int rc = moat_pool_submit_batch(jobs->pool, pend + i, n - i,
                                        tasks + i);
        if (rc > 0) {
            if (jobs->watching)
                atomic_fetch_add(&jobs->unanswered, rc);
            i += (size_t)rc;
            continue;
        }
        ((moat__job_t *)pend[i].data)->err = rc < 0 ? rc : MOAT_EINVAL;
        tasks[i] = NULL;
        i++;
    }

    /* Attach each handle, unless the outcome was quicker. */
    uv_mutex_lock(&jobs->lock);
    for (i = 0; i < n; i++) {
        moat__job_t *job = pend[i].data;
        if (job->err != 0) {
            map_unlink(jobs, job);
        } else if (job->in_map) {
            job->task = tasks[i];
            tasks[i] = NULL;
            /* From here on the callback may free the job at any time. */
            pend[i].data = NULL;
        }
    }
    uv_mutex_unlock(&jobs->lock);

    if (jobs->watching)
        watch_start(jobs);
    for (i = 0; i < n; i++) {
        moat__job_t *job = pend[i].data;
        if (job == NULL)
            continue;
        if (job->err != 0) {
            moat_term_unref(pend[i].args); /* refused: still ours */
            answer(jobs, job->tag, refusal(job->err));
            free(job);
        } else if (tasks[i] != NULL) { /* its outcome is already sent */
            moat_task_release(tasks[i]);
            free(job);
        }
    }
}

void moat__jobs_call(moat__jobs_t *jobs, uint64_t tag, moat_pid_t server,
                     moat_term_t *request) {
    moat__job_t *job = calloc(1, sizeof *job);
    moat_task_t *task = NULL;
    int rc;

    if (job == NULL) {
        answer(jobs, tag, MOAT_A_ENOMEM);
        return;
    }
    job->tag = tag;
    /* In the map before the reply can come, as flush does for tasks. */
    uv_mutex_lock(&jobs->lock);
    map_insert(jobs, job);
    uv_mutex_unlock(&jobs->lock);
    rc = moat_server_call(jobs->pool, server, request, 0, -1, job, &task);
    if (rc == 0 && jobs->watching) {
        atomic_fetch_add(&jobs->unanswered, 1);
        watch_start(jobs);
    }
    uv_mutex_lock(&jobs->lock);
    if (rc != 0) {
        map_unlink(jobs, job);
    } else if (job->in_map) {
        job->task = task;
        task = NULL;
        job = NULL; /* the callback's from here on */
    }
    uv_mutex_unlock(&jobs->lock);
    if (rc != 0) {
        answer(jobs, tag, rc == MOAT_ENOPROC ? MOAT_A_NOPROC : MOAT_A_ENOMEM);
        free(job);
    } else if (job != NULL) { /* the reply is already sent */
        moat_task_release(task);
        free(job);
    }
}

void moat__jobs_cancel(moat__jobs_t *jobs, uint64_t tag, moat_atom_t reason) {
    moat__job_t *job;
    int rc;

    if (jobs->here) {
        cancel_here(jobs, tag);
        return;
    }
    moat__jobs_flush(jobs);
    uv_mutex_lock(&jobs->lock);
    job = map_take(jobs, tag);
    uv_mutex_unlock(&jobs->lock);
    if (job == NULL)
        return; /* its outcome is sent, or it never was ours */
    if (job->task == NULL)
        abort(); /* broken invariant: flush attached every handle */
    rc = moat_task_cancel(job->task, reason, MOAT_CANCEL_SILENT);
    if (rc == 1 && jobs->watching)
        atomic_fetch_sub(&jobs->unanswered, 1);
    if (rc == 1 && moat_task_running(job->task)) {
        job->next = jobs->cancelling;
        jobs->cancelling = job;
        if (!uv_is_active((uv_handle_t *)&jobs->timer))
            uv_timer_start(&jobs->timer, poll_cancelling, POLL_MS, POLL_MS);
        return;
    }
    if (rc == 1) /* it never started */
        moat__outbox_stopped(jobs->ob, &job->tag, 1);
    /* rc == 0: it completed first, and its done entry is sent */
    moat_task_release(job->task);
    free(job);
}

void moat__jobs_close(moat__jobs_t *jobs) {
    moat__job_t *left = atomic_exchange(&armed, NULL);

    if (left != NULL) {
        left->next = jobs->queue;
        jobs->queue = left;
    }
    while (jobs->queue != NULL) {
        moat__job_t *job = jobs->queue;
        jobs->queue = job->next;
        moat_term_unref(job->spec.args);
        free(job);
    }
    if (jobs->idle_open) {
        jobs->idle_open = 0;
        uv_close((uv_handle_t *)&jobs->idle, NULL);
    }
    if (jobs->watching) {
        moat__jobs_unwatch(jobs);
        jobs->watching = 0;
        uv_close((uv_handle_t *)&jobs->watch, NULL);
    }
    while (jobs->cancelling != NULL) {
        moat__job_t *job = jobs->cancelling;
        jobs->cancelling = job->next;
        moat_task_release(job->task);
        free(job);
    }
    for (size_t i = 0; i <= jobs->mask; i++) {
        while (jobs->buckets[i] != NULL) {
            moat__job_t *job = jobs->buckets[i];
            jobs->buckets[i] = job->next;
            if (job->task != NULL)
                moat_task_release(job->task);
            free(job);
        }
    }
    for (size_t i = 0; i < jobs->npend; i++) {
        moat_term_unref(jobs->pend[i].args);
        free(jobs->pend[i].data);
    }
    jobs->npend = 0;
    free(jobs->buckets);
    free(jobs->pend);
    free(jobs->pend_tasks);
    jobs->buckets = NULL;
    jobs->pend = NULL;
    jobs->pend_tasks = NULL;
    uv_mutex_destroy(&jobs->lock);
    uv_timer_stop(&jobs->timer);
    uv_close((uv_handle_t *)&jobs->timer, NULL);
}
