%%% @doc The Erlang face of my_tasks' task library (c_src/my_tasks.c): each
%%% function runs one of its native tasks on the application's moat pool
%%% and turns the task's outcome into an ordinary Erlang return value.
%%%
%%% ```
%%% {ok, _} = application:ensure_all_started(my_tasks),
%%% {ok, 2.5} = my_tasks:mean([1, 2, 3.5, 3.5]),
%%% {error, <<"mean of an empty list">>} = my_tasks:mean([]),
%%% 300286872 = my_tasks:adler32(<<"Wikipedia">>),
%%% {ok, 1229} = my_tasks:count_primes(10000, 5000),
%%% {error, timeout} = my_tasks:count_primes(1 bsl 40, 100).
%%% '''
-module(my_tasks).

-export([pool/0]).
-export([mean/1, adler32/1, count_primes/2]).

-define(POOL, my_tasks).

%% @doc The name of the application's moat pool, for calling its tasks
%% with moat's own API (`moat:async(my_tasks:pool(), mean, [[1, 2]])').
-spec pool() -> atom().
pool() ->
    ?POOL.

%% @doc The mean of a non-empty list of numbers (integers that fit 64
%% bits, and floats). An empty list is an error value; anything else that
%% is not such a list raises `badarg'.
-spec mean([number()]) -> {ok, float()} | {error, binary() | term()}.
mean(Numbers) ->
    case moat:run(?POOL, mean, [Numbers]) of
        {ok, Mean} -> {ok, Mean};
        %% The library's own failures arrive as {native_error, Message}.
        {exit, {native_error, Message}} -> {error, Message};
        {exit, badarg} -> error(badarg, [Numbers]);
        %% noproc, overloaded, timeout: the pool's, not the task's.
        {exit, Reason} -> {error, Reason}
    end.

%% @doc The Adler-32 checksum of a binary (the same as
%% `erlang:adler32/1'), computed in C. Raises `badarg' for a non-binary
%% and exits with the reason when the pool cannot run it.
-spec adler32(binary()) -> non_neg_integer().
adler32(Data) ->
    case moat:run(?POOL, adler32, [Data]) of
        {ok, Sum} -> Sum;
        {exit, badarg} -> error(badarg, [Data]);
        {exit, Reason} -> exit({Reason, {?MODULE, adler32, [Data]}})
    end.

%% @doc How many primes are below `N', or `{error, timeout}' when that
%% takes longer than `Timeout' ms. The task checks for cancellation, so
%% a timeout also stops it and frees its thread.
-spec count_primes(non_neg_integer(), timeout()) ->
    {ok, non_neg_integer()} | {error, term()}.
count_primes(N, Timeout) ->
    case moat:run(?POOL, count_primes, [N], Timeout) of
        {ok, Count} -> {ok, Count};
        {exit, badarg} -> error(badarg, [N, Timeout]);
        {exit, Reason} -> {error, Reason}
    end.
