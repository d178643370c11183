%%% @doc The Task-like API of moat (DESIGN.md §3, §4, §5; REFERENCE.md §2):
%%% await, yield, yield_many, shutdown, ignore, run, async options, links,
%%% refusals, async_stream and stream, and the promise that every task gets
%%% exactly one outcome message unless its owner gave it up.
%%%
%%% Every case ends by checking that the caller's mailbox holds nothing
%%% about its tasks, so a duplicate or late message fails the case.
-module(moat_task_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-import(moat_ct_util, [wait_until/2]).

-export([all/0, groups/0, suite/0]).
-export([init_per_suite/1, end_per_suite/1, init_per_group/2, end_per_group/2]).
-export([init_per_testcase/2, end_per_testcase/2]).
-export([
    await_returns_value/1,
    await_exits_with_task_reason/1,
    await_timeout_cancels_and_discards/1,
    await_timeout_unlinks/1,
    only_owner_may_collect/1,
    bad_arguments_raise_badarg/1,
    yield_returns_ok_and_exit/1,
    yield_nil_then_result/1,
    yield_many_in_input_order/1,
    shutdown_returns_reply_already_there/1,
    shutdown_returns_task_own_reason/1,
    shutdown_queued_task_is_nil/1,
    shutdown_running_cooperative_is_nil/1,
    shutdown_running_spin_is_killed/1,
    shutdown_brutal_kill_is_nil/1,
    shutdown_consumed_is_noproc/1,
    shutdown_linked_sends_no_exit/1,
    ignore_running_task/1,
    ignore_delivered_outcome/1,
    run_outcomes/1,
    run_timeout_cancels/1,
    run_refusals/1,
    run_badarg/1,
    async_timeout_option/1,
    async_badarg/1,
    async_badarg_leaves_no_link/1,
    link_trapping_caller_gets_exit/1,
    killing_linked_pid_kills_task/1,
    link_nontrapping_caller_dies/1,
    caller_death_cancels_task/1,
    linked_refusal_is_exit/1,
    overloaded/1,
    design_reasons/1,
    stop_pool_sends_shutdown/1,
    pool_restart_gives_shutdown/1,
    ignored_task_silent_on_stop/1,
    async_stream_inputs_round_trip/1,
    async_stream_ordered/1,
    async_stream_unordered/1,
    async_stream_failures_and_refusals/1,
    async_stream_max_concurrency/1,
    async_stream_kill_task/1,
    async_stream_on_timeout_exit/1,
    async_stream_task_chosen_timeout/1,
    async_stream_zip_input_on_exit/1,
    async_stream_badarg/1,
    stream_is_lazy_and_done/1,
    stream_halt_cancels/1,
    stream_suspend_continues/1,
    stream_element_not_held_back/1,
    stream_reducer_crash_cancels/1,
    stream_on_timeout_exit/1,
    concurrent_streams_leave_nothing/1,
    exactly_one_outcome/1
]).

-define(POOL, moat_task_pool).
-define(SMALL, moat_task_small_pool).
-define(NO_POOL, moat_task_no_such_pool).

%% How long a case waits for something it knows will happen.
-define(WAIT, 5000).

%%%===================================================================
%%% Common Test callbacks
%%%===================================================================

suite() ->
    [{timetrap, {seconds, 30}}].

%% The whole suite runs once per backend: the same shapes and reasons.
all() ->
    [{group, nif}, {group, cnode_thread}, {group, cnode_process}, {group, cnode_dist}].

groups() ->
    [
        {nif, [], cases()},
        {cnode_thread, [], cases()},
        {cnode_process, [], cases()},
        {cnode_dist, [], cases()}
    ].

cases() ->
    [
        await_returns_value,
        await_exits_with_task_reason,
        await_timeout_cancels_and_discards,
        await_timeout_unlinks,
        only_owner_may_collect,
        bad_arguments_raise_badarg,
        yield_returns_ok_and_exit,
        yield_nil_then_result,
        yield_many_in_input_order,
        shutdown_returns_reply_already_there,
        shutdown_returns_task_own_reason,
        shutdown_queued_task_is_nil,
        shutdown_running_cooperative_is_nil,
        shutdown_running_spin_is_killed,
        shutdown_brutal_kill_is_nil,
        shutdown_consumed_is_noproc,
        shutdown_linked_sends_no_exit,
        ignore_running_task,
        ignore_delivered_outcome,
        run_outcomes,
        run_timeout_cancels,
        run_refusals,
        run_badarg,
        async_timeout_option,
        async_badarg,
        async_badarg_leaves_no_link,
        link_trapping_caller_gets_exit,
        killing_linked_pid_kills_task,
        link_nontrapping_caller_dies,
        caller_death_cancels_task,
        linked_refusal_is_exit,
        overloaded,
        design_reasons,
        stop_pool_sends_shutdown,
        pool_restart_gives_shutdown,
        ignored_task_silent_on_stop,
        async_stream_inputs_round_trip,
        async_stream_ordered,
        async_stream_unordered,
        async_stream_failures_and_refusals,
        async_stream_max_concurrency,
        async_stream_kill_task,
        async_stream_on_timeout_exit,
        async_stream_task_chosen_timeout,
        async_stream_zip_input_on_exit,
        async_stream_badarg,
        stream_is_lazy_and_done,
        stream_halt_cancels,
        stream_suspend_continues,
        stream_element_not_held_back,
        stream_reducer_crash_cancels,
        stream_on_timeout_exit,
        concurrent_streams_leave_nothing,
        exactly_one_outcome
    ].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(moat),
    Config.

end_per_suite(_Config) ->
    _ = application:stop(moat),
    ok.

init_per_group(Group, Config) ->
    moat_ct_util:init_backend(Group, Config).

end_per_group(Group, Config) ->
    moat_ct_util:end_backend(Group, Config).

%% A fresh pool of two threads per case: counters start at zero and no
%% task of an earlier case is left in it.
init_per_testcase(_Case, Config) ->
    {ok, _} = start_pool(Config, ?POOL, #{size => 2}),
    [{pool, ?POOL} | Config].

end_per_testcase(_Case, _Config) ->
    process_flag(trap_exit, false),
    _ = moat:stop_pool(?POOL),
    _ = moat:stop_pool(?SMALL),
    ok.

%% Starts a pool of the group's backend.
start_pool(Config, Name, Opts) ->
    moat:start_pool(Name, maps:merge(?config(backend, Config), Opts)).

%%%===================================================================
%%% await
%%%===================================================================

await_returns_value(Config) ->
    %% await/1,2 return the task's value, whatever its shape, and leave nothing behind.
    P = ?config(pool, Config),
    ?assertEqual(hello, moat:await(moat:async(P, echo, [hello]))),
    ?assertEqual(832040, moat:await(moat:async(P, fib, [30]), 5000)),
    ?assertEqual(ok, moat:await(moat:async(P, sleep, [10]), infinity)),
    Term = #{a => [1, {2, <<"x">>}], b => 3.5, "c" => -(1 bsl 70)},
    ?assertEqual(Term, moat:await(moat:async(P, echo, [Term]))),
    ?assertEqual(6, moat:await(moat:async(P, sum, [<<1, 2, 3>>]))),
    sweep().

await_exits_with_task_reason(Config) ->
    %% A task that went down makes await exit {Reason, {moat, await, Args}}, even for normal.
    P = ?config(pool, Config),
    T1 = moat:async(P, exit, [boom]),
    ?assertEqual(
        {exit, {boom, {moat, await, [T1, 5000]}}}, catch_exit(fun() -> moat:await(T1) end)
    ),
    T2 = moat:async(P, fail, [<<"bad">>]),
    ?assertEqual(
        {exit, {{native_error, <<"bad">>}, {moat, await, [T2, 1000]}}},
        catch_exit(fun() -> moat:await(T2, 1000) end)
    ),
    T3 = moat:async(P, exit, [normal]),
    ?assertEqual(
        {exit, {normal, {moat, await, [T3, 5000]}}}, catch_exit(fun() -> moat:await(T3) end)
    ),
    T4 = moat:async(?NO_POOL, echo, [x]),
    ?assertEqual(
        {exit, {noproc, {moat, await, [T4, infinity]}}},
        catch_exit(fun() -> moat:await(T4, infinity) end)
    ),
    sweep().

await_timeout_cancels_and_discards(Config) ->
    %% An await timeout exits with timeout, cancels the task, and no late message arrives.
    P = ?config(pool, Config),
    C0 = stat(P, cancelled),
    T = moat:async(P, sleep, [60000]),
    ?assertEqual(
        {exit, {timeout, {moat, await, [T, 50]}}}, catch_exit(fun() -> moat:await(T, 50) end)
    ),
    wait_until(fun() -> match(#{running => 0, abandoned => 0}, moat:stats(P)) end, sleep_cancelled),
    ?assertEqual(C0 + 1, stat(P, cancelled)),
    %% A body that ignores cancellation returns after the timeout; its
    %% result must be discarded, not delivered late.
    S = moat:async(P, spin, [1000000]),
    wait_running(P, 1),
    ?assertEqual(
        {exit, {timeout, {moat, await, [S, 50]}}}, catch_exit(fun() -> moat:await(S, 50) end)
    ),
    ?assertEqual(1, stat(P, abandoned)),
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, spin_returned),
    sweep().

await_timeout_unlinks(Config) ->
    %% After an await timeout on a linked task no exit signal arrives and its proxy is gone.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    T = moat:async(P, sleep, [60000], #{link => true}),
    #{pid := Pid} = T,
    ?assert(is_pid(Pid)),
    ?assertEqual(
        {exit, {timeout, {moat, await, [T, 50]}}}, catch_exit(fun() -> moat:await(T, 50) end)
    ),
    wait_until(fun() -> not is_process_alive(Pid) end, proxy_gone),
    wait_until(fun() -> stat(P, running) =:= 0 end, task_cancelled),
    sweep(),
    process_flag(trap_exit, false).

only_owner_may_collect(Config) ->
    %% await, yield, yield_many, shutdown and ignore raise badarg in any other process.
    P = ?config(pool, Config),
    T = moat:async(P, sleep, [100]),
    Calls = [
        fun() -> moat:await(T) end,
        fun() -> moat:await(T, 100) end,
        fun() -> moat:yield(T, 100) end,
        fun() -> moat:yield_many([T], 100) end,
        fun() -> moat:shutdown(T) end,
        fun() -> moat:shutdown(T, brutal_kill) end,
        fun() -> moat:ignore(T) end
    ],
    Parent = self(),
    {Other, MRef} = spawn_monitor(fun() -> Parent ! {self(), [catch_class(F) || F <- Calls]} end),
    receive
        {Other, Got} -> ?assertEqual(lists:duplicate(length(Calls), {error, badarg}), Got)
    after ?WAIT -> ct:fail(no_answer_from_other)
    end,
    receive
        {'DOWN', MRef, process, Other, _} -> ok
    end,
    %% The owner still gets its one result.
    ?assertEqual(ok, moat:await(T)),
    sweep().

bad_arguments_raise_badarg(Config) ->
    %% Bad arguments to await, yield, yield_many, shutdown and ignore raise badarg, harmlessly.
    P = ?config(pool, Config),
    T = moat:async(P, echo, [x]),
    Calls = [
        fun() -> moat:await(not_a_task) end,
        fun() -> moat:await(T, -1) end,
        fun() -> moat:await(T, 1.5) end,
        fun() -> moat:yield(#{}, 10) end,
        fun() -> moat:yield(T, foo) end,
        fun() -> moat:yield_many(not_a_list, 10) end,
        fun() -> moat:yield_many([T], -5) end,
        fun() -> moat:yield_many([not_a_task], 10) end,
        fun() -> moat:shutdown(not_a_task) end,
        fun() -> moat:shutdown(T, kill) end,
        fun() -> moat:shutdown(T, -1) end,
        fun() -> moat:ignore(not_a_task) end
    ],
    ?assertEqual(lists:duplicate(length(Calls), {error, badarg}), [catch_class(F) || F <- Calls]),
    ?assertEqual(x, moat:await(T)),
    ?assertEqual([], moat:yield_many([], 0)),
    sweep().

%%%===================================================================
%%% yield and yield_many
%%%===================================================================

yield_returns_ok_and_exit(Config) ->
    %% yield gives {ok, R} for a reply and {exit, Reason} for a task that went down or was refused.
    P = ?config(pool, Config),
    ?assertEqual({ok, v}, moat:yield(moat:async(P, echo, [v]), 5000)),
    ?assertEqual({ok, v}, moat:yield(moat:async(P, echo, [v]), infinity)),
    ?assertEqual({exit, r}, moat:yield(moat:async(P, exit, [r]), 5000)),
    ?assertEqual({exit, {native_error, <<"m">>}}, moat:yield(moat:async(P, fail, ["m"]), 5000)),
    ?assertEqual({exit, noproc}, moat:yield(moat:async(?NO_POOL, echo, [v]), 5000)),
    ?assertEqual({exit, {unknown_task, nope}}, moat:yield(moat:async(P, nope, []), 5000)),
    sweep().

yield_nil_then_result(Config) ->
    %% yield returns nil while the task runs, the task goes on, and a later yield gets its result.
    P = ?config(pool, Config),
    T = moat:async(P, sleep, [500]),
    ?assertEqual(nil, moat:yield(T, 10)),
    ?assertEqual(nil, moat:yield(T, 0)),
    ?assertEqual({ok, ok}, moat:yield(T, ?WAIT)),
    ?assertEqual(nil, moat:yield(T, 0)),
    sweep().

yield_many_in_input_order(Config) ->
    %% yield_many answers in input order, with nil for tasks still running at its timeout.
    P = ?config(pool, Config),
    Slow = moat:async(P, sleep, [200]),
    E = moat:async(P, echo, [a]),
    X = moat:async(P, exit, [r]),
    N = moat:async(?NO_POOL, echo, [x]),
    ?assertEqual(
        [{Slow, {ok, ok}}, {E, {ok, a}}, {X, {exit, r}}, {N, {exit, noproc}}],
        moat:yield_many([Slow, E, X, N], infinity)
    ),
    Long = moat:async(P, sleep, [60000]),
    E2 = moat:async(P, echo, [b]),
    F = moat:async(P, fail, [<<"f">>]),
    wait_outcome(E2),
    wait_outcome(F),
    ?assertEqual(
        [{Long, nil}, {E2, {ok, b}}, {F, {exit, {native_error, <<"f">>}}}],
        moat:yield_many([Long, E2, F], 50)
    ),
    %% The task still running was not touched: it can be yielded or stopped.
    ?assertEqual([{Long, nil}], moat:yield_many([Long], 0)),
    ?assertEqual(nil, moat:shutdown(Long)),
    sweep().

%%%===================================================================
%%% shutdown
%%%===================================================================

shutdown_returns_reply_already_there(Config) ->
    %% shutdown returns {ok, R} when the reply is already in the mailbox, and consumes it.
    P = ?config(pool, Config),
    T = moat:async(P, echo, [x]),
    wait_outcome(T),
    ?assertEqual({ok, x}, moat:shutdown(T)),
    T2 = moat:async(P, echo, [y]),
    wait_outcome(T2),
    ?assertEqual({ok, y}, moat:shutdown(T2, brutal_kill)),
    sweep().

shutdown_returns_task_own_reason(Config) ->
    %% shutdown returns {exit, R} for a task that ended with its own reason, even shutdown.
    P = ?config(pool, Config),
    Cases = [
        {exit, [boom], boom},
        {exit, [shutdown], shutdown},
        {exit, [killed], killed},
        {fail, [<<"m">>], {native_error, <<"m">>}}
    ],
    lists:foreach(
        fun({Task, Args, Reason}) ->
            T = moat:async(P, Task, Args),
            wait_outcome(T),
            ?assertEqual({exit, Reason}, moat:shutdown(T))
        end,
        Cases
    ),
    Timed = moat:async(P, sleep, [60000], #{timeout => 20}),
    wait_outcome(Timed),
    ?assertEqual({exit, timeout}, moat:shutdown(Timed, brutal_kill)),
    sweep().

shutdown_queued_task_is_nil(Config) ->
    %% shutdown of a task still waiting in the queue returns nil and takes it off the queue.
    P = ?config(pool, Config),
    B1 = moat:async(P, sleep, [60000]),
    B2 = moat:async(P, sleep, [60000]),
    wait_running(P, 2),
    Q = moat:async(P, echo, [x]),
    ?assertMatch(#{queued := 1, running := 2}, moat:stats(P)),
    ?assertEqual(nil, moat:shutdown(Q)),
    ?assertEqual(0, stat(P, queued)),
    ?assertEqual(nil, moat:shutdown(B1)),
    ?assertEqual(nil, moat:shutdown(B2, 1000)),
    ?assertEqual(0, stat(P, running)),
    ?assertEqual(3, stat(P, cancelled)),
    sweep().

shutdown_running_cooperative_is_nil(Config) ->
    %% shutdown of a running task that heeds cancellation returns nil and frees its thread.
    P = ?config(pool, Config),
    T = moat:async(P, sleep, [60000]),
    wait_running(P, 1),
    ?assertEqual(nil, moat:shutdown(T)),
    ?assertMatch(#{running := 0, cancelled := 1}, moat:stats(P)),
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, sleep_returned),
    T2 = moat:async(P, sleep, [60000]),
    wait_running(P, 1),
    ?assertEqual(nil, moat:shutdown(T2, infinity)),
    ?assertMatch(#{running := 0, cancelled := 2}, moat:stats(P)),
    sweep().

shutdown_running_spin_is_killed(Config) ->
    %% shutdown of a running task that ignores cancellation is {exit, killed}; no late result.
    P = ?config(pool, Config),
    ?assertEqual({exit, killed}, shutdown_started_spin(P, 5)),
    ?assertMatch(#{running := 0, abandoned := 1}, moat:stats(P)),
    %% The pool still serves while the abandoned body runs.
    ?assertEqual({ok, x}, moat:run(P, echo, [x])),
    ?assertEqual({ok, y}, moat:run(P, echo, [y])),
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, spin_returned),
    sweep().

%% shutdown(T, 50) of a spin whose body has started. Only the backend
%% knows when a body is on a thread; the C-node's "running" means sent.
%% An echo behind it on a free thread makes a start very likely (in the
%% VM and in thread isolation the queue is FIFO, so it is certain; with
%% worker processes the spin's worker may still be about to begin). A
%% spin cancelled before it began is nil, as it should be: try again.
shutdown_started_spin(P, Tries) ->
    T = moat:async(P, spin, [1500000]),
    wait_running(P, 1),
    ?assertEqual({ok, started}, moat:run(P, echo, [started])),
    case moat:shutdown(T, 50) of
        nil when Tries > 1 -> shutdown_started_spin(P, Tries - 1);
        Result -> Result
    end.

shutdown_brutal_kill_is_nil(Config) ->
    %% shutdown with brutal_kill returns nil for a running task, cooperative or not.
    P = ?config(pool, Config),
    T = moat:async(P, sleep, [60000]),
    wait_running(P, 1),
    ?assertEqual(nil, moat:shutdown(T, brutal_kill)),
    ?assertEqual(0, stat(P, running)),
    %% Abandoned at once, the cooperative body then leaves its thread.
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, sleep_returned),
    S = moat:async(P, spin, [1000000]),
    wait_running(P, 1),
    ?assertEqual(nil, moat:shutdown(S, brutal_kill)),
    ?assertMatch(#{running := 0, abandoned := 1}, moat:stats(P)),
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, spin_returned),
    sweep().

shutdown_consumed_is_noproc(Config) ->
    %% shutdown returns {exit, noproc} when the task's outcome was already consumed.
    P = ?config(pool, Config),
    T = moat:async(P, echo, [x]),
    ?assertEqual(x, moat:await(T)),
    ?assertEqual({exit, noproc}, moat:shutdown(T)),
    T2 = moat:async(P, exit, [r]),
    ?assertEqual({exit, r}, moat:yield(T2, ?WAIT)),
    ?assertEqual({exit, noproc}, moat:shutdown(T2, brutal_kill)),
    T3 = moat:async(?NO_POOL, echo, [x]),
    ?assertEqual({exit, noproc}, moat:yield(T3, ?WAIT)),
    ?assertEqual({exit, noproc}, moat:shutdown(T3, 100)),
    sweep().

shutdown_linked_sends_no_exit(Config) ->
    %% Shutting down a linked task removes the link first: no exit signal follows, whatever came.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    T = moat:async(P, sleep, [60000], #{link => true}),
    wait_running(P, 1),
    ?assertEqual(nil, moat:shutdown(T)),
    F = moat:async(P, exit, [boom], #{link => true}),
    wait_outcome(F),
    ?assertEqual({exit, boom}, moat:shutdown(F)),
    K = moat:async(P, sleep, [60000], #{link => true}),
    ?assertEqual(nil, moat:shutdown(K, brutal_kill)),
    lists:foreach(
        fun(#{pid := Pid}) -> wait_until(fun() -> not is_process_alive(Pid) end, proxy_gone) end,
        [T, F, K]
    ),
    sweep(),
    process_flag(trap_exit, false).

%%%===================================================================
%%% ignore
%%%===================================================================

ignore_running_task(Config) ->
    %% ignore returns nil for a running task, which runs to completion; no message ever arrives.
    P = ?config(pool, Config),
    C0 = stat(P, completed),
    T = moat:async(P, sleep, [500]),
    wait_running(P, 1),
    ?assertEqual(nil, moat:ignore(T)),
    wait_until(fun() -> stat(P, completed) =:= C0 + 1 end, ignored_task_completed),
    ?assertMatch(#{running := 0, cancelled := 0}, moat:stats(P)),
    %% Linked: no exit signal either, even for a failure.
    process_flag(trap_exit, true),
    F0 = stat(P, failed),
    L = moat:async(P, sleep, [60000], #{link => true, timeout => 200}),
    ?assertEqual(nil, moat:ignore(L)),
    wait_until(fun() -> stat(P, timeouts) =:= 1 end, ignored_task_timed_out),
    E = moat:async(P, exit, [boom], #{link => true}),
    _ = moat:ignore(E),
    wait_until(fun() -> stat(P, failed) =:= F0 + 1 end, ignored_task_failed),
    sweep(),
    process_flag(trap_exit, false).

ignore_delivered_outcome(Config) ->
    %% ignore returns {ok, R} or {exit, R} when the outcome was already delivered, and consumes it.
    P = ?config(pool, Config),
    T = moat:async(P, echo, [x]),
    wait_outcome(T),
    ?assertEqual({ok, x}, moat:ignore(T)),
    T2 = moat:async(P, exit, [r]),
    wait_outcome(T2),
    ?assertEqual({exit, r}, moat:ignore(T2)),
    T3 = moat:async(?NO_POOL, echo, [x]),
    ?assertEqual({exit, noproc}, moat:ignore(T3)),
    sweep().

%%%===================================================================
%%% run
%%%===================================================================

run_outcomes(Config) ->
    %% run returns {ok, Result} or {exit, Reason} and never raises for a failed task.
    P = ?config(pool, Config),
    ?assertEqual({ok, hello}, moat:run(P, echo, [hello])),
    ?assertEqual({ok, 55}, moat:run(P, fib, [10], 5000)),
    ?assertEqual({ok, ok}, moat:run(P, sleep, [1], infinity)),
    ?assertEqual({ok, ok}, moat:run(P, alloc, [1 bsl 20])),
    ?assertEqual({exit, boom}, moat:run(P, exit, [boom])),
    ?assertEqual({exit, normal}, moat:run(P, exit, [normal])),
    ?assertEqual({exit, {native_error, <<"no">>}}, moat:run(P, fail, ["no"])),
    ?assertEqual({exit, badarg}, moat:run(P, fib, [notanumber])),
    sweep().

run_timeout_cancels(Config) ->
    %% run past its timeout returns {exit, timeout} and the task is cancelled, cooperative or not.
    P = ?config(pool, Config),
    ?assertEqual({exit, timeout}, moat:run(P, sleep, [60000], 50)),
    wait_until(fun() -> stat(P, running) =:= 0 end, sleep_cancelled),
    ?assertEqual(1, stat(P, timeouts)),
    ?assertEqual({exit, timeout}, moat:run(P, spin, [600000], 50)),
    ?assertMatch(#{running := 0, timeouts := 2}, moat:stats(P)),
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, spin_returned),
    sweep().

run_refusals(Config) ->
    %% run returns refusals as {exit, noproc} and {exit, {unknown_task, T}}.
    P = ?config(pool, Config),
    ?assertEqual({exit, noproc}, moat:run(?NO_POOL, echo, [x])),
    ?assertEqual({exit, noproc}, moat:run(?NO_POOL, echo, [x], 100)),
    ?assertEqual({exit, {unknown_task, nope}}, moat:run(P, nope, [])),
    sweep().

run_badarg(Config) ->
    %% run raises badarg for wrong argument types and bad timeouts, and starts nothing.
    P = ?config(pool, Config),
    Calls = [
        fun() -> moat:run(P, echo, not_a_list) end,
        fun() -> moat:run(P, echo, [x], -1) end,
        fun() -> moat:run(P, echo, [x], 1.5) end,
        fun() -> moat:run(P, echo, [x], foo) end,
        fun() -> moat:run("pool", echo, [x]) end,
        fun() -> moat:run(P, "echo", [x]) end
    ],
    ?assertEqual(lists:duplicate(length(Calls), {error, badarg}), [catch_class(F) || F <- Calls]),
    ?assertMatch(#{completed := 0, failed := 0, queued := 0, running := 0}, moat:stats(P)),
    sweep().

%%%===================================================================
%%% async options and links
%%%===================================================================

async_timeout_option(Config) ->
    %% #{timeout => Ms} cancels the task past Ms and its outcome is a DOWN with reason timeout.
    P = ?config(pool, Config),
    T = moat:async(P, sleep, [60000], #{timeout => 50}),
    #{ref := Ref, id := Id, pid := undefined} = T,
    receive
        {'DOWN', Ref, process, Id2, Reason} -> ?assertEqual({Id, timeout}, {Id2, Reason})
    after ?WAIT -> ct:fail(no_timeout_down)
    end,
    ?assertMatch(#{running := 0, timeouts := 1}, moat:stats(P)),
    %% A task done before its deadline replies as usual; proplists work.
    ?assertEqual({ok, x}, moat:yield(moat:async(P, echo, [x], [{timeout, 5000}]), ?WAIT)),
    ?assertEqual({ok, x}, moat:yield(moat:async(P, echo, [x], #{timeout => infinity}), ?WAIT)),
    sweep().

async_badarg(Config) ->
    %% async raises badarg for wrong argument types and bad options, and starts nothing.
    P = ?config(pool, Config),
    Calls = [
        fun() -> moat:async(P, echo, not_a_list) end,
        fun() -> moat:async(P, echo, [a | b]) end,
        fun() -> moat:async("pool", echo, []) end,
        fun() -> moat:async(P, "echo", []) end,
        fun() -> moat:async(P, echo, [x], #{timeout => -1}) end,
        fun() -> moat:async(P, echo, [x], #{timeout => foo}) end,
        fun() -> moat:async(P, echo, [x], #{link => maybe}) end,
        fun() -> moat:async(P, echo, [x], #{bogus => 1}) end,
        fun() -> moat:async(P, echo, [x], not_options) end
    ],
    ?assertEqual(lists:duplicate(length(Calls), {error, badarg}), [catch_class(F) || F <- Calls]),
    ?assertMatch(#{completed := 0, failed := 0, queued := 0, running := 0}, moat:stats(P)),
    sweep().

async_badarg_leaves_no_link(Config) ->
    %% A linked async that raises badarg leaves no process linked to the caller.
    P = ?config(pool, Config),
    {links, Before} = process_info(self(), links),
    ?assertEqual(
        {error, badarg},
        catch_class(fun() -> moat:async(P, echo, [a | b], #{link => true}) end)
    ),
    {links, After} = process_info(self(), links),
    ?assertEqual(lists:sort(Before), lists:sort(After)),
    sweep().

killing_linked_pid_kills_task(Config) ->
    %% Killing the process that stands for a linked task kills the task: its
    %% owner sees DOWN killed and EXIT killed, and the thread is freed.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    T = moat:async(P, sleep, [60000], #{link => true}),
    #{ref := Ref, pid := Pid} = T,
    wait_running(P, 1),
    exit(Pid, kill),
    receive
        {'DOWN', Ref, process, Pid, R} -> ?assertEqual(killed, R)
    after ?WAIT -> ct:fail(no_down)
    end,
    receive
        {'EXIT', Pid, E} -> ?assertEqual(killed, E)
    after ?WAIT -> ct:fail(no_exit)
    end,
    wait_idle(P),
    sweep(),
    process_flag(trap_exit, false).

link_trapping_caller_gets_exit(Config) ->
    %% A trapping caller of a linked task gets its outcome and {'EXIT', Pid, Reason or normal}.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    Cases = [
        {exit, [boom], {down, boom}},
        {fail, [<<"m">>], {down, {native_error, <<"m">>}}},
        {echo, [x], {reply, x}},
        {sleep, [60000], {down, timeout}, #{timeout => 20}}
    ],
    lists:foreach(
        fun(Case) ->
            {Task, Args, Expect, Opts} =
                case Case of
                    {A, B, C} -> {A, B, C, #{}};
                    Four -> Four
                end,
            T = moat:async(P, Task, Args, Opts#{link => true}),
            #{ref := Ref, pid := Pid, id := Id} = T,
            ?assert(is_pid(Pid)),
            Outcome =
                receive
                    {Ref, R} -> {reply, R};
                    {'DOWN', Ref, process, Id, R} -> {down, R}
                after ?WAIT -> ct:fail({no_outcome, Task})
                end,
            ?assertEqual(Expect, Outcome),
            ExitReason =
                case Expect of
                    {reply, _} -> normal;
                    {down, Why} -> Why
                end,
            receive
                {'EXIT', Pid, Got} -> ?assertEqual(ExitReason, Got)
            after ?WAIT -> ct:fail({no_exit, Task})
            end
        end,
        Cases
    ),
    sweep(),
    process_flag(trap_exit, false).

link_nontrapping_caller_dies(Config) ->
    %% A linked task's failure kills a caller not trapping exits, with its reason; success does not.
    P = ?config(pool, Config),
    Parent = self(),
    lists:foreach(
        fun({Task, Args, Opts, Reason}) ->
            {Pid, MRef} = spawn_monitor(fun() ->
                _ = moat:async(P, Task, Args, Opts#{link => true}),
                receive
                after infinity -> ok
                end
            end),
            receive
                {'DOWN', MRef, process, Pid, Got} -> ?assertEqual(Reason, Got)
            after ?WAIT -> ct:fail({caller_not_killed, Task})
            end
        end,
        [
            {exit, [boom], #{}, boom},
            {fail, ["m"], #{}, {native_error, <<"m">>}},
            {sleep, [60000], #{timeout => 20}, timeout}
        ]
    ),
    %% Success: the proxy exits normal and the caller lives on.
    {Pid, MRef} = spawn_monitor(fun() ->
        T = moat:async(P, echo, [x], #{link => true}),
        Parent ! {self(), T, moat:await(T)},
        receive
            stop -> ok
        end
    end),
    receive
        {Pid, #{pid := Proxy}, x} ->
            wait_until(fun() -> not is_process_alive(Proxy) end, proxy_exited),
            ?assert(is_process_alive(Pid)),
            Pid ! stop
    after ?WAIT -> ct:fail(no_answer)
    end,
    receive
        {'DOWN', MRef, process, Pid, normal} -> ok
    after ?WAIT -> ct:fail(caller_did_not_stop)
    end,
    sweep().

caller_death_cancels_task(Config) ->
    %% When a caller dies, linked or not, killed or not, its running and queued tasks are cancelled.
    P = ?config(pool, Config),
    Parent = self(),
    lists:foreach(
        fun({Link, How}) ->
            C0 = stat(P, cancelled),
            {Pid, MRef} = spawn_monitor(fun() ->
                _ = [moat:async(P, sleep, [60000], #{link => Link}) || _ <- lists:seq(1, 4)],
                Parent ! {started, self()},
                receive
                    die -> exit(How)
                end
            end),
            receive
                {started, Pid} -> ok
            after ?WAIT -> ct:fail(not_started)
            end,
            wait_until(fun() -> match(#{running => 2, queued => 2}, moat:stats(P)) end, filled),
            case How of
                kill -> exit(Pid, kill);
                _ -> Pid ! die
            end,
            receive
                {'DOWN', MRef, process, Pid, _} -> ok
            end,
            wait_until(
                fun() -> match(#{running => 0, queued => 0}, moat:stats(P)) end,
                {cancelled_on_death, Link, How}
            ),
            ?assertEqual(C0 + 4, stat(P, cancelled))
        end,
        [{Link, How} || Link <- [false, true], How <- [kill, normal, crash]]
    ),
    sweep().

linked_refusal_is_exit(Config) ->
    %% A refused linked task reaches its trapping caller as a DOWN and an exit signal.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    lists:foreach(
        fun({Pool, Task, Reason}) ->
            #{ref := Ref, pid := Pid, id := Id} = moat:async(Pool, Task, [x], #{link => true}),
            receive
                {'DOWN', Ref, process, Id, Got} -> ?assertEqual(Reason, Got)
            after ?WAIT -> ct:fail({no_down, Reason})
            end,
            receive
                {'EXIT', Pid, GotExit} -> ?assertEqual(Reason, GotExit)
            after ?WAIT -> ct:fail({no_exit, Reason})
            end
        end,
        [{?NO_POOL, echo, noproc}, {P, nope, {unknown_task, nope}}]
    ),
    sweep(),
    process_flag(trap_exit, false),
    %% Not trapping: the refusal kills the caller.
    {Pid, MRef} = spawn_monitor(fun() ->
        _ = moat:async(?NO_POOL, echo, [x], #{link => true}),
        receive
        after infinity -> ok
        end
    end),
    receive
        {'DOWN', MRef, process, Pid, Why} -> ?assertEqual(noproc, Why)
    after ?WAIT -> ct:fail(caller_not_killed)
    end,
    sweep().

overloaded(Config) ->
    %% A pool admits size + max_queue tasks; the next gets overloaded, however it was started.
    _ = Config,
    S = ?SMALL,
    {ok, _} = start_pool(Config, S, #{size => 1, max_queue => 1}),
    A = moat:async(S, sleep, [60000]),
    B = moat:async(S, sleep, [60000]),
    wait_until(fun() -> match(#{running => 1, queued => 1}, moat:stats(S)) end, small_pool_full),
    R0 = stat(S, rejected),
    #{ref := CRef, id := CId} = moat:async(S, echo, [x]),
    receive
        {'DOWN', CRef, process, CId2, Reason} -> ?assertEqual({CId, overloaded}, {CId2, Reason})
    after ?WAIT -> ct:fail(no_overloaded_down)
    end,
    ?assertEqual({exit, overloaded}, moat:run(S, echo, [x])),
    process_flag(trap_exit, true),
    #{ref := LRef, pid := LPid} = moat:async(S, echo, [x], #{link => true}),
    receive
        {'DOWN', LRef, process, _, overloaded} -> ok
    after ?WAIT -> ct:fail(no_linked_overloaded_down)
    end,
    receive
        {'EXIT', LPid, overloaded} -> ok
    after ?WAIT -> ct:fail(no_linked_overloaded_exit)
    end,
    process_flag(trap_exit, false),
    ?assertEqual([{exit, overloaded}, {exit, overloaded}], moat:async_stream(S, echo, [1, 2], #{})),
    ?assertEqual(R0 + 5, stat(S, rejected)),
    %% Room again once the queue drains.
    ?assertEqual(nil, moat:shutdown(A)),
    ?assertEqual(nil, moat:shutdown(B)),
    ?assertEqual({ok, x}, moat:run(S, echo, [x])),
    ok = moat:stop_pool(S),
    %% The bound is exactly size + max_queue.
    {ok, _} = start_pool(Config, S, #{size => 2, max_queue => 3}),
    Five = [moat:async(S, sleep, [60000]) || _ <- lists:seq(1, 5)],
    wait_until(fun() -> match(#{running => 2, queued => 3}, moat:stats(S)) end, five_admitted),
    ?assertEqual({exit, overloaded}, moat:run(S, echo, [x])),
    ?assertEqual(lists:duplicate(5, nil), [moat:shutdown(T, brutal_kill) || T <- Five]),
    ok = moat:stop_pool(S),
    sweep().

%%%===================================================================
%%% Exit reasons (DESIGN.md §3)
%%%===================================================================

design_reasons(Config) ->
    %% Every row of DESIGN.md §3 the NIF backend can produce arrives with the table's reason.
    P = ?config(pool, Config),
    Chosen = {a, "b", <<"c">>, 1.5, #{k => [v]}, -(1 bsl 70)},
    Rows = [
        {{echo, [[1, 2]]}, {ok, [1, 2]}},
        {{exit, [Chosen]}, {exit, Chosen}},
        {{exit, [normal]}, {exit, normal}},
        {{fail, [<<"plain">>]}, {exit, {native_error, <<"plain">>}}},
        {{fail, ["héllo"]}, {exit, {native_error, <<"héllo"/utf8>>}}},
        {{fail, [["a", <<"b">>, ["c", [$d]]]]}, {exit, {native_error, <<"abcd">>}}},
        {{fib, [notanumber]}, {exit, badarg}},
        {{fib, [94]}, {exit, badarg}},
        {{sum, [1]}, {exit, badarg}},
        {{echo, []}, {exit, badarg}},
        {{sleep, [-1]}, {exit, badarg}},
        {{nope, []}, {exit, {unknown_task, nope}}}
    ],
    lists:foreach(
        fun({{Task, Args}, Expect}) ->
            ?assertEqual({Task, Args, Expect}, {Task, Args, moat:run(P, Task, Args)})
        end,
        Rows
    ),
    ?assertEqual({exit, noproc}, moat:run(?NO_POOL, echo, [x])),
    #{ref := TRef} = moat:async(P, sleep, [60000], #{timeout => 10}),
    ?assertEqual(timeout, down_reason(TRef)),
    %% Cancellation by moat: shutdown while running, brutal or not.
    T = moat:async(P, sleep, [60000]),
    wait_running(P, 1),
    ?assertEqual(nil, moat:shutdown(T)),
    ?assertEqual(1, stat(P, cancelled)),
    %% The pool going away: pending tasks go down with shutdown.
    #{ref := SRef} = moat:async(P, sleep, [60000]),
    wait_running(P, 1),
    ok = moat:stop_pool(P),
    ?assertEqual(shutdown, down_reason(SRef)),
    sweep().

stop_pool_sends_shutdown(Config) ->
    %% stop_pool returns once every pending task has had its shutdown DOWN; then the pool is noproc.
    P = ?config(pool, Config),
    Ts = [moat:async(P, sleep, [60000]) || _ <- lists:seq(1, 5)],
    wait_until(fun() -> match(#{running => 2, queued => 3}, moat:stats(P)) end, filled),
    ok = moat:stop_pool(P),
    lists:foreach(
        fun(#{ref := Ref, id := Id}) ->
            receive
                {'DOWN', Ref, process, Id2, Reason} -> ?assertEqual({Id, shutdown}, {Id2, Reason})
            after 0 -> ct:fail({no_down_when_stop_pool_returned, Ref})
            end
        end,
        Ts
    ),
    ?assertEqual({error, not_found}, moat:stats(P)),
    ?assertEqual({exit, noproc}, moat:run(P, echo, [x])),
    ?assertEqual({error, not_found}, moat:stop_pool(P)),
    %% A stream in flight gets shutdown for its running tasks and noproc
    %% for the inputs it submits after the pool is gone.
    {ok, _} = start_pool(Config, P, #{size => 2}),
    Parent = self(),
    {Pid, MRef} = spawn_monitor(fun() ->
        Elems = moat:async_stream(P, sleep, [60000, 60000, 60000], #{timeout => infinity}),
        Parent ! {self(), Elems}
    end),
    wait_running(P, 2),
    ok = moat:stop_pool(P),
    receive
        {Pid, Elems} -> ?assertEqual([{exit, shutdown}, {exit, shutdown}, {exit, noproc}], Elems)
    after ?WAIT -> ct:fail(stream_not_ended)
    end,
    receive
        {'DOWN', MRef, process, Pid, normal} -> ok
    end,
    sweep().

pool_restart_gives_shutdown(Config) ->
    %% A killed pool owner: pending tasks go down with shutdown, and the restarted pool serves.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    Owner = moat_nif:pool_owner(P),
    ?assert(is_pid(Owner)),
    Ts = [moat:async(P, sleep, [60000]) || _ <- lists:seq(1, 3)],
    #{ref := LRef, pid := LPid} = moat:async(P, sleep, [60000], #{link => true}),
    wait_until(fun() -> match(#{running => 2, queued => 2}, moat:stats(P)) end, filled),
    exit(Owner, kill),
    lists:foreach(fun(#{ref := Ref}) -> ?assertEqual(shutdown, down_reason(Ref)) end, Ts),
    ?assertEqual(shutdown, down_reason(LRef)),
    receive
        {'EXIT', LPid, Why} -> ?assertEqual(shutdown, Why)
    after ?WAIT -> ct:fail(no_linked_exit)
    end,
    wait_until(
        fun() ->
            New = moat_nif:pool_owner(P),
            is_pid(New) andalso New =/= Owner
        end,
        pool_restarted
    ),
    ?assertEqual({ok, back}, moat:run(P, echo, [back])),
    ?assertEqual([{ok, 1}, {ok, 2}], moat:async_stream(P, echo, [1, 2], #{})),
    sweep(),
    process_flag(trap_exit, false).

ignored_task_silent_on_stop(Config) ->
    %% A task given up with ignore sends nothing when its pool stops under it.
    P = ?config(pool, Config),
    T = moat:async(P, sleep, [60000]),
    Q = moat:async(P, sleep, [60000], #{timeout => 60000}),
    R = moat:async(P, sleep, [60000]),
    wait_until(fun() -> match(#{running => 2, queued => 1}, moat:stats(P)) end, filled),
    ?assertEqual(nil, moat:ignore(T)),
    ?assertEqual(nil, moat:ignore(R)),
    ok = moat:stop_pool(P),
    ?assertEqual(shutdown, down_reason(maps:get(ref, Q))),
    sweep().

%%%===================================================================
%%% async_stream
%%%===================================================================

async_stream_inputs_round_trip(Config) ->
    %% Every kind of input reaches its task intact, whatever the encoding of
    %% the input list (a list of bytes is encoded as a string).
    P = ?config(pool, Config),
    Bytes = [0, 1, 2, 255],
    Mixed = [
        256, -1, 1 bsl 70, -(1 bsl 70), 1.5, <<"bin">>, <<1:3>>, "str", #{a => [1]},
        self(), make_ref(), fun() -> ok end, fun lists:map/2, {a, [b, {c}]}, [], atom,
        'ünïcode', lists:seq(1, 300)
    ],
    [
        begin
            Out = moat:async_stream(P, echo, In, #{max_concurrency => 3}),
            ?assertEqual([{ok, X} || X <- In], Out)
        end
     || In <- [Bytes, Mixed, Bytes ++ Mixed]
    ],
    sweep().

async_stream_ordered(Config) ->
    %% An ordered async_stream returns one element per input, in input order.
    P = ?config(pool, Config),
    Inputs = [30, 1, 27, 2, 24, 3, 20, 10],
    Expect = [{ok, fib(N)} || N <- Inputs],
    ?assertEqual(Expect, moat:async_stream(P, fib, Inputs, #{})),
    ?assertEqual(
        Expect, moat:async_stream(P, fib, Inputs, [{ordered, true}, {max_concurrency, 8}])
    ),
    Many = lists:seq(1, 1000),
    ?assertEqual([{ok, I} || I <- Many], moat:async_stream(P, echo, Many, #{max_concurrency => 7})),
    ?assertEqual([], moat:async_stream(P, echo, [], #{})),
    sweep().

async_stream_unordered(Config) ->
    %% An unordered async_stream returns the same elements as an ordered one, one per input.
    P = ?config(pool, Config),
    Inputs = [30, 1, 27, 2, 24, 3, 20, 10 | [N rem 25 || N <- lists:seq(1, 200)]],
    Expect = [{ok, fib(N)} || N <- Inputs],
    Got = moat:async_stream(P, fib, Inputs, #{ordered => false, max_concurrency => 4}),
    ?assertEqual(lists:sort(Expect), lists:sort(Got)),
    Got2 = moat:async_stream(P, exit, [a, b, c], [{ordered, false}]),
    ?assertEqual([{exit, a}, {exit, b}, {exit, c}], lists:sort(Got2)),
    sweep().

async_stream_failures_and_refusals(Config) ->
    %% Failed and refused elements are {exit, Reason} values; the stream never raises for them.
    P = ?config(pool, Config),
    ?assertEqual([{ok, 1}, {exit, badarg}, {ok, 2}], moat:async_stream(P, fib, [1, x, 3], #{})),
    ?assertEqual(
        [{exit, {native_error, <<"a">>}}, {exit, {native_error, <<"b">>}}],
        moat:async_stream(P, fail, [<<"a">>, "b"], #{})
    ),
    ?assertEqual([{exit, noproc}, {exit, noproc}], moat:async_stream(?NO_POOL, echo, [1, 2], #{})),
    ?assertEqual([{exit, {unknown_task, nope}}], moat:async_stream(P, nope, [1], #{})),
    ?assertEqual(
        [{exit, shutdown}, {exit, killed}], moat:async_stream(P, exit, [shutdown, killed], #{})
    ),
    sweep().

async_stream_max_concurrency(Config) ->
    %% async_stream keeps at most max_concurrency tasks in the pool (default: the pool's size).
    P = ?config(pool, Config),
    %% Long tasks: the stream sits at its limit and must stay there.
    lists:foreach(
        fun(Max) ->
            {Pid, MRef} = spawn_monitor(fun() ->
                moat:async_stream(P, sleep, lists:duplicate(6, 60000), #{
                    max_concurrency => Max, timeout => infinity
                })
            end),
            wait_until(fun() -> stat(P, running) =:= Max end, {at_limit, Max}),
            timer:sleep(100),
            ?assertMatch(#{queued := 0}, moat:stats(P)),
            ?assertEqual(Max, stat(P, running)),
            %% The stream's owner dying cancels its tasks.
            exit(Pid, kill),
            receive
                {'DOWN', MRef, process, Pid, killed} -> ok
            end,
            wait_idle(P)
        end,
        [1, 2]
    ),
    %% Short tasks: sample the pool while whole streams run.
    lists:foreach(
        fun({Opts, Max}) ->
            Watcher = spawn_link(fun() -> watch(P, 0) end),
            L = moat:async_stream(P, sleep, lists:duplicate(12, 30), Opts),
            ?assertEqual(lists:duplicate(12, {ok, ok}), L),
            Watcher ! {stop, self()},
            Seen =
                receive
                    {watched, Watcher, M} -> M
                after ?WAIT -> ct:fail(no_watcher)
                end,
            ?assertEqual({Opts, Max}, {Opts, Seen})
        end,
        [{#{max_concurrency => 1}, 1}, {#{max_concurrency => 3}, 3}, {#{}, 2}]
    ),
    sweep().

async_stream_kill_task(Config) ->
    %% With on_timeout => kill_task a late task is an {exit, timeout} element; the others succeed.
    P = ?config(pool, Config),
    Opts = #{timeout => 1000, on_timeout => kill_task},
    ?assertEqual(
        [{ok, ok}, {exit, timeout}, {ok, ok}, {exit, timeout}],
        moat:async_stream(P, sleep, [10, 60000, 20, 60000], Opts)
    ),
    ?assertMatch(#{timeouts := 2, running := 0}, moat:stats(P)),
    Got = moat:async_stream(P, sleep, [60000, 10, 20], Opts#{ordered => false}),
    ?assertEqual([{exit, timeout}, {ok, ok}, {ok, ok}], lists:sort(Got)),
    %% A body that ignores cancellation is abandoned: the element is the
    %% same and its late result is discarded.
    ?assertEqual(
        [{exit, timeout}, {ok, ok}],
        moat:async_stream(P, spin, [600000, 1], #{timeout => 100, on_timeout => kill_task})
    ),
    wait_until(fun() -> stat(P, abandoned) =:= 0 end, spin_returned),
    sweep().

async_stream_on_timeout_exit(Config) ->
    %% on_timeout => exit exits even a trapping caller, cancels every task, and leaves nothing.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    Got = catch_exit(fun() ->
        moat:async_stream(P, sleep, [10, 60000, 60000], #{timeout => 300, max_concurrency => 3})
    end),
    ?assertEqual({exit, {timeout, {moat, async_stream, [300]}}}, Got),
    wait_idle(P),
    #{timeouts := Timeouts, cancelled := Cancelled} = moat:stats(P),
    ?assertEqual(2, Timeouts + Cancelled),
    %% The default on_timeout is exit.
    ?assertEqual(
        {exit, {timeout, {moat, async_stream, [100]}}},
        catch_exit(fun() ->
            moat:async_stream(P, sleep, [60000, 60000, 60000], [{timeout, 100}])
        end)
    ),
    wait_idle(P),
    timer:sleep(100),
    sweep(),
    process_flag(trap_exit, false).

async_stream_task_chosen_timeout(Config) ->
    %% A task's own reason timeout is an {exit, timeout} element, not a stream timeout.
    P = ?config(pool, Config),
    ?assertEqual(
        {returned, [{exit, timeout}, {exit, other}]},
        catch_exit(fun() -> moat:async_stream(P, exit, [timeout, other], #{}) end)
    ),
    sweep().

async_stream_zip_input_on_exit(Config) ->
    %% zip_input_on_exit => true makes failed elements {exit, {Input, Reason}}, refusals included.
    P = ?config(pool, Config),
    Zip = #{zip_input_on_exit => true},
    ?assertEqual(
        [{ok, 1}, {exit, {x, badarg}}, {ok, 2}], moat:async_stream(P, fib, [1, x, 3], Zip)
    ),
    ?assertEqual([{ok, 1}, {exit, badarg}, {ok, 2}], moat:async_stream(P, fib, [1, x, 3], #{})),
    ?assertEqual(
        [{exit, {60000, timeout}}, {ok, ok}],
        moat:async_stream(P, sleep, [60000, 1], Zip#{timeout => 2000, on_timeout => kill_task})
    ),
    ?assertEqual([{exit, {a, noproc}}], moat:async_stream(?NO_POOL, echo, [a], Zip)),
    ?assertEqual(
        [{exit, {b, b}}, {exit, {a, a}}],
        moat:async_stream(P, exit, [b, a], [{zip_input_on_exit, true}])
    ),
    sweep().

async_stream_badarg(Config) ->
    %% Invalid options or arguments make async_stream and stream raise badarg, and nothing runs.
    P = ?config(pool, Config),
    BadOpts = [
        #{max_concurrency => 0},
        #{max_concurrency => -1},
        #{max_concurrency => 1.0},
        #{max_concurrency => infinity},
        #{ordered => maybe},
        #{timeout => -1},
        #{timeout => foo},
        #{on_timeout => ignore},
        #{zip_input_on_exit => 1},
        #{bogus => 1},
        [{max_concurrency, 0}],
        not_options
    ],
    lists:foreach(
        fun(Opts) ->
            ?assertEqual(
                {Opts, {error, badarg}},
                {Opts, catch_class(fun() -> moat:async_stream(P, echo, [1], Opts) end)}
            ),
            ?assertEqual(
                {Opts, {error, badarg}},
                {Opts,
                    catch_class(fun() ->
                        F = moat:stream(P, echo, [1], Opts),
                        F({cont, []}, fun(E, A) -> {cont, [E | A]} end)
                    end)}
            )
        end,
        BadOpts
    ),
    ?assertEqual(
        {error, badarg}, catch_class(fun() -> moat:async_stream(P, echo, not_a_list, #{}) end)
    ),
    ?assertEqual({error, badarg}, catch_class(fun() -> moat:async_stream("p", echo, [1], #{}) end)),
    ?assertEqual({error, badarg}, catch_class(fun() -> moat:async_stream(P, "echo", [1], #{}) end)),
    ?assertEqual({error, badarg}, catch_class(fun() -> moat:stream(P, echo, not_a_list, #{}) end)),
    ?assertMatch(#{completed := 0, failed := 0, running := 0, queued := 0}, moat:stats(P)),
    sweep().

%%%===================================================================
%%% stream (lazy)
%%%===================================================================

stream_is_lazy_and_done(Config) ->
    %% stream/4 runs nothing until reduced, then gives async_stream's elements, in any process.
    P = ?config(pool, Config),
    F = moat:stream(P, echo, [1, 2, 3], #{}),
    ?assert(is_function(F, 2)),
    timer:sleep(50),
    ?assertMatch(#{completed := 0, running := 0, queued := 0}, moat:stats(P)),
    Collect = fun(E, A) -> {cont, [E | A]} end,
    Expect = [{ok, 1}, {ok, 2}, {ok, 3}],
    {done, L} = F({cont, []}, Collect),
    ?assertEqual(Expect, lists:reverse(L)),
    {done, L2} = F({cont, []}, Collect),
    ?assertEqual(Expect, lists:reverse(L2)),
    Parent = self(),
    {Pid, MRef} = spawn_monitor(fun() -> Parent ! {self(), F({cont, []}, Collect)} end),
    receive
        {Pid, {done, L3}} -> ?assertEqual(Expect, lists:reverse(L3))
    after ?WAIT -> ct:fail(no_answer)
    end,
    receive
        {'DOWN', MRef, process, Pid, normal} -> ok
    end,
    %% Halting before the first element runs nothing.
    C = stat(P, completed),
    ?assertEqual({halted, acc}, F({halt, acc}, Collect)),
    ?assertMatch(#{running := 0, queued := 0}, moat:stats(P)),
    ?assertEqual(C, stat(P, completed)),
    sweep().

stream_halt_cancels(Config) ->
    %% A reducer halting after 3 elements gives {halted, Acc}, cancels the rest, leaves nothing.
    P = ?config(pool, Config),
    F = moat:stream(P, sleep, [1, 1, 1, 60000, 60000, 60000], #{max_concurrency => 6}),
    Take3 = fun
        (E, {2, A}) -> {halt, {3, [E | A]}};
        (E, {N, A}) -> {cont, {N + 1, [E | A]}}
    end,
    ?assertEqual({halted, {3, [{ok, ok}, {ok, ok}, {ok, ok}]}}, F({cont, {0, []}}, Take3)),
    ?assertMatch(#{running := 0, queued := 0, cancelled := 3}, moat:stats(P)),
    timer:sleep(50),
    sweep().

stream_suspend_continues(Config) ->
    %% A suspending reducer gets {suspended, Acc, Cont}; Cont goes on, or halts and cancels.
    P = ?config(pool, Config),
    Susp = fun(E, A) -> {suspend, [E | A]} end,
    F = moat:stream(P, echo, [1, 2, 3], #{}),
    {suspended, A1, C1} = F({cont, []}, Susp),
    ?assertEqual([{ok, 1}], A1),
    {suspended, A2, C2} = C1({cont, A1}),
    ?assertEqual([{ok, 2}, {ok, 1}], A2),
    {suspended, A3, C3} = C2({cont, A2}),
    ?assertEqual([{ok, 3}, {ok, 2}, {ok, 1}], A3),
    ?assertEqual({done, A3}, C3({cont, A3})),
    %% Suspending before the first element runs nothing yet.
    {suspended, first, C0} = F({suspend, first}, Susp),
    {suspended, Z1, Z1Cont} = C0({cont, []}),
    ?assertEqual([{ok, 1}], Z1),
    ?assertEqual({halted, Z1}, Z1Cont({halt, Z1})),
    Cancelled0 = stat(P, cancelled),
    G = moat:stream(P, sleep, [1, 60000, 60000], #{max_concurrency => 3}),
    {suspended, B1, D1} = G({cont, []}, Susp),
    ?assertEqual([{ok, ok}], B1),
    ?assertEqual({halted, B1}, D1({halt, B1})),
    ?assertMatch(#{running := 0, queued := 0}, moat:stats(P)),
    ?assertEqual(Cancelled0 + 2, stat(P, cancelled)),
    sweep().

stream_element_not_held_back(Config) ->
    %% A ready element reaches the reducer while the stream's other tasks still run.
    P = ?config(pool, Config),
    Parent = self(),
    Forever = 3600000,
    lists:foreach(
        fun({Inputs, Opts}) ->
            F = moat:stream(P, sleep, Inputs, Opts#{timeout => infinity}),
            {Pid, MRef} = spawn_monitor(fun() ->
                Parent ! {self(), F({cont, []}, fun(E, A) -> {halt, [E | A]} end)}
            end),
            receive
                {Pid, Got} -> ?assertEqual({Opts, {halted, [{ok, ok}]}}, {Opts, Got})
            after ?WAIT ->
                exit(Pid, kill),
                ct:fail({first_element_held_back, Opts, moat:stats(P)})
            end,
            receive
                {'DOWN', MRef, process, Pid, _} -> ok
            end,
            wait_idle(P)
        end,
        [
            {[1 | lists:duplicate(7, Forever)], #{max_concurrency => 8}},
            {[1 | lists:duplicate(7, Forever)], #{max_concurrency => 8, ordered => false}},
            {[Forever, 1 | lists:duplicate(40, Forever)], #{
                max_concurrency => 64, ordered => false
            }}
        ]
    ),
    sweep().

stream_reducer_crash_cancels(Config) ->
    %% A reducer that raises propagates it, cancels the stream's tasks, and leaves no message.
    P = ?config(pool, Config),
    F = moat:stream(P, sleep, [1, 60000, 60000], #{max_concurrency => 3}),
    Crash = fun(_, _) -> error(oops) end,
    ?assertEqual({error, oops}, catch_class(fun() -> F({cont, []}, Crash) end)),
    ?assertMatch(#{running := 0, queued := 0, cancelled := 2}, moat:stats(P)),
    timer:sleep(50),
    sweep().

stream_on_timeout_exit(Config) ->
    %% A lazy stream past its timeout exits its reducer, cancels its tasks, and leaves nothing.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    F = moat:stream(P, sleep, [60000, 60000], #{timeout => 100}),
    Got = catch_exit(fun() -> F({cont, []}, fun(E, A) -> {cont, [E | A]} end) end),
    ?assertMatch({exit, {timeout, {moat, _, [100]}}}, Got),
    wait_idle(P),
    %% A budget that also covers a new worker process starting (the
    %% C-node's process isolation) on a loaded machine: sleep [1] must
    %% finish well within it, sleep [60000] cannot.
    G = moat:stream(P, sleep, [60000, 1], #{timeout => 2000, on_timeout => kill_task}),
    ?assertEqual(
        {done, [{ok, ok}, {exit, timeout}]},
        G({cont, []}, fun(E, A) -> {cont, [E | A]} end)
    ),
    timer:sleep(50),
    sweep(),
    process_flag(trap_exit, false).

concurrent_streams_leave_nothing(Config) ->
    %% Many processes using streams at once, across a pool restart, get whole results, no strays.
    P = ?config(pool, Config),
    Parent = self(),
    Workers = [
        spawn_monitor(fun() ->
            rand:seed(exsss, {I, 7, 7}),
            Result = stream_rounds(P, erlang:monotonic_time(millisecond) + 600),
            Parent ! {stream_worker, self(), Result}
        end)
     || I <- lists:seq(1, 20)
    ],
    timer:sleep(200),
    kill_pool_owner(P),
    lists:foreach(
        fun({Pid, MRef}) ->
            receive
                {stream_worker, Pid, Result} -> ?assertEqual({Pid, ok}, {Pid, Result})
            after 20000 -> ct:fail({stream_worker_stuck, Pid})
            end,
            receive
                {'DOWN', MRef, process, Pid, normal} -> ok
            end
        end,
        Workers
    ),
    wait_pool_back(P),
    wait_until(fun() -> match(#{running => 0, queued => 0}, moat:stats(P)) end, pool_idle),
    sweep().

%% Random stream rounds until Deadline; then ok if the mailbox stayed
%% empty after every round, else what was found.
stream_rounds(P, Deadline) ->
    case erlang:monotonic_time(millisecond) > Deadline of
        true ->
            ok;
        false ->
            try stream_round(P) of
                ok ->
                    case messages() of
                        {messages, []} -> stream_rounds(P, Deadline);
                        {messages, Ms} -> {stray, Ms}
                    end;
                Bad ->
                    Bad
            catch
                C:E:S -> {C, E, S}
            end
    end.

stream_round(P) ->
    Inputs = [rand:uniform(4) - 1 || _ <- lists:seq(1, rand:uniform(12))],
    Len = length(Inputs),
    Max = rand:uniform(4),
    Halt = rand:uniform(Len + 1),
    Ordered = rand:uniform(2) =:= 1,
    Opts = #{max_concurrency => Max, ordered => Ordered},
    case rand:uniform(4) of
        1 ->
            F = moat:stream(P, sleep, Inputs, Opts),
            Count = fun
                (_, N) when N + 1 >= Halt -> {halt, N + 1};
                (_, N) -> {cont, N + 1}
            end,
            case F({cont, 0}, Count) of
                {halted, N} when N =:= Halt -> ok;
                {done, Len} when Halt > Len -> ok;
                Other -> {halt_round, Other}
            end;
        2 ->
            F = moat:stream(P, sleep, Inputs, Opts),
            suspend_until(F({cont, 0}, fun(_, N) -> {suspend, N + 1} end), Halt, Len);
        3 ->
            L = moat:async_stream(P, sleep, Inputs, Opts#{timeout => 2, on_timeout => kill_task}),
            case length(L) =:= Len of
                true -> ok;
                false -> {kill_task_round, L}
            end;
        4 ->
            try moat:async_stream(P, sleep, Inputs, Opts#{timeout => 3}) of
                L when length(L) =:= Len -> ok;
                L -> {exit_round, L}
            catch
                exit:{timeout, {moat, async_stream, [3]}} -> ok
            end
    end.

suspend_until({suspended, N, C}, Halt, _Len) when N >= Halt ->
    case C({halt, N}) of
        {halted, N} -> ok;
        Other -> {suspend_round, Other}
    end;
suspend_until({suspended, N, C}, Halt, Len) ->
    suspend_until(C({cont, N}), Halt, Len);
suspend_until({done, Len}, _Halt, Len) ->
    ok;
suspend_until(Other, _Halt, _Len) ->
    {suspend_round, Other}.

%%%===================================================================
%%% Exactly one outcome
%%%===================================================================

exactly_one_outcome(Config) ->
    %% Whatever happens around them, kept tasks get exactly one message and given-up ones none.
    P = ?config(pool, Config),
    process_flag(trap_exit, true),
    rand:seed(exsss, {17, 42, 99}),
    Parent = self(),
    Batches = 30,
    PerBatch = 100,
    Owners = [spawn_owner(P, Parent, I) || I <- lists:seq(1, 20)],
    %% Each batch gives up the tasks the previous batch deferred and about
    %% half of its own, so give-ups meet tasks queued, running and done.
    {Tracked, Deferred} = lists:foldl(
        fun(B, {Done, Later0}) ->
            B =:= Batches div 2 andalso kill_pool_owner(P),
            Started = [start_one(P) || _ <- lists:seq(1, PerBatch)],
            {Now, Later} = lists:partition(
                fun
                    ({_, {give_up, _}, _}) -> rand:uniform(2) =:= 1;
                    (_) -> true
                end,
                Started
            ),
            Settled = [settle(E) || E <- Later0 ++ Now],
            %% run/4 waits behind the queue: after the give-ups.
            _ = [check_run(P) || _ <- lists:seq(1, 10)],
            {Settled ++ Done, Later}
        end,
        {[], []},
        lists:seq(1, Batches)
    ),
    Final = [settle(E) || E <- Deferred] ++ Tracked,
    Kept = [maps:get(ref, T) || {T, keep, _} <- Final],
    %% The proxies whose exits are due: those of kept and awaited tasks
    %% (a proxy may exit a moment after its task's message was taken).
    Exiting = [maps:get(pid, T) || {T, Plan, true} <- Final, Plan =:= keep orelse element(1, Plan) =:= awaited],
    wait_pool_back(P),
    Msgs = collect(sets:from_list(Kept ++ Exiting), erlang:monotonic_time(millisecond) + 20000, []),
    ct:log("~b tasks, ~b kept, ~b messages, plans ~p", [
        length(Final),
        length(Kept),
        length(Msgs),
        maps:to_list(
            lists:foldl(
                fun({_, Plan, _}, M) ->
                    maps:update_with(plan_kind(Plan), fun(N) -> N + 1 end, 1, M)
                end,
                #{},
                Final
            )
        )
    ]),
    Refs = sets:from_list([maps:get(ref, T) || {T, _, _} <- Final]),
    Proxies = sets:from_list([maps:get(pid, T) || {T, _, true} <- Final]),
    {Counts, Exits, OwnerReports, Strays} = classify(Msgs, Owners, {Refs, Proxies}),
    ?assertEqual([], Strays),
    lists:foreach(
        fun({T, Plan, Link}) ->
            #{ref := Ref, pid := Pid} = T,
            {WantMsgs, WantExits} =
                case Plan of
                    keep -> {1, 1};
                    {gave_up, _} -> {0, 0};
                    {awaited, _} -> {0, 1}
                end,
            ?assertEqual({Ref, Plan, WantMsgs}, {Ref, Plan, length(maps:get(Ref, Counts, []))}),
            case Link of
                true ->
                    ExitReasons = maps:get(Pid, Exits, []),
                    ?assertEqual({Pid, Plan, WantExits}, {Pid, Plan, length(ExitReasons)}),
                    %% The exit reason is the outcome's: normal for a reply.
                    case {Plan, maps:get(Ref, Counts, []), ExitReasons} of
                        {keep, [{reply, _}], [normal]} -> ok;
                        {keep, [{down, R}], [R]} -> ok;
                        {{awaited, R}, [], [R]} -> ok;
                        {{gave_up, _}, [], []} -> ok;
                        Mismatch -> ct:fail({exit_reason_mismatch, Ref, Mismatch})
                    end;
                false ->
                    ok
            end
        end,
        Final
    ),
    ?assertEqual(length(Owners), length(OwnerReports)),
    lists:foreach(fun(Report) -> ?assertEqual({owner, []}, {owner, Report}) end, OwnerReports),
    %% The tasks of dead owners were cancelled; the pool, the VM and this
    %% process are fine.
    wait_until(fun() -> match(#{running => 0, queued => 0}, moat:stats(P)) end, pool_idle),
    ?assertEqual({ok, alive}, moat:run(P, echo, [alive])),
    ?assert(is_process_alive(whereis(moat_sup))),
    process_flag(trap_exit, false),
    sweep().

plan_kind(keep) -> keep;
plan_kind({Kind, How}) when is_atom(How) -> {Kind, How};
plan_kind({awaited, _}) -> awaited.

%% Starts one task of a random kind; returns {T, keep | {give_up, How}, Linked}.
start_one(P) ->
    Link = rand:uniform(10) =:= 1,
    Opts = #{link => Link},
    Pick = rand:uniform(12),
    {Task, Args, TaskOpts} =
        case Pick of
            1 -> {echo, [rand:uniform(1000)], #{}};
            2 -> {exit, [{r, rand:uniform(1000)}], #{}};
            3 -> {fail, [<<"f">>], #{}};
            4 -> {sleep, [rand:uniform(3) - 1], #{}};
            5 -> {sleep, [rand:uniform(6) - 1], #{timeout => rand:uniform(6) - 1}};
            6 -> {fib, [bad], #{}};
            7 -> {nope, [], #{}};
            8 -> {echo, [x], #{}};
            %% Given up: long enough to be caught queued or running.
            _ -> {sleep, [rand:uniform(10) - 1], #{}}
        end,
    T = moat:async(P, Task, Args, maps:merge(Opts, TaskOpts)),
    Plan =
        case Pick of
            9 -> {give_up, brutal_kill};
            10 -> {give_up, shutdown};
            11 -> {give_up, ignore};
            12 when Link -> {give_up, await};
            12 -> {give_up, await_briefly};
            _ -> keep
        end,
    {T, Plan, Link}.

settle({T, {give_up, How}, Link}) ->
    {T, give_up(T, How), Link};
settle(E) ->
    E.

%% Returns {gave_up, How}, or {awaited, Reason} when await/2 found the
%% outcome already there: that is not giving up, so a linked task's proxy
%% still exits with Reason (normal after a reply), as in Elixir. Tasks
%% given up with await never choose the reason timeout (start_one/1), so
%% an exit with it is await's own timeout.
give_up(T, brutal_kill) ->
    check_give_up_result(moat:shutdown(T, brutal_kill), brutal_kill);
give_up(T, shutdown) ->
    check_give_up_result(moat:shutdown(T, 100), shutdown);
give_up(T, ignore) ->
    check_give_up_result(moat:ignore(T), ignore);
give_up(T, await) ->
    try moat:await(T, 0) of
        _ -> {awaited, normal}
    catch
        exit:{timeout, {moat, await, [T, 0]}} -> {gave_up, await};
        exit:{Reason, {moat, await, [T, 0]}} -> {awaited, Reason}
    end;
give_up(T, await_briefly) ->
    try moat:await(T, 1) of
        _ -> {awaited, normal}
    catch
        exit:{timeout, {moat, await, [T, 1]}} -> {gave_up, await_briefly};
        exit:{Reason, {moat, await, [T, 1]}} -> {awaited, Reason}
    end.

%% run/4 among the tasks: one outcome as its value, none as a message
%% (a message with an unknown ref is a stray in classify/3).
check_run(P) ->
    {Pool, Task, Args, Timeout} =
        case rand:uniform(6) of
            1 -> {P, echo, [r], 1000};
            2 -> {P, exit, [r], 1000};
            3 -> {P, sleep, [rand:uniform(3) - 1], rand:uniform(3) - 1};
            4 -> {P, nope, [], 1000};
            5 -> {?NO_POOL, echo, [r], 1000};
            6 -> {P, sleep, [0], 0}
        end,
    case moat:run(Pool, Task, Args, Timeout) of
        {ok, _} -> ok;
        {exit, _} -> ok;
        Other -> ct:fail({bad_run_result, Other})
    end.

check_give_up_result(nil, How) -> {gave_up, How};
check_give_up_result({ok, _}, How) -> {gave_up, How};
check_give_up_result({exit, _}, How) -> {gave_up, How};
check_give_up_result(Other, How) -> ct:fail({bad_give_up_result, How, Other}).

%% A process owning tasks of its own: it counts its messages per task for
%% the tasks that end by themselves, reports the ones not received exactly
%% once, and dies with long tasks still pending (killed or not).
spawn_owner(P, Parent, I) ->
    {Pid, _MRef} = spawn_monitor(fun() ->
        Short = [moat:async(P, sleep, [rand:uniform(10)]) || _ <- lists:seq(1, 10)] ++
            [moat:async(P, exit, [I]) || _ <- lists:seq(1, 5)],
        _Long = [moat:async(P, sleep, [60000]) || _ <- lists:seq(1, 3)],
        Refs = [maps:get(ref, T) || T <- Short],
        Got = owner_collect(sets:from_list(Refs), #{}, erlang:monotonic_time(millisecond) + 10000),
        Bad = [{Ref, maps:get(Ref, Got, 0)} || Ref <- Refs, maps:get(Ref, Got, 0) =/= 1],
        Parent ! {owner_report, self(), Bad},
        case I rem 3 of
            0 -> exit(kill);
            1 -> exit(crash);
            2 -> ok
        end
    end),
    Pid.

owner_collect(Refs, Got, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    Done = lists:all(fun(Ref) -> maps:is_key(Ref, Got) end, sets:to_list(Refs)),
    Wait =
        case Done of
            true -> 50;
            false -> Left
        end,
    receive
        {Ref, _} when is_reference(Ref) ->
            owner_collect(Refs, maps:update_with(Ref, fun(N) -> N + 1 end, 1, Got), Deadline);
        {'DOWN', Ref, process, _, _} ->
            owner_collect(Refs, maps:update_with(Ref, fun(N) -> N + 1 end, 1, Got), Deadline)
    after Wait -> Got
    end.

kill_pool_owner(P) ->
    Owner = moat_nif:pool_owner(P),
    ?assert(is_pid(Owner)),
    exit(Owner, kill).

wait_pool_back(P) ->
    wait_until(fun() -> is_map(moat:stats(P)) end, pool_restarted).

%% Every message until each kept ref has one and each due proxy has
%% exited, and nothing came for 300 ms after that, or the deadline.
collect(Kept, Deadline, Acc) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        M -> collect(seen(M, Kept), Deadline, [M | Acc])
    after min(Left, 300) ->
        case sets:size(Kept) =:= 0 orelse Left =:= 0 of
            true -> lists:reverse(Acc);
            false -> collect(Kept, Deadline, Acc)
        end
    end.

seen({Ref, _}, Kept) when is_reference(Ref) -> sets:del_element(Ref, Kept);
seen({'DOWN', Ref, process, _, _}, Kept) -> sets:del_element(Ref, Kept);
seen({'EXIT', Pid, _}, Kept) -> sets:del_element(Pid, Kept);
seen(_, Kept) -> Kept.

%% Sorts raw messages into outcomes per task ref, exit reasons per proxy,
%% owners' reports, and anything else (strays: about no task started
%% with async/4 here, e.g. a run/4 outcome sent as well as returned).
classify(Msgs, Owners, {Refs, Proxies}) ->
    lists:foldl(
        fun
            ({owner_report, Pid, Bad} = M, {C, E, R, S}) ->
                case lists:member(Pid, Owners) of
                    true -> {C, E, [Bad | R], S};
                    false -> {C, E, R, [M | S]}
                end;
            ({'DOWN', MRef, process, Pid, Reason} = M, {C, E, R, S}) ->
                case {lists:member(Pid, Owners), sets:is_element(MRef, Refs)} of
                    {true, _} -> {C, E, R, S};
                    {false, true} -> {add(MRef, {down, Reason}, C), E, R, S};
                    {false, false} -> {C, E, R, [M | S]}
                end;
            ({'EXIT', Pid, Reason} = M, {C, E, R, S}) ->
                case sets:is_element(Pid, Proxies) of
                    true -> {C, add(Pid, Reason, E), R, S};
                    false -> {C, E, R, [M | S]}
                end;
            ({Ref, Reply} = M, {C, E, R, S}) when is_reference(Ref) ->
                case sets:is_element(Ref, Refs) of
                    true -> {add(Ref, {reply, Reply}, C), E, R, S};
                    false -> {C, E, R, [M | S]}
                end;
            (M, {C, E, R, S}) ->
                {C, E, R, [M | S]}
        end,
        {#{}, #{}, [], []},
        Msgs
    ).

add(Key, V, Map) ->
    maps:update_with(Key, fun(L) -> [V | L] end, [V], Map).

%%%===================================================================
%%% Helpers
%%%===================================================================

%% Fails the case on any message left in the mailbox.
sweep() ->
    receive
        M -> ct:fail({stray, M})
    after 50 ->
        ?assertEqual({messages, []}, messages()),
        ok
    end.

%% The caller's messages. process_info/2 only shows what the process has
%% already taken in from its signal queue, and a receive with no clause
%% to match (timer:sleep/1) takes nothing in; a receive that scans the
%% mailbox does.
messages() ->
    receive
        {'$moat_task_SUITE', never} -> ok
    after 0 -> ok
    end,
    process_info(self(), messages).

stat(P, Key) ->
    maps:get(Key, moat:stats(P)).

match(Pattern, Map) ->
    maps:with(maps:keys(Pattern), Map) =:= Pattern.

%% Waits until exactly N tasks are on threads and none waits in the queue:
%% moat:async returns once the task is queued, so this means taken.
wait_running(P, N) ->
    wait_until(fun() -> match(#{running => N, queued => 0}, moat:stats(P)) end, {running, N}).

%% Waits until the pool has no task running or queued.
wait_idle(P) ->
    wait_until(fun() -> match(#{running => 0, queued => 0}, moat:stats(P)) end, {idle, P}).

%% Waits until the task's outcome message is in the mailbox, without taking it.
wait_outcome(#{ref := Ref}) ->
    wait_until(
        fun() ->
            {messages, Ms} = messages(),
            lists:any(
                fun
                    ({R, _}) -> R =:= Ref;
                    ({'DOWN', R, process, _, _}) -> R =:= Ref;
                    (_) -> false
                end,
                Ms
            )
        end,
        {outcome, Ref}
    ).

down_reason(Ref) ->
    receive
        {'DOWN', Ref, process, _, Reason} -> Reason;
        {Ref, Reply} -> ct:fail({unexpected_reply, Reply})
    after ?WAIT -> ct:fail(no_down)
    end.

catch_exit(F) ->
    try F() of
        V -> {returned, V}
    catch
        exit:R -> {exit, R}
    end.

catch_class(F) ->
    try F() of
        V -> {returned, V}
    catch
        C:R -> {C, R}
    end.

%% Samples the pool until told to stop, keeping the most tasks it saw
%% admitted (running plus queued).
watch(P, Max) ->
    #{running := R, queued := Q} = moat:stats(P),
    M = max(Max, R + Q),
    receive
        {stop, From} -> From ! {watched, self(), M}
    after 1 -> watch(P, M)
    end.

fib(N) -> fib(N, 0, 1).

fib(0, A, _) -> A;
fib(N, A, B) -> fib(N - 1, B, A + B).
