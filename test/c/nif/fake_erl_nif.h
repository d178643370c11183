/* fake_erl_nif.h: private to test/c/nif.  A small stand-in for the part of
 * ERTS that c_src/nif/moat_nif.c uses, so that the NIF glue runs outside
 * the VM, under ASan/UBSan, TSan and valgrind (see fake_erl_nif.c).
 *
 * The test drives fake processes: each has a heap (the terms it holds), a
 * mailbox, and a pid.  A NIF is called on behalf of one process with
 * fake_call, on the calling thread, which counts as a scheduler for that
 * call.  Any thread may use these functions for a process it does not
 * act as only where noted (fake_die, fake_mailbox_len). */
#ifndef MOAT_TEST_FAKE_ERL_NIF_H
#define MOAT_TEST_FAKE_ERL_NIF_H

#include <stddef.h>

#include <erl_nif.h>

typedef struct fake_proc_s fake_proc_t;

/* ------------------------------------------------------------ loading */

/* Calls the library's load callback (or upgrade, which moat_nif.c maps to
 * load) with a fresh env; returns its result. */
int fake_load(ErlNifEntry *entry);
int fake_upgrade(void);

/* ---------------------------------------------------------- processes */

/* A new live process with an empty heap and mailbox. */
fake_proc_t *fake_spawn(void);
ErlNifPid fake_pid(const fake_proc_t *p);
/* The env the test builds the process's terms in (its heap). */
ErlNifEnv *fake_env(fake_proc_t *p);
/* The process drops every term it holds, as a garbage collection that
 * finds none of them reachable: resource terms release their objects
 * (destructors may run, on this thread). */
void fake_gc(fake_proc_t *p);
/* The process is dead: enif_is_process_alive says so and messages to it
 * are dropped, but its monitors have not fired yet.  Any thread. */
void fake_die(fake_proc_t *p);
/* Fires the dead process's monitors (each `down` callback runs on this
 * thread, with the resource kept alive for the call, unless the resource
 * is already being destroyed), then frees its heap and mailbox. */
void fake_reap(fake_proc_t *p);
/* fake_die, then fake_reap. */
void fake_exit(fake_proc_t *p);
/* fake_exit for every process not yet reaped. */
void fake_exit_all(void);
/* Exits every process not yet reaped and frees every process: no pid or
 * fake_proc_t of before may be used afterwards, and no thread may be
 * sending to one (call it once fake_quiesce said so). */
void fake_reset_procs(void);

/* ------------------------------------------------------------ calling */

/* Calls the NIF `name`/argc for process p with the terms that follow
 * (each one p holds, or an immediate).  Returns its result, or 0 when it
 * raised (then fake_raised tells the reason). */
ERL_NIF_TERM fake_call(fake_proc_t *p, const char *name, unsigned argc, ...);
/* Whether p's last call raised; *reason (if not NULL) is the reason. */
int fake_raised(const fake_proc_t *p, ERL_NIF_TERM *reason);

/* ----------------------------------------------------------- messages */

/* Messages waiting in p's mailbox.  Any thread. */
size_t fake_mailbox_len(fake_proc_t *p);
/* Takes p's first message (moving it into p's heap), waiting up to
 * timeout_ms; 0 if none came. */
ERL_NIF_TERM fake_recv(fake_proc_t *p, int timeout_ms);

/* -------------------------------------------------------------- terms */

ERL_NIF_TERM fake_atom(const char *name);
int fake_is_atom(ERL_NIF_TERM t, const char *name);
/* A tuple's arity, or -1. */
int fake_arity(ERL_NIF_TERM t);
/* Element i (0-based) of a tuple; 0 when t is no tuple or i is too big. */
ERL_NIF_TERM fake_elem(ERL_NIF_TERM t, int i);
/* Whether t is an integer that fits, with its value. */
int fake_get_long(ERL_NIF_TERM t, long *v);
/* A binary's bytes, or NULL. */
const unsigned char *fake_bytes(ERL_NIF_TERM t, size_t *len);
/* Whether t is a resource term of the type named `type`. */
int fake_is_resource(ERL_NIF_TERM t, const char *type);
/* Prints a term (for failure messages), at most size bytes. */
void fake_format(ERL_NIF_TERM t, char *buf, size_t size);

/* The next enif_alloc_resource of the type named `type` returns NULL, as
 * on out of memory (once). */
void fake_fail_next_alloc(const char *type);

/* -------------------------------------------------------------- ports */

/* A new open port connected to p, as open_port/2 makes one for p: its
 * term, on p's heap, and in *id the number the functions below know it
 * by.  The port closes when p is reaped, as a port does when its
 * connected process exits. */
ERL_NIF_TERM fake_port(fake_proc_t *p, int *id);
/* Takes the port's first packet (the bytes of one enif_port_command),
 * waiting up to timeout_ms: a malloc'd copy for the caller to free, its
 * length in *len; NULL if none came (or the port is closed and empty).
 * Any thread. */
unsigned char *fake_port_take(int id, size_t *len, int timeout_ms);
/* Packets waiting at the port.  Any thread. */
size_t fake_port_len(int id);
/* Closes the port: enif_port_command to it returns 0 from now on, while
 * packets already queued can still be taken.  Any thread. */
void fake_port_close(int id);
/* Runs fn(arg) once, on the thread of the next enif_port_command to the
 * port, after its checks and before its packet is queued, with no lock
 * of the fake held: to stage what other processes do between a NIF's
 * deciding to send and its sending.  Any thread. */
void fake_port_hook(int id, void (*fn)(void *arg), void *arg);

/* --------------------------------------------------------- accounting */

/* Resources allocated and not yet destroyed. */
long fake_live_resources(void);
/* Process-independent envs allocated and not yet freed. */
long fake_live_envs(void);
/* Binaries allocated (enif_alloc_binary, enif_term_to_binary) that were
 * neither released nor made into a term. */
long fake_live_binaries(void);
/* Destructor calls so far for the resource type named `type`. */
long fake_dtor_calls(const char *type);
/* Misuses of the erl_nif API seen so far (each printed on stderr). */
long fake_violations(void);

/* Waits up to timeout_ms until no resource is alive and the janitor and
 * reaper of moat_nif.c have done every job queued to them (so every pool
 * nobody references has been stopped and freed).  Returns 1 if so. */
int fake_quiesce(int timeout_ms);

/* While set on a thread, uv_hrtime as moat_nif.c sees it (run/4's and
 * task_spin/1's wait) stands still on that thread, so those waits last
 * until the task's state changes.  A safety net lets time run again after
 * 10 s, so that a bug cannot hang the test. */
void fake_freeze_clock(int on);

#endif
