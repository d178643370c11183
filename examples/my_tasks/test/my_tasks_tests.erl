%%% my_tasks' tests: the task library built by this project's own hook,
%%% loaded into moat pools with `{priv, my_tasks, "my_tasks.so"}', and
%%% called through my_tasks' API and through moat's, in both backends.
-module(my_tasks_tests).

-include_lib("eunit/include/eunit.hrl").

-define(LIB, {priv, my_tasks, "my_tasks.so"}).

%% Larger than any run of these tests could finish: trial division up to
%% 2^40 takes hours, so only cancellation ends it early.
-define(FOREVER, 1 bsl 40).

app_test_() ->
    {setup, fun start_app/0, fun stop_app/1, [
        {"mean returns a float for integers and floats", fun mean_values/0},
        {"mean of [] is an error value, not a crash", fun mean_empty/0},
        {"bad arguments exit with badarg", fun bad_arguments/0},
        {"adler32 agrees with erlang:adler32/1", fun adler32_agrees/0},
        {"count_primes counts, through async/await and async_stream", fun count_primes_values/0},
        {"a cancelled count_primes stops and frees its thread",
            {timeout, 60, fun count_primes_cancelled/0}}
    ]}.

start_app() ->
    {ok, Apps} = application:ensure_all_started(my_tasks),
    Apps.

stop_app(Apps) ->
    [ok = application:stop(A) || A <- lists:reverse(Apps)],
    ok.

mean_values() ->
    ?assertEqual({ok, 2.5}, my_tasks:mean([1, 2, 3.5, 3.5])),
    %% A list of small integers reaches the task as STRING_EXT.
    ?assertEqual({ok, 2.5}, my_tasks:mean([1, 2, 3, 4])),
    ?assertEqual({ok, 1000.0}, my_tasks:mean([1000])),
    ?assertEqual({ok, -0.5}, my_tasks:mean([-1, 0.0])),
    ?assertEqual({ok, float(1 bsl 40)}, my_tasks:mean([1 bsl 40, 1 bsl 40])).

mean_empty() ->
    Msg = <<"mean of an empty list">>,
    ?assertEqual({error, Msg}, my_tasks:mean([])),
    ?assertEqual({exit, {native_error, Msg}}, moat:run(my_tasks:pool(), mean, [[]])),
    T = moat:async(my_tasks:pool(), mean, [[]]),
    ?assertExit({{native_error, Msg}, {moat, await, [T, 5000]}}, moat:await(T)),
    %% The pool is still there: a failed task is a value.
    ?assertEqual({ok, 3.0}, my_tasks:mean([3])).

bad_arguments() ->
    P = my_tasks:pool(),
    ?assertEqual({exit, badarg}, moat:run(P, mean, [[1, a]])),
    ?assertEqual({exit, badarg}, moat:run(P, mean, [[1 | 2]])),
    ?assertEqual({exit, badarg}, moat:run(P, mean, [not_a_list])),
    ?assertEqual({exit, badarg}, moat:run(P, mean, [[1, 2], extra])),
    ?assertEqual({exit, badarg}, moat:run(P, mean, [[1 bsl 70]])),
    ?assertEqual({exit, badarg}, moat:run(P, adler32, ["a list"])),
    ?assertEqual({exit, badarg}, moat:run(P, count_primes, [-1])),
    ?assertEqual({exit, badarg}, moat:run(P, count_primes, [])),
    ?assertError(badarg, my_tasks:mean([x])),
    ?assertError(badarg, my_tasks:adler32(x)),
    ?assertEqual({exit, {unknown_task, median}}, moat:run(P, median, [[1]])).

adler32_agrees() ->
    ?assertEqual(300286872, my_tasks:adler32(<<"Wikipedia">>)),
    ?assertEqual(1, my_tasks:adler32(<<>>)),
    Bins = [<<>>, <<0>>, <<255>>, binary:copy(<<255>>, 100000), rand:bytes(1 bsl 20)],
    [?assertEqual(erlang:adler32(B), my_tasks:adler32(B)) || B <- Bins].

count_primes_values() ->
    P = my_tasks:pool(),
    ?assertEqual({ok, 0}, my_tasks:count_primes(0, 5000)),
    ?assertEqual({ok, 25}, my_tasks:count_primes(100, 5000)),
    ?assertEqual({ok, 1229}, my_tasks:count_primes(10000, 5000)),
    ?assertEqual(9592, moat:await(moat:async(P, count_primes, [100000]))),
    ?assertEqual(
        [{ok, 4}, {ok, 25}, {ok, 168}, {ok, 1229}],
        moat:async_stream(P, count_primes, [10, 100, 1000, 10000], #{max_concurrency => 2})
    ).

count_primes_cancelled() ->
    P = my_tasks:pool(),
    %% run/4's timeout cancels the task. moat answers at once; the body
    %% was running, so it is counted as abandoned until it returns. One
    %% that never looked at moat_should_stop() would stay so for hours.
    ?assertEqual({error, timeout}, my_tasks:count_primes(?FOREVER, 100)),
    ?assert(wait_until(fun() -> maps:get(abandoned, moat:stats(P)) =:= 0 end, 10000)),
    %% shutdown/2 cancels, then waits for a running body to return: nil
    %% when it did, {exit, killed} when it had to abandon it.
    T = moat:async(P, count_primes, [?FOREVER]),
    ?assert(wait_until(fun() -> maps:get(running, moat:stats(P)) =:= 1 end, 10000)),
    ?assertEqual(nil, moat:shutdown(T, 10000)),
    ?assertMatch(#{running := 0, abandoned := 0, threads := 2}, moat:stats(P)).

%% The same .so in the C-node backend, unchanged.
cnode_test_() ->
    {setup, fun start_cnode_pool/0, fun stop_cnode_pool/1, [
        {"the C-node runs the library with the same results", fun cnode_results/0}
    ]}.

start_cnode_pool() ->
    {ok, Apps} = application:ensure_all_started(moat),
    {ok, _} = moat:start_pool(my_tasks_cnode, #{backend => cnode, size => 1, libraries => [?LIB]}),
    Apps.

stop_cnode_pool(Apps) ->
    ok = moat:stop_pool(my_tasks_cnode),
    stop_app(Apps).

cnode_results() ->
    P = my_tasks_cnode,
    ?assertEqual({ok, 2.5}, moat:run(P, mean, [[1, 2, 3.5, 3.5]])),
    ?assertEqual({exit, {native_error, <<"mean of an empty list">>}}, moat:run(P, mean, [[]])),
    ?assertEqual({ok, erlang:adler32(<<"moat">>)}, moat:run(P, adler32, [<<"moat">>])),
    ?assertEqual({exit, badarg}, moat:run(P, count_primes, [-1])),
    ?assertEqual({exit, timeout}, moat:run(P, count_primes, [?FOREVER], 100)),
    ?assertEqual({ok, 1229}, moat:run(P, count_primes, [10000], 10000)).

wait_until(Fun, Ms) when Ms =< 0 ->
    Fun();
wait_until(Fun, Ms) ->
    Fun() orelse begin
        timer:sleep(20),
        wait_until(Fun, Ms - 20)
    end.
