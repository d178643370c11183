%%% @doc Native servers (DESIGN.md §4, §8; REFERENCE.md §3, rules S1-S7),
%%% in the NIF backend (group nif) and in the C-node, thread isolation,
%%% over the port (cnode_thread) and over distribution (cnode_dist), where
%%% the servers run in the C-node under its native supervisor and every
%%% request is a frame, and process isolation (cnode_process), where they
%%% run in a worker process of their own, relayed by the C-node: the demo
%%% `counter' server reached with moat:call/3,4 and moat:cast/3, the
%%% native supervisor's strategies, restart types,
%%% restart intensity (OTP's algorithm, whole seconds of a monotonic
%%% clock), shutdown, which_children/count_children, escalation to the
%%% pool's OTP supervisor, and callers that keep getting values while
%%% servers crash and restart under them.
%%%
%%% Every pool has its own name (srv_...), and end_per_testcase stops
%%% whatever a case left. No case asserts speed: time bounds are semantic
%%% (a shutdown timeout cuts a 3 s terminate short; a 300 ms terminate is
%%% waited for) and generous. Restart order is seen through the counter's
%%% `start_seq', which grows with every counter start in the library.
-module(moat_server_SUITE).

-behaviour(supervisor).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-import(moat_ct_util, [wait_until/2]).

-export([all/0, groups/0, suite/0]).
-export([init_per_suite/1, end_per_suite/1]).
-export([init_per_group/2, end_per_group/2]).
-export([init_per_testcase/2, end_per_testcase/2]).
-export([
    counter_keeps_state/1,
    crash_restarts_one_for_one/1,
    one_for_all_restarts_all_in_order/1,
    one_for_all_restarting_while_stopping/1,
    rest_for_one_restarts_later_siblings/1,
    restart_types/1,
    siblings_stopped_by_restart/1,
    intensity_exceeded_gives_up/1,
    intensity_window_slides/1,
    intensity_period_plus_one_edge/1,
    escalation_restarts_pool/1,
    escalation_shows_restarting/1,
    escalation_past_otp_intensity_ends_pool/1,
    shutdown_timeout_kills_slow_server/1,
    shutdown_brutal_kill/1,
    shutdown_waits_for_slow_server/1,
    servers_stop_in_reverse_order/1,
    call_timeout_leaves_no_message/1,
    crash_reaches_queued_callers/1,
    crash_outcome_after_server_ended/1,
    caller_death_mid_call/1,
    noproc_for_missing/1,
    bad_arguments_raise_badarg/1,
    failed_to_start_child/1,
    servers_share_threads_with_tasks/1,
    many_callers_during_restarts/1,
    vm_and_caller_alive/1,
    give_up_window_all_restarting/1,
    failed_start_stops_started_in_order/1,
    crashes_are_reported/1,
    task_fault_keeps_servers/1,
    server_fault_gives_up/1,
    servers_worker_killed_by_any_signal/1
]).
%% A logger handler (crashes_are_reported).
-export([log/2]).
%% A test supervisor (escalation_past_otp_intensity_ends_pool).
-export([init/1]).

-define(CRASH, {native_error, <<"crash">>}).

%% How long a case waits for something it knows will happen.
-define(WAIT, 5000).

%%%===================================================================
%%% Common Test callbacks
%%%===================================================================

suite() ->
    [{timetrap, {seconds, 30}}].

all() ->
    [{group, nif}, {group, cnode_thread}, {group, cnode_process}, {group, cnode_dist}].

groups() ->
    [
        {nif, [], cases()},
        {cnode_thread, [], cases() -- nif_only()},
        {cnode_process, [], (cases() -- nif_only()) ++ process_only()},
        {cnode_dist, [], cases() -- nif_only()}
    ].

%% Cases that hold the pool's owner suspended to look at the window
%% between a give-up and the pool's restart. A C-node's answers (replies,
%% which_children) reach their callers through the owner, which relays
%% the C-node's frames: suspended, it would hold those back too, so the
%% window cannot be looked at that way. escalation_restarts_pool samples
%% the same window with the owner running.
nif_only() ->
    [escalation_shows_restarting, give_up_window_all_restarting].

%% Hard faults, which only process isolation survives.
process_only() ->
    [task_fault_keeps_servers, server_fault_gives_up, servers_worker_killed_by_any_signal].

cases() ->
    [
        counter_keeps_state,
        crash_restarts_one_for_one,
        one_for_all_restarts_all_in_order,
        one_for_all_restarting_while_stopping,
        rest_for_one_restarts_later_siblings,
        restart_types,
        siblings_stopped_by_restart,
        intensity_exceeded_gives_up,
        intensity_window_slides,
        intensity_period_plus_one_edge,
        escalation_restarts_pool,
        escalation_shows_restarting,
        escalation_past_otp_intensity_ends_pool,
        shutdown_timeout_kills_slow_server,
        shutdown_brutal_kill,
        shutdown_waits_for_slow_server,
        servers_stop_in_reverse_order,
        call_timeout_leaves_no_message,
        crash_reaches_queued_callers,
        crash_outcome_after_server_ended,
        caller_death_mid_call,
        noproc_for_missing,
        bad_arguments_raise_badarg,
        failed_to_start_child,
        servers_share_threads_with_tasks,
        many_callers_during_restarts,
        give_up_window_all_restarting,
        failed_start_stops_started_in_order,
        crashes_are_reported,
        vm_and_caller_alive
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

%% The group's backend options, for start_pool/2 and child_spec/1 below:
%% kept in the case's process dictionary, so that the cases read the
%% same in every group.
init_per_testcase(_Case, Config) ->
    put(moat_backend, ?config(backend, Config)),
    Config.

%% Stops every pool of this suite still under moat_sup.
end_per_testcase(_Case, _Config) ->
    process_flag(trap_exit, false),
    [
        moat:stop_pool(Name)
     || {{moat, Name}, _, _, _} <- supervisor:which_children(moat_sup), is_suite_pool(Name)
    ],
    ok.

is_suite_pool(Name) ->
    lists:prefix("srv_", atom_to_list(Name)).

%% moat_sup's children for pool P.
pools_named(P) ->
    [C || {{moat, N}, _, _, _} = C <- supervisor:which_children(moat_sup), N =:= P].

%%%===================================================================
%%% State, calls and casts
%%%===================================================================

%% The counter keeps its count across calls and casts; requests from one
%% caller are handled in order (casts before a later call); a bad request
%% is answered and the count is kept; ids are any term; which_children
%% lists the servers in start order.
counter_keeps_state(_Config) ->
    P = srv_state,
    {ok, _} = start_pool(P, #{
        size => 2,
        servers => [spec(a, [0]), spec({b, 1}, [100]), spec(<<"c">>, [-5])]
    }),
    ?assertEqual(
        [{a, running, worker}, {{b, 1}, running, worker}, {<<"c">>, running, worker}],
        moat:which_children(P)
    ),
    ?assertEqual(
        #{specs => 3, active => 3, supervisors => 0, workers => 3}, moat:count_children(P)
    ),
    ?assertEqual({ok, 0}, moat:call(P, a, get)),
    ?assertEqual({ok, 5}, moat:call(P, a, {add, 5})),
    ?assertEqual({ok, 3}, moat:call(P, a, {add, -2}, 1000)),
    ?assertEqual({ok, 3}, moat:call(P, a, get, infinity)),
    [?assertEqual(ok, moat:cast(P, a, {add, 10})) || _ <- lists:seq(1, 10)],
    ?assertEqual({ok, 103}, moat:call(P, a, get)),
    %% Bad requests are answered; the count carries on.
    ?assertEqual({ok, {error, badarg}}, moat:call(P, a, bogus)),
    ?assertEqual({ok, {error, badarg}}, moat:call(P, a, {add, not_a_number})),
    ?assertEqual({ok, {error, badarg}}, moat:call(P, a, {add, 1 bsl 64})),
    ?assertEqual({ok, {error, badarg}}, moat:call(P, a, {sleep, -1})),
    ?assertEqual(ok, moat:cast(P, a, bogus)),
    ?assertEqual(ok, moat:cast(P, a, {add, <<"x">>})),
    ?assertEqual({ok, 103}, moat:call(P, a, get)),
    %% The others kept their own state.
    ?assertEqual({ok, 100}, moat:call(P, {b, 1}, get)),
    ?assertEqual({ok, -4}, moat:call(P, <<"c">>, {add, 1})),
    ?assertEqual(ok, moat:cast(P, {b, 1}, {add, 1})),
    ?assertEqual({ok, 101}, moat:call(P, {b, 1}, {sleep, 1})),
    %% Started in list order.
    [Sa, Sb, Sc] = seqs(P, [a, {b, 1}, <<"c">>]),
    ?assert(Sa < Sb andalso Sb < Sc),
    ?assertEqual(0, maps:get(restarts, moat:stats(P))),
    ok = moat:stop_pool(P),
    sweep().

%% `crash' makes the server fail: the caller gets the reason, the server
%% comes back from its initial state, and under one_for_one its siblings
%% keep theirs and are not restarted.
crash_restarts_one_for_one(_Config) ->
    P = srv_crash,
    {ok, _} = start_pool(P, #{
        size => 2, servers => [spec(a, [0]), spec(b, [10]), spec(c, [20])]
    }),
    Owner = moat_nif:pool_owner(P),
    [{ok, 1}, {ok, 11}, {ok, 21}] = [moat:call(P, Id, {add, 1}) || Id <- [a, b, c]],
    [Sa, Sb, Sc] = seqs(P, [a, b, c]),
    ?assertEqual({exit, ?CRASH}, moat:call(P, b, crash)),
    [Sb2] = wait_restarted(P, [b], [Sb]),
    ?assertEqual({ok, 10}, moat:call(P, b, get)),
    ?assertEqual([{ok, 1}, {ok, 21}], [moat:call(P, Id, get) || Id <- [a, c]]),
    ?assertEqual([Sa, Sc], seqs(P, [a, c])),
    ?assert(Sb2 > Sc),
    ?assertEqual([{a, running, worker}, {b, running, worker}, {c, running, worker}],
        moat:which_children(P)),
    ?assertMatch(#{specs := 3, active := 3}, moat:count_children(P)),
    wait_until(fun() -> maps:get(restarts, moat:stats(P)) =:= 1 end, one_restart),
    %% A reason the server chose restarts it too (permanent).
    {ok, 12} = moat:call(P, b, {add, 2}),
    ?assertEqual({exit, boom}, moat:call(P, b, {stop, boom})),
    ?assertEqual(10, wait_get(P, b)),
    ?assertEqual([{ok, 1}, {ok, 21}], [moat:call(P, Id, get) || Id <- [a, c]]),
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    ok = moat:stop_pool(P),
    sweep().

%% one_for_all: a crash restarts every server, from its initial state, in
%% start order (S5); only the crash counts toward the intensity.
one_for_all_restarts_all_in_order(_Config) ->
    P = srv_all,
    %% Two crashes are two restarts: the siblings stopped and started
    %% again do not count (S4), so max_restarts 2 is not exceeded.
    {ok, _} = start_pool(P, #{
        size => 2,
        strategy => one_for_all,
        max_restarts => 2,
        max_seconds => 60,
        servers => [spec(a, [0]), spec(b, [10]), spec(c, [20])]
    }),
    Owner = moat_nif:pool_owner(P),
    [{ok, 1}, {ok, 11}, {ok, 21}] = [moat:call(P, Id, {add, 1}) || Id <- [a, b, c]],
    Old = seqs(P, [a, b, c]),
    ?assertEqual({exit, ?CRASH}, moat:call(P, b, crash)),
    [Na, Nb, Nc] = wait_restarted(P, [a, b, c], Old),
    ?assertEqual([{ok, 0}, {ok, 10}, {ok, 20}], [moat:call(P, Id, get) || Id <- [a, b, c]]),
    ?assert(Na > lists:max(Old)),
    ?assert(Na < Nb andalso Nb < Nc),
    ?assertEqual(#{specs => 3, active => 3, supervisors => 0, workers => 3},
        moat:count_children(P)),
    %% The first or the last crashing restarts them all as well.
    [{ok, 5}, {ok, 15}] = [moat:call(P, Id, {add, 5}) || Id <- [a, b]],
    ?assertEqual({exit, ?CRASH}, moat:call(P, c, crash)),
    [Ma, Mb, Mc] = wait_restarted(P, [a, b, c], [Na, Nb, Nc]),
    ?assertEqual([{ok, 0}, {ok, 10}, {ok, 20}], [moat:call(P, Id, get) || Id <- [a, b, c]]),
    ?assert(Ma > Nc andalso Ma < Mb andalso Mb < Mc),
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    ok = moat:stop_pool(P),
    sweep().

%% While one_for_all stops the siblings of a crashed server (here one that
%% takes a second to stop), every server shows restarting and calls to any
%% of them are noproc; then all are back, reset.
one_for_all_restarting_while_stopping(_Config) ->
    P = srv_all_slow,
    {ok, _} = start_pool(P, #{
        size => 2,
        strategy => one_for_all,
        servers => [spec(a, [0, 1000]), spec(b, [10]), spec(c, [20])]
    }),
    {ok, 1} = moat:call(P, a, {add, 1}),
    Old = seqs(P, [a, b, c]),
    ?assertEqual({exit, ?CRASH}, moat:call(P, c, crash)),
    Restarting = [{a, restarting, worker}, {b, restarting, worker}, {c, restarting, worker}],
    wait_until(fun() -> moat:which_children(P) =:= Restarting end, all_restarting),
    ?assertEqual({exit, noproc}, moat:call(P, a, get)),
    ?assertEqual({exit, noproc}, moat:call(P, b, get)),
    ?assertEqual(ok, moat:cast(P, b, {add, 1})),
    ?assertMatch(#{specs := 3, workers := 3}, moat:count_children(P)),
    _ = wait_restarted(P, [a, b, c], Old),
    wait_all_running(P, [a, b, c]),
    ?assertEqual([{ok, 0}, {ok, 10}, {ok, 20}], [moat:call(P, Id, get) || Id <- [a, b, c]]),
    ok = moat:stop_pool(P),
    sweep().

%% rest_for_one: a crash restarts that server and those started after it,
%% in start order; those before keep their state.
rest_for_one_restarts_later_siblings(_Config) ->
    P = srv_rest,
    Ids = [a, b, c, d],
    {ok, _} = start_pool(P, #{
        size => 2,
        strategy => rest_for_one,
        max_restarts => 10,
        servers => [spec(a, [0]), spec(b, [10]), spec(c, [20]), spec(d, [30])]
    }),
    [{ok, 1}, {ok, 11}, {ok, 21}, {ok, 31}] = [moat:call(P, Id, {add, 1}) || Id <- Ids],
    [Sa, Sb, Sc, Sd] = seqs(P, Ids),
    ?assertEqual({exit, ?CRASH}, moat:call(P, b, crash)),
    [Sb2, Sc2, Sd2] = wait_restarted(P, [b, c, d], [Sb, Sc, Sd]),
    ?assertEqual([1, 10, 20, 30], [wait_get(P, Id) || Id <- Ids]),
    ?assertEqual([Sa], seqs(P, [a])),
    ?assert(Sb2 > Sd andalso Sb2 < Sc2 andalso Sc2 < Sd2),
    %% The last one crashing restarts only itself.
    {ok, 25} = moat:call(P, c, {add, 5}),
    {ok, 35} = moat:call(P, d, {add, 5}),
    ?assertEqual({exit, ?CRASH}, moat:call(P, d, crash)),
    [Sd3] = wait_restarted(P, [d], [Sd2]),
    ?assertEqual([1, 10, 25, 30], [wait_get(P, Id) || Id <- Ids]),
    ?assertEqual([Sa, Sb2, Sc2], seqs(P, [a, b, c])),
    ?assert(Sd3 > Sd2),
    %% The first one crashing restarts them all, in order.
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    [Sa4, Sb4, Sc4, Sd4] = wait_restarted(P, Ids, [Sa, Sb2, Sc2, Sd3]),
    ?assertEqual([0, 10, 20, 30], [wait_get(P, Id) || Id <- Ids]),
    ?assert(Sa4 > Sd3 andalso Sa4 < Sb4 andalso Sb4 < Sc4 andalso Sc4 < Sd4),
    ?assertMatch(#{specs := 4, active := 4}, moat:count_children(P)),
    ok = moat:stop_pool(P),
    sweep().

%% S3 for each restart type and each kind of end: permanent always
%% restarts; transient restarts unless the reason is normal, shutdown or
%% {shutdown, _} (then it shows undefined and stays down); temporary never
%% restarts and is dropped from which_children. The caller gets the reason.
restart_types(_Config) ->
    P = srv_types,
    Types = [permanent, transient, temporary],
    Ends = [normal, shutdown, shutdown_x, crash, boom],
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 100,
        servers => [spec({T, E}, [7], #{restart => T}) || T <- Types, E <- Ends]
    }),
    ?assertMatch(#{specs := 15, active := 15}, moat:count_children(P)),
    [
        begin
            {ok, 8} = moat:call(P, {T, E}, {add, 1}),
            ?assertEqual({exit, end_reason(E)}, moat:call(P, {T, E}, end_request(E)))
        end
     || T <- Types, E <- Ends
    ],
    Expected =
        [{{permanent, E}, running, worker} || E <- Ends] ++
            [{{transient, E}, undefined, worker} || E <- [normal, shutdown, shutdown_x]] ++
            [{{transient, E}, running, worker} || E <- [crash, boom]],
    wait_until(fun() -> moat:which_children(P) =:= Expected end, {which_children, Expected}),
    ?assertEqual(#{specs => 10, active => 7, supervisors => 0, workers => 10},
        moat:count_children(P)),
    %% Restarted ones start again from their initial state.
    [?assertEqual(7, wait_get(P, Id)) || {Id, running, _} <- Expected],
    %% Ended ones and dropped ones are noproc; casts to them are dropped.
    Down = [{transient, E} || E <- [normal, shutdown, shutdown_x]] ++
        [{temporary, E} || E <- Ends],
    [?assertEqual({exit, noproc}, moat:call(P, Id, get)) || Id <- Down],
    [?assertEqual(ok, moat:cast(P, Id, {add, 1})) || Id <- Down],
    wait_until(fun() -> maps:get(restarts, moat:stats(P)) =:= 7 end, seven_restarts),
    ok = moat:stop_pool(P),
    sweep().

%% S5: when one_for_all restarts a permanent server, a temporary sibling it
%% stopped is removed, and a transient one it stopped is restarted (it was
%% stopped by its supervisor, so its shutdown reason does not count), even
%% one that had ended normally before.
siblings_stopped_by_restart(_Config) ->
    P = srv_siblings,
    {ok, _} = start_pool(P, #{
        size => 2,
        strategy => one_for_all,
        servers => [
            spec(perm, [0]),
            spec(trans, [10], #{restart => transient}),
            spec(temp, [20], #{restart => temporary})
        ]
    }),
    {ok, 11} = moat:call(P, trans, {add, 1}),
    ?assertEqual({exit, ?CRASH}, moat:call(P, perm, crash)),
    Expected = [{perm, running, worker}, {trans, running, worker}],
    wait_until(fun() -> moat:which_children(P) =:= Expected end, temp_removed),
    ?assertEqual(10, wait_get(P, trans)),
    ?assertEqual({exit, noproc}, moat:call(P, temp, get)),
    ?assertEqual(#{specs => 2, active => 2, supervisors => 0, workers => 2},
        moat:count_children(P)),
    %% A transient server that ended normally stays down, until a sibling's
    %% one_for_all restart starts every child again (as OTP's does).
    ?assertEqual({exit, normal}, moat:call(P, trans, stop)),
    wait_until(
        fun() ->
            moat:which_children(P) =:= [{perm, running, worker}, {trans, undefined, worker}]
        end,
        trans_undefined
    ),
    ?assertEqual({exit, ?CRASH}, moat:call(P, perm, crash)),
    wait_all_running(P, [perm, trans]),
    ?assertEqual(10, wait_get(P, trans)),
    ok = moat:stop_pool(P),
    sweep().

%%%===================================================================
%%% Restart intensity
%%%===================================================================

%% max_restarts 1 in max_seconds 1: ends that are not restarted (a
%% transient's normal, a temporary's crash) do not count; one restart is
%% fine, a second within the same second (or the next) is one too many:
%% the native supervisor gives up, the pool's owner exits, and the OTP
%% supervisor restarts the pool, every server back at its initial state.
intensity_exceeded_gives_up(_Config) ->
    P = srv_intensity,
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 1,
        max_seconds => 1,
        servers => [
            spec(a, [0]),
            spec(b, [100]),
            spec(tr, [0], #{restart => transient}),
            spec(tmp, [0], #{restart => temporary})
        ]
    }),
    Owner = moat_nif:pool_owner(P),
    {ok, 105} = moat:call(P, b, {add, 5}),
    %% Ends that are not restarted do not count.
    ?assertEqual({exit, normal}, moat:call(P, tr, stop)),
    ?assertEqual({exit, ?CRASH}, moat:call(P, tmp, crash)),
    wait_until(
        fun() ->
            moat:which_children(P) =:=
                [{a, running, worker}, {b, running, worker}, {tr, undefined, worker}]
        end,
        ended
    ),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    %% One restart: same pool, b untouched.
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    ?assertEqual({ok, 105}, moat:call(P, b, get)),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    wait_new_owner(P, Owner),
    ?assertEqual(100, wait_get(P, b)),
    ?assertEqual(0, wait_get(P, a)),
    wait_all_running(P, [a, b, tr, tmp]),
    ok = moat:stop_pool(P),
    sweep().

%% A restart leaves the window once it is older than the period in whole
%% seconds (T < Now - Period): a crash 2.1 s after the first restart is
%% the only one in the window and the pool carries on; a third crash right
%% after it makes two in the window, which gives up.
intensity_window_slides(_Config) ->
    P = srv_window,
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 1,
        max_seconds => 1,
        servers => [spec(a, [0]), spec(b, [100])]
    }),
    Owner = moat_nif:pool_owner(P),
    {ok, 105} = moat:call(P, b, {add, 5}),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    %% The restart was stamped before now: once 2.1 s have passed, it is
    %% at least two whole seconds older than the next one.
    timer:sleep(2100),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    ?assertEqual({ok, 105}, moat:call(P, b, get)),
    %% The window still counts: two restarts in it now.
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    wait_new_owner(P, Owner),
    ?assertEqual(100, wait_get(P, b)),
    ok = moat:stop_pool(P),
    sweep().

%% The period + 1 s edge of OTP's algorithm: restarts are stamped in whole
%% seconds and one at T is kept while T >= Now - Period, so with
%% max_seconds 1 a restart early in second S and a crash late in second
%% S + 1 (more than one second apart) still count together and give up.
%% The native supervisor reads CLOCK_MONOTONIC (uv_hrtime); so does this
%% case, through the VM's OS monotonic time source.
intensity_period_plus_one_edge(_Config) ->
    case lists:keyfind(clock_id, 1, erlang:system_info(os_monotonic_time_source)) of
        {clock_id, 'CLOCK_MONOTONIC'} -> period_plus_one_edge();
        Other -> {skip, {os_monotonic_clock, Other}}
    end.

period_plus_one_edge() ->
    P = srv_edge,
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 1,
        max_seconds => 1,
        servers => [spec(a, [0]), spec(b, [100])]
    }),
    Owner = moat_nif:pool_owner(P),
    {ok, 105} = moat:call(P, b, {add, 5}),
    S = wait_early_in_second(),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    Restarted = native_ms(),
    %% The first restart is stamped S (it was done by now).
    ?assertEqual({second, S}, {second, Restarted div 1000}),
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    wait_native_ms((S + 1) * 1000 + 500),
    Crash = native_ms(),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    After = native_ms(),
    ct:pal("restart 1 done at ~p ms, crash 2 at ~p..~p ms (native monotonic)", [
        Restarted, Crash, After
    ]),
    %% More than the period apart, yet both in the window: gives up.
    ?assert(Crash - Restarted > 1000),
    ?assertEqual({second, S + 1}, {second, After div 1000}),
    wait_new_owner(P, Owner),
    ?assertEqual(100, wait_get(P, b)),
    ok = moat:stop_pool(P),
    sweep().

%%%===================================================================
%%% Escalation to the OTP supervisor
%%%===================================================================

%% The native supervisor gives up: the owner exits, the pool's OTP
%% supervisor starts a new one, the servers come back at their initial
%% state. Meanwhile which_children never shows anything but the documented
%% states (sampled; what it saw is printed).
escalation_restarts_pool(_Config) ->
    P = srv_escalate,
    {ok, PoolSup} = start_pool(P, #{
        size => 2,
        max_restarts => 1,
        max_seconds => 5,
        servers => [spec(a, [0]), spec(b, [10])]
    }),
    Owner = moat_nif:pool_owner(P),
    OwnerRef = monitor(process, Owner),
    {ok, 15} = moat:call(P, b, {add, 5}),
    Old = seqs(P, [a, b]),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    Self = self(),
    Sampler = spawn_link(fun() ->
        Self ! {sampling, self()},
        sample(Self, P, Owner, [])
    end),
    receive
        {sampling, Sampler} -> ok
    end,
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    receive
        {'DOWN', OwnerRef, process, Owner, Reason} -> ?assertEqual(shutdown, Reason)
    after ?WAIT -> ct:fail(owner_did_not_exit)
    end,
    Samples =
        receive
            {samples, Sampler, L} -> L
        after ?WAIT -> ct:fail(sampler_stuck)
        end,
    ct:pal("which_children from the give-up to the new pool:~n~p", [Samples]),
    Running = [{a, running, worker}, {b, running, worker}],
    Restarting = [{a, restarting, worker}, {b, restarting, worker}],
    Allowed = fun
        ({old, W}) when W =:= Running; W =:= Restarting -> true;
        ({none, {error, not_found}}) -> true;
        %% The new pool, before and after its servers started.
        ({new, []}) -> true;
        ({new, W}) -> W =:= Running;
        (_) -> false
    end,
    ?assertEqual([], [S || S <- Samples, not Allowed(S)]),
    New = moat_nif:pool_owner(P),
    ?assert(is_pid(New) andalso New =/= Owner),
    ?assertNot(is_process_alive(Owner)),
    ?assertEqual([0, 10], [wait_get(P, Id) || Id <- [a, b]]),
    %% Started in order. (Each pool loads its own copy of the library, so
    %% start_seq counts afresh in the new pool.)
    [Na, Nb] = seqs(P, [a, b]),
    ct:pal("start_seq before ~p, after ~p", [Old, [Na, Nb]]),
    ?assert(Na < Nb),
    ?assertEqual(Running, moat:which_children(P)),
    %% The same pool supervisor restarted the owner.
    ?assert(is_process_alive(PoolSup)),
    ?assertMatch([{owner, New, worker, _}], supervisor:which_children(PoolSup)),
    ok = moat:stop_pool(P),
    sweep().

%% Records which_children (tagged old/new/none by owner) until the new
%% pool shows its servers running.
sample(Parent, P, Old, Acc) ->
    Owner = moat_nif:pool_owner(P),
    W = moat:which_children(P),
    case moat_nif:pool_owner(P) of
        Owner ->
            Tag =
                if
                    Owner =:= Old -> old;
                    is_pid(Owner) -> new;
                    true -> none
                end,
            Acc1 =
                case Acc of
                    [{Tag, W} | _] -> Acc;
                    _ -> [{Tag, W} | Acc]
                end,
            case Tag =:= new andalso W =:= [{a, running, worker}, {b, running, worker}] of
                true -> Parent ! {samples, self(), lists:reverse(Acc1)};
                false -> sample(Parent, P, Old, Acc1)
            end;
        _ ->
            %% The owner changed meanwhile: whose list was that?
            sample(Parent, P, Old, Acc)
    end.

%% With the owner slow to react (suspended here), the window between the
%% give-up and the pool's restart is long enough to look at: every server
%% shows restarting, none is active, calls are noproc and casts ok. Once
%% the owner runs again the pool restarts.
escalation_shows_restarting(_Config) ->
    P = srv_window_open,
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 1,
        max_seconds => 5,
        servers => [spec(a, [0]), spec(b, [10])]
    }),
    Owner = moat_nif:pool_owner(P),
    {ok, 15} = moat:call(P, b, {add, 5}),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    true = erlang:suspend_process(Owner),
    try
        ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
        Restarting = [{a, restarting, worker}, {b, restarting, worker}],
        wait_until(fun() -> moat:which_children(P) =:= Restarting end, all_restarting),
        ?assertEqual(#{specs => 2, active => 0, supervisors => 0, workers => 2},
            moat:count_children(P)),
        ?assertEqual({exit, noproc}, moat:call(P, a, get)),
        ?assertEqual({exit, noproc}, moat:call(P, b, get)),
        ?assertEqual(ok, moat:cast(P, b, {add, 1})),
        ?assertEqual(Owner, moat_nif:pool_owner(P))
    after
        erlang:resume_process(Owner)
    end,
    wait_new_owner(P, Owner),
    ?assertEqual([0, 10], [wait_get(P, Id) || Id <- [a, b]]),
    ok = moat:stop_pool(P),
    sweep().

%% When the OTP supervisor of the pool exceeds its own intensity too, it
%% exits and the tree above decides; here (intensity 0 above) the tree
%% ends and the pool is gone: stats and which_children say not_found,
%% calls noproc. With max_restarts 1 it takes two give-ups; with 0 the
%% first crash does it.
escalation_past_otp_intensity_ends_pool(_Config) ->
    process_flag(trap_exit, true),
    pool_tree_ends(srv_tree1, 1),
    pool_tree_ends(srv_tree0, 0),
    sweep().

pool_tree_ends(P, MaxRestarts) ->
    {ok, Sup} = supervisor:start_link(
        ?MODULE,
        {sup, #{strategy => one_for_one, intensity => 0, period => 5}, [
            child_spec(#{
                name => P,
                size => 2,
                max_restarts => MaxRestarts,
                max_seconds => 60,
                servers => [spec(a, [0]), spec(b, [10])]
            })
        ]}
    ),
    [{{moat, P}, PoolSup, supervisor, _}] = supervisor:which_children(Sup),
    Owner1 = moat_nif:pool_owner(P),
    Owner2 =
        case MaxRestarts of
            1 ->
                %% Two crashes: the native supervisor gives up, the pool's
                %% supervisor restarts the owner (1 of 1).
                give_up(P, 2),
                wait_new_owner(P, Owner1),
                ?assertEqual(0, wait_get(P, a)),
                ?assert(is_process_alive(PoolSup)),
                moat_nif:pool_owner(P);
            0 ->
                Owner1
        end,
    give_up(P, MaxRestarts + 1),
    receive
        {'EXIT', Sup, Reason} -> ?assertEqual(shutdown, Reason)
    after ?WAIT -> ct:fail({no_escalation, P})
    end,
    ?assertNot(is_process_alive(PoolSup)),
    ?assertNot(is_process_alive(Owner2)),
    wait_until(fun() -> moat:stats(P) =:= {error, not_found} end, {pool_gone, P}),
    ?assertEqual({error, not_found}, moat:which_children(P)),
    ?assertEqual({error, not_found}, moat:count_children(P)),
    ?assertEqual({exit, noproc}, moat:call(P, b, get)),
    ?assertEqual(ok, moat:cast(P, b, {add, 1})),
    ?assertEqual(undefined, moat_nif:pool_owner(P)).

%% Crashes server a N times, waiting for each restart but the last.
give_up(P, 1) ->
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash));
give_up(P, N) ->
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    give_up(P, N - 1).

%%%===================================================================
%%% Shutdown
%%%===================================================================

%% A server slow to terminate (3 s) with shutdown 100 is killed after the
%% timeout: stop_pool returns well before its terminate would have ended,
%% and a call it was busy with gets an exit value.
shutdown_timeout_kills_slow_server(_Config) ->
    P = srv_shut_timeout,
    {ok, _} = start_pool(P, #{
        size => 2, servers => [spec(a, [0, 3000], #{shutdown => 100})]
    }),
    Self = self(),
    {Caller, Ref} = spawn_monitor(fun() ->
        Self ! {result, self(), moat:call(P, a, {sleep, 20000}, infinity)}
    end),
    wait_calling(Caller),
    T0 = erlang:monotonic_time(millisecond),
    ok = moat:stop_pool(P),
    Took = erlang:monotonic_time(millisecond) - T0,
    ct:pal("stop_pool took ~p ms", [Took]),
    ?assert(Took < 2500),
    receive
        {result, Caller, {exit, R}} -> ?assert(lists:member(R, [killed, shutdown]))
    after ?WAIT -> ct:fail(call_not_ended)
    end,
    receive
        {'DOWN', Ref, process, Caller, normal} -> ok
    after ?WAIT -> ct:fail(caller_did_not_end)
    end,
    ?assertEqual({exit, noproc}, moat:call(P, a, get)),
    sweep().

%% brutal_kill does not wait for a slow terminate either; the pool's
%% other (fast) server is stopped normally, and the name is free again.
shutdown_brutal_kill(_Config) ->
    P = srv_shut_brutal,
    {ok, _} = start_pool(P, #{
        size => 2,
        servers => [spec(a, [0]), spec(b, [0, 3000], #{shutdown => brutal_kill})]
    }),
    {ok, 1} = moat:call(P, b, {add, 1}),
    T0 = erlang:monotonic_time(millisecond),
    ok = moat:stop_pool(P),
    Took = erlang:monotonic_time(millisecond) - T0,
    ct:pal("stop_pool took ~p ms", [Took]),
    ?assert(Took < 2500),
    ?assertEqual({error, not_found}, moat:which_children(P)),
    {ok, _} = start_pool(P, #{size => 1, servers => [spec(b, [5])]}),
    ?assertEqual({ok, 5}, moat:call(P, b, get)),
    ok = moat:stop_pool(P),
    sweep().

%% With a shutdown longer than the terminate (5000 and infinity), stop_pool
%% waits for it: at least 300 ms for one server slow by 300 ms, at least
%% 600 ms for two (they stop one at a time, S6).
shutdown_waits_for_slow_server(_Config) ->
    Cases = [
        {srv_shut_wait1, [spec(a, [0, 300])], 300},
        {srv_shut_wait2, [spec(a, [0, 300], #{shutdown => infinity})], 300},
        {srv_shut_wait3, [spec(a, [0, 300]), spec(b, [0]), spec(c, [0, 300])], 600}
    ],
    [
        begin
            {ok, _} = start_pool(P, #{size => 2, servers => Servers}),
            T0 = erlang:monotonic_time(millisecond),
            ok = moat:stop_pool(P),
            Took = erlang:monotonic_time(millisecond) - T0,
            ct:pal("~p: stop_pool took ~p ms (at least ~p)", [P, Took, Min]),
            %% 5 ms for the clocks' rounding.
            ?assert(Took >= Min - 5),
            ?assertEqual({error, not_found}, moat:count_children(P))
        end
     || {P, Servers, Min} <- Cases
    ],
    sweep().

%% Servers stop one at a time, last started first (S5, S6), seen through a
%% brutal_kill server busy with a 300 ms call: stopped after a sibling
%% that takes a second to stop, it finishes the call first; stopped first,
%% the kill cuts the call short. The same order holds for stop_pool and for
%% the siblings a one_for_all restart stops.
servers_stop_in_reverse_order(_Config) ->
    Brutal = fun(Id) -> spec(Id, [0], #{shutdown => brutal_kill}) end,
    Slow = fun(Id) -> spec(Id, [0, 1000]) end,
    Stop = fun(P) -> ok = moat:stop_pool(P) end,
    %% stop_pool: `a' is started first, so stopped last.
    ?assertEqual({ok, 0}, call_while_stopping(srv_order1, [Brutal(a), Slow(b)], #{}, Stop)),
    %% The other way round it is stopped first.
    ?assertEqual({exit, killed},
        call_while_stopping(srv_order2, [Slow(b), Brutal(a)], #{}, Stop)),
    %% one_for_all: c crashes, then b (slow) and a (brutal) are stopped.
    Crash = fun(P) ->
        [Sc] = seqs(P, [c]),
        ?assertEqual({exit, ?CRASH}, moat:call(P, c, crash)),
        %% c starts again last: the restart is over then.
        _ = wait_restarted(P, [c], [Sc]),
        ok = moat:stop_pool(P)
    end,
    ?assertEqual({ok, 0}, call_while_stopping(srv_order3, [Brutal(a), Slow(b), spec(c, [0])],
        #{strategy => one_for_all}, Crash)),
    sweep().

%% Starts a pool, has another process call server a with {sleep, 300},
%% runs Stop once the request is in a's mailbox, and returns the call's
%% result.
call_while_stopping(P, Servers, Opts, Stop) ->
    {ok, _} = start_pool(P, Opts#{size => 2, servers => Servers}),
    Self = self(),
    {Pid, Ref} = spawn_monitor(fun() ->
        Self ! {result, self(), moat:call(P, a, {sleep, 300}, infinity)}
    end),
    wait_calling(Pid),
    Stop(P),
    receive
        {'DOWN', Ref, process, Pid, normal} -> ok
    after ?WAIT -> ct:fail(caller_stuck)
    end,
    receive
        {result, Pid, R} -> R
    after 0 -> ct:fail(no_result)
    end.

%%%===================================================================
%%% Calls: timeouts, crashes, callers
%%%===================================================================

%% Past its timeout a call is {exit, timeout} and its late reply never
%% arrives; the server still handles it and serves later calls.
call_timeout_leaves_no_message(_Config) ->
    P = srv_timeout,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0])]}),
    ?assertEqual({exit, timeout}, moat:call(P, a, {sleep, 1000}, 50)),
    %% Behind the sleeping request: a timeout too, even of 0.
    ?assertEqual({exit, timeout}, moat:call(P, a, {add, 1}, 20)),
    ?assertEqual({exit, timeout}, moat:call(P, a, get, 0)),
    timer:sleep(1100),
    sweep(),
    %% The timed-out add was still handled, in order.
    ?assertEqual({ok, 1}, moat:call(P, a, get)),
    ?assertEqual({ok, 1}, moat:call(P, a, {sleep, 10}, infinity)),
    %% Replies racing their timeouts: each call returns one value, and no
    %% late reply follows any of them.
    Outcomes = [
        moat:call(P, a, Req, T)
     || _ <- lists:seq(1, 300), {Req, T} <- [{{sleep, 1}, 1}, {get, 0}, {{add, 1}, 0}]
    ],
    Kinds = lists:usort([K || {K, _} <- Outcomes]),
    ct:pal("outcomes: ~p ok, ~p timeout", [
        length([ok || {ok, _} <- Outcomes]), length([x || {exit, timeout} <- Outcomes])
    ]),
    ?assertEqual([], Kinds -- [ok, exit]),
    ?assertEqual([], [O || {exit, R} = O <- Outcomes, R =/= timeout]),
    timer:sleep(100),
    sweep(),
    ?assertEqual({ok, 301}, moat:call(P, a, get)),
    ok = moat:stop_pool(P),
    sweep().

%% Requests queued behind a crash get the server's exit reason (it ended
%% before replying), and later calls reach the restarted server.
crash_reaches_queued_callers(_Config) ->
    P = srv_queued,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0])]}),
    Self = self(),
    %% Each request is in the server's mailbox (its caller waits in
    %% moat:call/4) before the next is sent; the first keeps the server
    %% busy meanwhile.
    Call = fun(Tag, Req) ->
        {Pid, _} = spawn_monitor(fun() -> Self ! {Tag, moat:call(P, a, Req, ?WAIT)} end),
        wait_calling(Pid)
    end,
    Call(sleeper, {sleep, 2000}),
    Call(crasher, crash),
    Call(getter, get),
    Call(adder, {add, 1}),
    Results = [
        receive
            {Tag, R} -> {Tag, R}
        after ?WAIT -> ct:fail({no_result, Tag})
        end
     || Tag <- [sleeper, crasher, getter, adder]
    ],
    ?assertEqual(
        [
            {sleeper, {ok, 0}},
            {crasher, {exit, ?CRASH}},
            {getter, {exit, ?CRASH}},
            {adder, {exit, ?CRASH}}
        ],
        Results
    ),
    [
        receive
            {'DOWN', _, process, _, R} -> ?assertEqual(normal, R)
        after ?WAIT -> ct:fail(caller_did_not_end)
        end
     || _ <- lists:seq(1, 4)
    ],
    ?assertEqual(0, wait_get(P, a)),
    ok = moat:stop_pool(P),
    sweep().

%% A caller learns of a crash from the server's end, as a gen_server's
%% caller does from its DOWN: the crash outcome comes once the server has
%% run its terminate (1 s here) and is gone, so a call made after it is
%% noproc or reaches the restarted server, never the ending one.
crash_outcome_after_server_ended(_Config) ->
    P = srv_crash_outcome,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0, 1000])]}),
    {ok, 1} = moat:call(P, a, {add, 1}),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    Next = moat:call(P, a, get),
    ct:pal("the call after the crash outcome: ~p", [Next]),
    ?assert(lists:member(Next, [{ok, 0}, {exit, noproc}])),
    ?assertEqual(0, wait_get(P, a)),
    ok = moat:stop_pool(P),
    sweep().

%% A caller that dies in the middle of a call leaves the server serving.
caller_death_mid_call(_Config) ->
    P = srv_caller_death,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0])]}),
    {Pid, Ref} = spawn_monitor(fun() -> moat:call(P, a, {sleep, 300}, infinity) end),
    wait_calling(Pid),
    exit(Pid, kill),
    receive
        {'DOWN', Ref, process, Pid, killed} -> ok
    end,
    ?assertEqual({ok, 1}, moat:call(P, a, {add, 1})),
    ?assertEqual([{a, running, worker}], moat:which_children(P)),
    ?assertEqual(0, maps:get(restarts, moat:stats(P))),
    ok = moat:stop_pool(P),
    sweep().

%% No pool, no such id, a stopped pool: calls are {exit, noproc}, casts ok,
%% which_children and count_children {error, not_found}. A pool without
%% servers has none to list.
noproc_for_missing(_Config) ->
    P = srv_missing,
    Gone = srv_no_such_pool,
    ?assertEqual({exit, noproc}, moat:call(Gone, a, get)),
    ?assertEqual({exit, noproc}, moat:call(Gone, a, get, 0)),
    ?assertEqual({exit, noproc}, moat:call(Gone, a, get, infinity)),
    ?assertEqual(ok, moat:cast(Gone, a, {add, 1})),
    ?assertEqual({error, not_found}, moat:which_children(Gone)),
    ?assertEqual({error, not_found}, moat:count_children(Gone)),
    {ok, _} = start_pool(P, #{size => 1, servers => [spec(a, [0])]}),
    ?assertEqual({exit, noproc}, moat:call(P, b, get)),
    ?assertEqual({exit, noproc}, moat:call(P, "a", get)),
    ?assertEqual({exit, noproc}, moat:call(P, {a}, get)),
    ?assertEqual(ok, moat:cast(P, b, {add, 1})),
    ?assertEqual({ok, 0}, moat:call(P, a, get)),
    ok = moat:stop_pool(P),
    ?assertEqual({exit, noproc}, moat:call(P, a, get)),
    ?assertEqual({error, not_found}, moat:which_children(P)),
    {ok, _} = start_pool(P, #{size => 1}),
    ?assertEqual([], moat:which_children(P)),
    ?assertEqual(#{specs => 0, active => 0, supervisors => 0, workers => 0},
        moat:count_children(P)),
    ?assertEqual({exit, noproc}, moat:call(P, a, get)),
    ok = moat:stop_pool(P),
    sweep().

%% Wrong argument types raise badarg, whether the pool exists or not; bad
%% server specs and strategies raise badarg from start_pool and leave
%% nothing behind.
bad_arguments_raise_badarg(_Config) ->
    P = srv_badarg,
    {ok, _} = start_pool(P, #{size => 1, servers => [spec(a, [0])]}),
    [
        begin
            ?assertError(badarg, moat:call("p", a, get)),
            ?assertError(badarg, moat:call(<<"p">>, a, get, 100)),
            ?assertError(badarg, moat:call(Pool, a, get, -1)),
            ?assertError(badarg, moat:call(Pool, a, get, 1.5)),
            ?assertError(badarg, moat:call(Pool, a, get, forever)),
            ?assertError(badarg, moat:cast(42, a, {add, 1})),
            ?assertError(badarg, moat:which_children("p")),
            ?assertError(badarg, moat:count_children({p}))
        end
     || Pool <- [P, srv_badarg_none]
    ],
    ?assertEqual({ok, 0}, moat:call(P, a, get)),
    ok = moat:stop_pool(P),
    Good = spec(a, [0]),
    BadServers = [
        [Good, spec(a, [1])],
        [Good#{restart => sometimes}],
        [Good#{shutdown => -1}],
        [Good#{shutdown => soon}],
        [Good#{type => supervisor}],
        [Good#{no_such_key => 1}],
        [maps:remove(start, Good)],
        [maps:remove(id, Good)],
        [Good#{start => {moat_demo, counter}}],
        [Good#{start => {moat_demo, "counter", [0]}}],
        [Good#{start => {moat_demo, counter, 0}}],
        [Good#{start => {moat_demo, counter, [0 | 1]}}],
        [Good#{start => {42, counter, [0]}}],
        [not_a_spec],
        not_a_list
    ],
    [?assertError(badarg, start_pool(P, #{servers => S})) || S <- BadServers],
    ?assertError(badarg, start_pool(P, #{strategy => simple_one_for_one, servers => [Good]})),
    ?assertError(badarg, child_spec(#{name => P, servers => [Good, Good]})),
    ?assertEqual([], pools_named(P)),
    ?assertEqual({error, not_found}, moat:which_children(P)),
    %% The good spec, as a proplist, works.
    {ok, _} = start_pool(P, [{size, 1}, {servers, [maps:to_list(Good)]}]),
    ?assertEqual({ok, 0}, moat:call(P, a, get)),
    ok = moat:stop_pool(P),
    sweep().

%% A server failing its init fails the pool's start with
%% {shutdown, {failed_to_start_child, Id, Reason}} (S2) and leaves no pool
%% behind; the name can be used again.
failed_to_start_child(_Config) ->
    P = srv_failed,
    Fails = [
        {[spec(a, [not_a_number])], a, badarg},
        {[spec(a, [])], a, badarg},
        {[spec(a, [0, -1])], a, badarg},
        {[spec(a, [1, 2, 3])], a, badarg},
        {[spec(a, [0]), spec({b, 2}, [a]), spec(c, [0])], {b, 2}, badarg},
        {[#{id => a, start => {moat_demo, no_such_server, [0]}}], a,
            {unknown_server, no_such_server}},
        {[spec(a, [0]), spec(b, [0, 300]), #{id => "c", start => {moat_demo, nope, []}}], "c",
            {unknown_server, nope}}
    ],
    [
        begin
            ?assertEqual(
                {error, {shutdown, {failed_to_start_child, Id, Reason}}},
                start_pool(P, #{size => 1, servers => Servers})
            ),
            ?assertEqual({error, not_found}, moat:stats(P)),
            ?assertEqual({error, not_found}, moat:which_children(P)),
            ?assertEqual({exit, noproc}, moat:call(P, a, get))
        end
     || {Servers, Id, Reason} <- Fails
    ],
    %% A library that cannot be loaded.
    ?assertMatch(
        {error, {bad_library, _}},
        start_pool(P, #{
            servers => [#{id => a, start => {"/nonexistent/lib.so", counter, [0]}}]
        })
    ),
    ?assertEqual([], pools_named(P)),
    {ok, _} = start_pool(P, #{size => 1, servers => [spec(a, [3])]}),
    ?assertEqual({ok, 3}, moat:call(P, a, get)),
    ok = moat:stop_pool(P),
    sweep().

%% Servers run on the pool's threads, shared with tasks: on a one-thread
%% pool busy with tasks, calls are served and tasks complete.
servers_share_threads_with_tasks(_Config) ->
    P = srv_shared,
    {ok, _} = start_pool(P, #{
        size => 1,
        servers => [#{id => a, start => {{priv, moat, "moat_demo.so"}, counter, [0]}}]
    }),
    Ts = [moat:async(P, sleep, [50]) || _ <- lists:seq(1, 4)],
    ?assertEqual({ok, 1}, moat:call(P, a, {add, 1})),
    Echo = moat:async(P, echo, [hi]),
    ?assertEqual({ok, 1}, moat:call(P, a, {sleep, 20})),
    [?assertEqual(ok, moat:await(T)) || T <- Ts],
    ?assertEqual(hi, moat:await(Echo)),
    ?assertEqual({ok, hi}, moat:run(P, echo, [hi])),
    ?assertEqual({ok, 2}, moat:call(P, a, {add, 1})),
    ok = moat:stop_pool(P),
    sweep().

%% 1,000 processes call and cast while another keeps crashing the server
%% (high intensity, so the pool never gives up). Every call returns a value
%% ({ok, Int} or {exit, Reason} with Reason noproc or the crash), never
%% raises; each caller gets exactly one result per call and no stray
%% message, and ends normally. The test process and the pool are fine
%% afterwards.
many_callers_during_restarts(_Config) ->
    P = srv_many,
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 1000000,
        max_seconds => 1,
        servers => [spec(a, [0])]
    }),
    Owner = moat_nif:pool_owner(P),
    Self = self(),
    Crasher = spawn_link(fun() -> crasher(Self, P, #{}) end),
    %% Let it crash the server a few times first.
    wait_until(fun() -> maps:get(restarts, moat:stats(P)) >= 3 end, restarts),
    N = 1000,
    Callers = maps:from_list([
        spawn_monitor(fun() -> caller(Self, P) end)
     || _ <- lists:seq(1, N)
    ]),
    Results = collect_callers(Callers, #{}),
    Crasher ! {stop, Self},
    Crashes =
        receive
            {crashed, Crasher, Seen} -> Seen
        after ?WAIT -> ct:fail(crasher_stuck)
        end,
    Outcomes = lists:foldl(
        fun(R, Acc) -> maps:update_with(outcome_kind(R), fun(C) -> C + 1 end, 1, Acc) end,
        #{},
        lists:append(maps:values(Results))
    ),
    ct:pal("callers' outcomes: ~p~ncrasher's outcomes: ~p~nstats: ~p", [
        Outcomes, Crashes, moat:stats(P)
    ]),
    ?assertEqual(N, maps:size(Results)),
    [?assertMatch([_, _, _, _, _], Rs) || Rs <- maps:values(Results)],
    Bad = [R || Rs <- maps:values(Results), R <- Rs, not good_outcome(R)],
    ?assertEqual([], Bad),
    ?assert(maps:get(ok, Outcomes, 0) > 0),
    ?assertEqual([], maps:keys(maps:without([{exit, ?CRASH}, {exit, noproc}], Crashes))),
    ?assert(maps:get({exit, ?CRASH}, Crashes, 0) >= 3),
    %% Never gave up: the same pool, serving.
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    ?assert(is_integer(wait_get(P, a))),
    ?assertEqual([{a, running, worker}], moat:which_children(P)),
    ok = moat:stop_pool(P),
    sweep().

crasher(Parent, P, Seen) ->
    receive
        {stop, Parent} -> Parent ! {crashed, self(), Seen}
    after 1 ->
        R = moat:call(P, a, crash, ?WAIT),
        crasher(Parent, P, maps:update_with(R, fun(C) -> C + 1 end, 1, Seen))
    end.

%% Five calls and a cast, then a check that nothing else arrived.
caller(Parent, P) ->
    Calls = [
        fun() -> moat:call(P, a, get) end,
        fun() -> moat:call(P, a, {add, 1}, ?WAIT) end,
        fun() -> moat:call(P, a, {add, 1}, infinity) end,
        fun() -> moat:call(P, a, get, ?WAIT) end,
        fun() -> moat:call(P, a, start_seq) end
    ],
    Results = [guarded(Call) || Call <- Calls],
    Cast = guarded(fun() -> moat:cast(P, a, {add, 1}) end),
    Stray =
        receive
            M -> [M]
        after 100 -> []
        end,
    Parent ! {done, self(), Results, [{cast, Cast} || Cast =/= ok] ++ Stray}.

guarded(F) ->
    try F() of
        V -> V
    catch
        C:R -> {raised, C, R}
    end.

collect_callers(Callers, Results) when map_size(Callers) =:= 0 ->
    Results;
collect_callers(Callers, Results) ->
    receive
        {done, Pid, Calls, Stray} when is_map_key(Pid, Callers) ->
            ?assertEqual({Pid, []}, {Pid, Stray}),
            Ref = maps:get(Pid, Callers),
            receive
                {'DOWN', Ref, process, Pid, Reason} -> ?assertEqual({Pid, normal}, {Pid, Reason})
            after ?WAIT -> ct:fail({caller_did_not_end, Pid})
            end,
            collect_callers(maps:remove(Pid, Callers), Results#{Pid => Calls});
        {'DOWN', _, process, Pid, Reason} when is_map_key(Pid, Callers) ->
            ct:fail({caller_died, Pid, Reason})
    after 20000 ->
        ct:fail({callers_stuck, maps:size(Callers)})
    end.

good_outcome({ok, N}) -> is_integer(N);
good_outcome({exit, noproc}) -> true;
good_outcome({exit, ?CRASH}) -> true;
good_outcome(_) -> false.

outcome_kind({ok, _}) -> ok;
outcome_kind(Other) -> Other.

%% The VM, moat and this process are alive after everything above, and no
%% pool of this suite is left.
vm_and_caller_alive(_Config) ->
    ?assert(is_process_alive(self())),
    ?assert(is_pid(whereis(moat_sup))),
    ?assertEqual(
        [], [N || {{moat, N}, _, _, _} <- supervisor:which_children(moat_sup), is_suite_pool(N)]
    ),
    {ok, _} = start_pool(srv_last, #{size => 1, servers => [spec(a, [1])]}),
    ?assertEqual({ok, 2}, moat:call(srv_last, a, {add, 1})),
    ?assertEqual({ok, 1}, moat:run(srv_last, echo, [1])),
    ok = moat:stop_pool(srv_last),
    sweep().

%%%===================================================================
%%% Giving up and failing to start
%%%===================================================================

%% Contract (moat:which_children/1's doc): from the moment the
%% native supervisor gives up until the pool is restarted, every server
%% shows `restarting'. Here the server after the crashed one takes a second
%% to stop, and the owner is held (suspended) so that the pool stays until
%% it is looked at: both show `restarting' throughout.
give_up_window_all_restarting(_Config) ->
    P = srv_bug_window,
    {ok, _} = start_pool(P, #{
        size => 2,
        max_restarts => 1,
        max_seconds => 5,
        servers => [spec(a, [0]), spec(b, [10, 1000])]
    }),
    Owner = moat_nif:pool_owner(P),
    ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
    ?assertEqual(0, wait_get(P, a)),
    true = erlang:suspend_process(Owner),
    Running = [{a, running, worker}, {b, running, worker}],
    Restarting = [{a, restarting, worker}, {b, restarting, worker}],
    Seen =
        try
            ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
            watch_children(P, Restarting, [])
        after
            erlang:resume_process(Owner)
        end,
    ct:pal("which_children after the give-up: ~p", [Seen]),
    wait_new_owner(P, Owner),
    ?assertEqual([], [S || S <- Seen, S =/= Running, S =/= Restarting]),
    ok = moat:stop_pool(P),
    sweep().

%% The distinct which_children/count_children values until Last is seen.
watch_children(P, Last, Acc) ->
    W = moat:which_children(P),
    S = {W, moat:count_children(P)},
    Acc1 =
        case Acc of
            [{W, _} | _] -> Acc;
            _ -> [S | Acc]
        end,
    case W of
        Last -> [X || {X, _} <- lists:reverse(Acc1)];
        _ when length(Acc1) > 1000 -> ct:fail({never, Last, lists:reverse(Acc1)});
        _ -> timer:sleep(1), watch_children(P, Last, Acc1)
    end.

%% S2/S6: when a server fails to start, those already started are stopped
%% one at a time in reverse order, each within its shutdown, before the
%% start fails. Two servers that take 300 ms to terminate (shutdown 5000)
%% then make start_pool take at least 600 ms, as stop_pool does for them.
failed_start_stops_started_in_order(_Config) ->
    P = srv_bug_failed_start,
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual(
        {error, {shutdown, {failed_to_start_child, c, badarg}}},
        start_pool(P, #{
            size => 2, servers => [spec(a, [0, 300]), spec(b, [0, 300]), spec(c, [bad])]
        })
    ),
    Took = erlang:monotonic_time(millisecond) - T0,
    ct:pal("failed start_pool took ~p ms", [Took]),
    ?assert(Took >= 595),
    sweep().

%% Servers' crashes reach the logger as {moat, child_terminated} reports
%% from the pool's owner (in a C-node pool, from the C-node's crashed
%% frames), at most one a second: of a burst of crashes the first is
%% reported at once and the rest in summaries, every crash counted, each
%% naming the server and its reason.
crashes_are_reported(_Config) ->
    P = srv_reported,
    N = 20,
    {ok, _} = start_pool(P, #{
        size => 2, max_restarts => 1000, max_seconds => 1, servers => [spec(a, [0])]
    }),
    ok = logger:add_handler(?MODULE, ?MODULE, #{config => #{pid => self(), pool => P}}),
    try
        [
            begin
                ?assertEqual({exit, ?CRASH}, moat:call(P, a, crash)),
                ?assertEqual(0, wait_get(P, a))
            end
         || _ <- lists:seq(1, N)
        ],
        Reports = collect_reports(N, []),
        ct:pal("crash reports (ms after the first, crashes): ~p", [Reports]),
        ?assertEqual(N, lists:sum([C || {_, C} <- Reports])),
        Times = [T || {T, _} <- Reports],
        Gaps = [B - A || {A, B} <- lists:zip(lists:droplast(Times), tl(Times))],
        ?assertEqual([], [G || G <- Gaps, G < 500])
    after
        ok = logger:remove_handler(?MODULE)
    end,
    wait_until(fun() -> maps:get(restarts, moat:stats(P)) =:= N end, {restarts, N}),
    ok = moat:stop_pool(P),
    sweep().

%% Reports until N crashes are counted: [{Ms since the first, Crashes}].
collect_reports(N, Acc) ->
    case lists:sum([C || {_, C} <- Acc]) of
        Sum when Sum >= N ->
            [{T0, _} | _] = Rs = lists:reverse(Acc),
            [{T - T0, C} || {T, C} <- Rs];
        _ ->
            receive
                {crash_report, #{child := a, reason := ?CRASH, crashes := C}} ->
                    collect_reports(N, [{erlang:monotonic_time(millisecond), C} | Acc]);
                {crash_report, Other} ->
                    ct:fail({unexpected_report, Other})
            after ?WAIT -> ct:fail({reports, lists:reverse(Acc)})
            end
    end.

%% The logger handler: the pool's crash reports, to the test process.
log(#{msg := {report, #{label := {moat, child_terminated}, pool := Pool} = R}},
    #{config := #{pid := Pid, pool := Pool}}) ->
    Pid ! {crash_report, R},
    ok;
log(_Event, _Config) ->
    ok.

%%%===================================================================
%%% The test supervisor
%%%===================================================================

init({sup, Flags, Children}) ->
    {ok, {Flags, Children}}.

%%%===================================================================
%%% Process isolation: the servers' own worker process
%%%===================================================================

%% A task's hard fault costs its task worker only: the servers, in a
%% worker process of their own, keep their state, a call in flight gets
%% its reply, and neither their supervisor nor the pool restarts anything.
task_fault_keeps_servers(_Config) ->
    P = srv_task_fault,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0]), spec(b, [10])]}),
    Owner = moat_nif:pool_owner(P),
    {ok, 7} = moat:call(P, a, {add, 7}),
    Seqs = seqs(P, [a, b]),
    %% The servers run in one process, neither the VM nor a task worker.
    {ok, Os} = moat:call(P, a, os_pid),
    ?assertEqual({ok, Os}, moat:call(P, b, os_pid)),
    ?assertNotEqual(list_to_integer(os:getpid()), Os),
    {SlowPid, SlowRef} = spawn_monitor(fun() ->
        exit({result, moat:call(P, b, {sleep, 300}, infinity)})
    end),
    wait_calling(SlowPid),
    ?assertEqual({exit, {native_crash, sigsegv}}, moat:run(P, segfault, [])),
    ?assertEqual({exit, {native_crash, sigabrt}}, moat:run(P, abort, [])),
    ?assertEqual({ok, 1}, moat:run(P, echo, [1])),
    receive
        {'DOWN', SlowRef, process, SlowPid, Reason} -> ?assertEqual({result, {ok, 10}}, Reason)
    after ?WAIT -> ct:fail(call_not_answered)
    end,
    ?assertEqual({ok, 7}, moat:call(P, a, get)),
    ?assertEqual(Seqs, seqs(P, [a, b])),
    ?assertEqual({ok, Os}, moat:call(P, a, os_pid)),
    ?assertEqual([{a, running, worker}, {b, running, worker}], moat:which_children(P)),
    ?assertEqual(Owner, moat_nif:pool_owner(P)),
    ?assertEqual(0, maps:get(restarts, moat:stats(P))),
    ok = moat:stop_pool(P),
    sweep().

%% A server's hard fault ends the servers' worker: that call and every
%% other in flight end {native_crash, sigsegv}, which is their native
%% supervisor giving up, so the pool's owner exits and the pool's OTP
%% supervisor starts the pool again, its servers at their initial state.
%% A task in flight meanwhile gets exactly one outcome.
server_fault_gives_up(_Config) ->
    P = srv_server_fault,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0]), spec(b, [10])]}),
    Owner = moat_nif:pool_owner(P),
    OwnerRef = monitor(process, Owner),
    {ok, 15} = moat:call(P, b, {add, 5}),
    {SlowPid, SlowRef} = spawn_monitor(fun() ->
        exit({result, moat:call(P, b, {sleep, 60000}, infinity)})
    end),
    wait_calling(SlowPid),
    Task = moat:async(P, sleep, [100]),
    ?assertEqual({exit, {native_crash, sigsegv}}, moat:call(P, a, segfault)),
    receive
        {'DOWN', SlowRef, process, SlowPid, Reason} ->
            ?assertEqual({result, {exit, {native_crash, sigsegv}}}, Reason)
    after ?WAIT -> ct:fail(call_not_ended)
    end,
    receive
        {'DOWN', OwnerRef, process, Owner, OwnerReason} -> ?assertEqual(shutdown, OwnerReason)
    after ?WAIT -> ct:fail(owner_did_not_exit)
    end,
    TaskOutcome = moat:yield(Task, ?WAIT),
    ct:pal("the task in flight: ~p", [TaskOutcome]),
    ?assertMatch({Kind, _} when Kind =:= ok; Kind =:= exit, TaskOutcome),
    wait_new_owner(P, Owner),
    ?assertEqual(10, wait_get(P, b)),
    ?assertEqual(0, wait_get(P, a)),
    ?assertEqual({ok, 1}, moat:run(P, echo, [1])),
    ok = moat:stop_pool(P),
    sweep().

%% The servers' worker killed from outside by a signal no test raises
%% otherwise, with no call in flight: the VM has no atom `sigxcpu' before
%% the give-up names it, and that report must not be lost for it; the
%% pool restarts, as for a segfault.
servers_worker_killed_by_any_signal(_Config) ->
    P = srv_sigxcpu,
    {ok, _} = start_pool(P, #{size => 2, servers => [spec(a, [0])]}),
    Owner = moat_nif:pool_owner(P),
    OwnerRef = monitor(process, Owner),
    {ok, 3} = moat:call(P, a, {add, 3}),
    {ok, Os} = moat:call(P, a, os_pid),
    _ = os:cmd("kill -XCPU " ++ integer_to_list(Os)),
    receive
        {'DOWN', OwnerRef, process, Owner, OwnerReason} -> ?assertEqual(shutdown, OwnerReason)
    after ?WAIT -> ct:fail(owner_did_not_exit)
    end,
    wait_new_owner(P, Owner),
    ?assertEqual(0, wait_get(P, a)),
    ok = moat:stop_pool(P),
    sweep().

%%%===================================================================
%%% Helpers
%%%===================================================================

%% moat:start_pool/2 and moat:child_spec/1 with the group's backend.
start_pool(P, Opts) ->
    moat:start_pool(P, with_backend(Opts)).

child_spec(Opts) ->
    moat:child_spec(with_backend(Opts)).

with_backend(Opts) when is_list(Opts) ->
    with_backend(maps:from_list(Opts));
with_backend(Opts) ->
    maps:merge(get(moat_backend), Opts).

spec(Id, Args) ->
    spec(Id, Args, #{}).

spec(Id, Args, Extra) ->
    maps:merge(#{id => Id, start => {moat_demo, counter, Args}}, Extra).

end_request(normal) -> stop;
end_request(shutdown) -> {stop, shutdown};
end_request(shutdown_x) -> {stop, {shutdown, x}};
end_request(crash) -> crash;
end_request(boom) -> {stop, boom}.

end_reason(normal) -> normal;
end_reason(shutdown) -> shutdown;
end_reason(shutdown_x) -> {shutdown, x};
end_reason(crash) -> ?CRASH;
end_reason(boom) -> boom.

%% The start_seq of each server.
seqs(P, Ids) ->
    [
        begin
            {ok, S} = moat:call(P, Id, start_seq),
            S
        end
     || Id <- Ids
    ].

%% The server's count once it answers. Right after a server ended, a call
%% may find it restarting (noproc), or reach it before its supervisor has
%% handled its end: those are retried.
wait_get(P, Id) ->
    Deadline = erlang:monotonic_time(millisecond) + ?WAIT,
    wait_get(P, Id, Deadline).

wait_get(P, Id, Deadline) ->
    case moat:call(P, Id, get) of
        {ok, N} ->
            N;
        {exit, _} = Exit ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> ct:fail({not_back, P, Id, Exit});
                false -> timer:sleep(2), wait_get(P, Id, Deadline)
            end
    end.

%% Waits until each server answers from a new instance (a start_seq other
%% than its old one) and returns the new start_seqs. which_children alone
%% cannot tell: it shows a server that just ended as running until its
%% supervisor has handled its end.
wait_restarted(P, Ids, Olds) ->
    Deadline = erlang:monotonic_time(millisecond) + ?WAIT,
    [wait_restarted(P, Id, Old, Deadline) || {Id, Old} <- lists:zip(Ids, Olds)].

wait_restarted(P, Id, Old, Deadline) ->
    case moat:call(P, Id, start_seq) of
        {ok, New} when New =/= Old ->
            New;
        Other ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> ct:fail({not_restarted, P, Id, Other});
                false -> timer:sleep(2), wait_restarted(P, Id, Old, Deadline)
            end
    end.

%% Waits until Pid's request is in the server's mailbox (being handled or
%% queued): Pid waits inside moat for the outcome of its call (call/4 hands
%% the wait to a helper of moat's), or its call is over already.
wait_calling(Pid) ->
    wait_until(
        fun() ->
            case process_info(Pid, [current_function, status]) of
                undefined -> true;
                [{current_function, {moat, _, _}}, {status, S}] -> S =/= running;
                _ -> false
            end
        end,
        {calling, Pid}
    ).

wait_all_running(P, Ids) ->
    Running = [{Id, running, worker} || Id <- Ids],
    wait_until(fun() -> moat:which_children(P) =:= Running end, {all_running, P}).

%% Waits until the pool runs under a new owner process.
wait_new_owner(P, Old) ->
    wait_until(
        fun() ->
            New = moat_nif:pool_owner(P),
            is_pid(New) andalso New =/= Old
        end,
        {new_owner, P}
    ).

%% CLOCK_MONOTONIC in ms (the native supervisor's clock).
native_ms() ->
    {time, T} = lists:keyfind(time, 1, erlang:system_info(os_monotonic_time_source)),
    erlang:convert_time_unit(T, native, millisecond).

%% Waits until the native clock is between 20 and 250 ms into a second;
%% returns that second.
wait_early_in_second() ->
    Now = native_ms(),
    case Now rem 1000 of
        Ms when Ms >= 20, Ms =< 250 ->
            Now div 1000;
        Ms ->
            timer:sleep(1000 - Ms + 30),
            wait_early_in_second()
    end.

wait_native_ms(At) ->
    case At - native_ms() of
        Left when Left > 0 ->
            timer:sleep(Left),
            wait_native_ms(At);
        _ ->
            ok
    end.

%% Fails the case on any message left in the mailbox.
sweep() ->
    receive
        M -> ct:fail({stray, M})
    after 50 ->
        ?assertEqual({messages, []}, messages()),
        ok
    end.

%% The caller's messages. A receive that scans the mailbox takes in what
%% is still in the signal queue; process_info/2 alone would not see it.
messages() ->
    receive
        {'$moat_server_SUITE', never} -> ok
    after 0 -> ok
    end,
    process_info(self(), messages).
