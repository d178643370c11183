%%% @private
%%% @doc Internal to moat_bench: the "dirty NIF call per job" peer, a NIF
%%% library of two dirty CPU NIFs (bench/peers/moat_bench_dirty.c) that
%%% `make bench', `make shell' and `make iex' build into
%%% `_build/c/plain/bench/'. {@link moat_bench_peers} loads it on demand.
-module(moat_bench_dirty).

-export([load/1, loaded/0, echo/1, spin/1]).

%% @doc Loads the NIF library `Path' (without its `.so'); `ok' when it is
%% loaded already.
-spec load(file:filename()) -> ok | {error, term()}.
load(Path) ->
    case loaded() of
        true -> ok;
        false -> erlang:load_nif(Path, 0)
    end.

%% @doc Whether the NIFs are in.
-spec loaded() -> boolean().
loaded() ->
    try echo(true) of
        true -> true
    catch
        error:{moat_bench_dirty, not_loaded} -> false
    end.

%% @doc Returns `Term', from a dirty CPU scheduler.
-spec echo(term()) -> term().
echo(_Term) ->
    erlang:nif_error({?MODULE, not_loaded}).

%% @doc Busy-waits `Us' microseconds on a dirty CPU scheduler.
-spec spin(non_neg_integer()) -> ok.
spin(_Us) ->
    erlang:nif_error({?MODULE, not_loaded}).
