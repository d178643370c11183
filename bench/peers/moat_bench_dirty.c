/*
 * bench/peers/moat_bench_dirty.c: the "dirty NIF call per job" peer of
 * moat_bench, the NIF people write when they do not use moat.
 *
 * Two NIFs, both on the dirty CPU schedulers: echo/1 returns its argument
 * and spin/1 busy-waits for its argument in microseconds on
 * CLOCK_MONOTONIC, the same loop as moat_demo's `spin` task, so that a
 * fan-out of these calls does the same work as one through moat.
 * Loaded by bench/moat_bench_dirty.erl; built by `make bench`, `make
 * shell` and `make iex` into _build/c/plain/bench/, never into priv/.
 */
#include <time.h>

#include <erl_nif.h>

static long long now_ns(void) {
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* echo(Term) -> Term, on a dirty CPU scheduler. */
static ERL_NIF_TERM nif_echo(ErlNifEnv *env, int argc,
                             const ERL_NIF_TERM argv[]) {
    (void)env;
    (void)argc;
    return argv[0];
}

/* spin(Us) -> ok, busy-waiting Us microseconds on a dirty CPU scheduler. */
static ERL_NIF_TERM nif_spin(ErlNifEnv *env, int argc,
                             const ERL_NIF_TERM argv[]) {
    ErlNifSInt64 us;
    long long deadline;

    (void)argc;
    if (!enif_get_int64(env, argv[0], &us) || us < 0)
        return enif_make_badarg(env);
    deadline = now_ns() + us * 1000LL;
    while (now_ns() < deadline)
        ;
    return enif_make_atom(env, "ok");
}

static ErlNifFunc funcs[] = {
    {"echo", 1, nif_echo, ERL_NIF_DIRTY_JOB_CPU_BOUND},
    {"spin", 1, nif_spin, ERL_NIF_DIRTY_JOB_CPU_BOUND},
};

ERL_NIF_INIT(moat_bench_dirty, funcs, NULL, NULL, NULL, NULL)
