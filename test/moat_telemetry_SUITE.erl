%%% @doc Observability: telemetry events (DESIGN.md §10), emitted in the
%%% caller when it consumes an outcome and by the pool's owner for native
%%% server crashes, and the rate-limited crash reports through logger.
%%% The telemetry library is not installed here (no hex): the suite loads
%%% a stub `telemetry' module that forwards each event to the case, and
%%% restarts moat so that it finds it.
-module(moat_telemetry_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0]).
-export([init_per_suite/1, end_per_suite/1]).
-export([init_per_testcase/2, end_per_testcase/2]).
-export([
    run_reports_stop_and_exception/1,
    one_event_per_consumed_outcome/1,
    stream_elements_are_reported/1,
    server_crashes_are_reported/1,
    without_telemetry_nothing_is_added/1
]).
%% The logger handler that hands reports to the case.
-export([log/2]).

-define(POOL, moat_tel_pool).
-define(SINK, moat_telemetry_sink).
-define(WAIT, 5000).

%% The stub: telemetry:execute/3 sends {telemetry, Event, Measurements,
%% Metadata} to the registered sink, if any.
-define(STUB, "-module(telemetry).\n"
    "-export([execute/3]).\n"
    "execute(Event, Measurements, Metadata) ->\n"
    "    case whereis(moat_telemetry_sink) of\n"
    "        undefined -> ok;\n"
    "        Pid -> Pid ! {telemetry, Event, Measurements, Metadata}, ok\n"
    "    end.\n").

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [
        run_reports_stop_and_exception,
        one_event_per_consumed_outcome,
        stream_elements_are_reported,
        server_crashes_are_reported,
        without_telemetry_nothing_is_added
    ].

init_per_suite(Config) ->
    load_stub(),
    _ = application:stop(moat),
    {ok, _} = application:ensure_all_started(moat),
    true = moat_telemetry:enabled(),
    Config.

end_per_suite(_Config) ->
    _ = application:stop(moat),
    unload_stub(),
    ok = moat_telemetry:init(),
    ok.

init_per_testcase(_Case, Config) ->
    true = register(?SINK, self()),
    Config.

end_per_testcase(_Case, _Config) ->
    catch unregister(?SINK),
    _ = moat:stop_pool(?POOL),
    _ = logger:remove_handler(moat_tel_capture),
    flush(),
    ok.

%%%===================================================================
%%% Cases
%%%===================================================================

run_reports_stop_and_exception(_Config) ->
    %% run/3: [moat, task, stop] for a result, [moat, task, exception] for
    %% an exit, each with the duration from the submit.
    {ok, _} = moat:start_pool(?POOL, #{size => 2}),
    {ok, hi} = moat:run(?POOL, echo, [hi]),
    {[moat, task, stop], M, Meta} = event(),
    ?assertEqual(#{pool => ?POOL, task => echo}, Meta),
    #{duration := D, monotonic_time := _} = M,
    ?assert(is_integer(D) andalso D >= 0),
    {exit, {native_error, <<"x">>}} = moat:run(?POOL, fail, ["x"]),
    {[moat, task, exception], _, Meta2} = event(),
    ?assertEqual(
        #{pool => ?POOL, task => fail, kind => exit, reason => {native_error, <<"x">>}}, Meta2
    ),
    %% A refusal is an outcome too.
    {exit, noproc} = moat:run(nonexistent_pool, echo, [x]),
    {[moat, task, exception], _, #{reason := noproc}} = event(),
    no_event().

one_event_per_consumed_outcome(_Config) ->
    %% async's outcome is reported where it is consumed, once: await,
    %% yield, yield_many, shutdown of a finished task. A yield that finds
    %% nothing, and a task given up, report nothing.
    {ok, _} = moat:start_pool(?POOL, #{size => 2}),
    ?assertEqual(a, moat:await(moat:async(?POOL, echo, [a]))),
    {[moat, task, stop], #{duration := _}, #{task := echo}} = event(),
    T = moat:async(?POOL, sleep, [100]),
    ?assertEqual(nil, moat:yield(T, 0)),
    no_event(),
    ?assertEqual({ok, ok}, moat:yield(T, ?WAIT)),
    {[moat, task, stop], _, #{task := sleep}} = event(),
    Ts = [moat:async(?POOL, echo, [I]) || I <- [1, 2, 3]],
    [{_, {ok, 1}}, {_, {ok, 2}}, {_, {ok, 3}}] = moat:yield_many(Ts, ?WAIT),
    [{[moat, task, stop], _, _} = event() || _ <- Ts],
    Done = moat:async(?POOL, fail, ["late"]),
    moat_ct_util:wait_until(fun() -> maps:get(failed, moat:stats(?POOL)) =:= 1 end, done_failed),
    ?assertEqual({exit, {native_error, <<"late">>}}, moat:shutdown(Done, 1000)),
    {[moat, task, exception], _, #{task := fail}} = event(),
    Long = moat:async(?POOL, sleep, [60000]),
    ?assertEqual(nil, moat:shutdown(Long, brutal_kill)),
    no_event().

stream_elements_are_reported(_Config) ->
    %% Each element of a stream is an outcome consumed: one event each,
    %% without a duration (a stream's tasks have no submit of their own).
    {ok, _} = moat:start_pool(?POOL, #{size => 2}),
    Out = moat:async_stream(?POOL, echo, [1, 2, 3, 4], #{}),
    ?assertEqual(4, length(Out)),
    Events = [event() || _ <- Out],
    [
        begin
            ?assertMatch({[moat, task, stop], _, #{pool := ?POOL, task := echo}}, E),
            {_, M, _} = E,
            ?assertNot(is_map_key(duration, M))
        end
     || E <- Events
    ],
    no_event().

server_crashes_are_reported(_Config) ->
    %% A native server's crash is [moat, pool, restart] (counts add up to
    %% every crash) and a crash report through logger naming the pool, the
    %% child and the reason, whose counts add up to every crash too (the
    %% one-a-second limit is moat_server_SUITE:crashes_are_reported's, which
    %% times the reports).
    ok = logger:unset_application_level(moat), % another suite may have set it
    ok = logger:add_handler(moat_tel_capture, ?MODULE, #{config => #{pid => self()}}),
    Spec = #{id => ctr, start => {moat_demo, counter, [0]}},
    {ok, _} = moat:start_pool(?POOL, #{size => 2, servers => [Spec], max_restarts => 1000}),
    N = 50,
    [
        begin
            {exit, _} = moat:call(?POOL, ctr, crash, ?WAIT),
            moat_ct_util:wait_until(
                fun() -> moat:call(?POOL, ctr, get, ?WAIT) =:= {ok, 0} end, restarted
            )
        end
     || _ <- lists:seq(1, N)
    ],
    Counted = restart_events(0, N),
    ?assertEqual(N, Counted),
    Reports = reports(0, N, []),
    ?assertEqual(N, lists:sum([C || #{crashes := C} <- Reports])),
    [#{pool := ?POOL, child := ctr, reason := {native_error, <<"crash">>}} | _] = Reports.

without_telemetry_nothing_is_added(_Config) ->
    %% With no telemetry module moat adds nothing: no events, and the
    %% task handle has only its documented keys.
    unload_stub(),
    ok = moat_telemetry:init(),
    try
        ?assertNot(moat_telemetry:enabled()),
        {ok, _} = moat:start_pool(?POOL, #{size => 2}),
        T = moat:async(?POOL, echo, [x]),
        ?assertEqual([id, owner, pid, pool, ref], lists:sort(maps:keys(T))),
        x = moat:await(T),
        {ok, y} = moat:run(?POOL, echo, [y]),
        no_event()
    after
        load_stub(),
        ok = moat_telemetry:init()
    end.

%%%===================================================================
%%% Helpers
%%%===================================================================

load_stub() ->
    {ok, Tokens, _} = erl_scan:string(?STUB),
    Forms = split_forms(Tokens, [], []),
    {ok, telemetry, Bin} = compile:forms(Forms, [binary]),
    {module, telemetry} = code:load_binary(telemetry, "telemetry_stub.erl", Bin),
    ok.

unload_stub() ->
    _ = code:purge(telemetry),
    _ = code:delete(telemetry),
    _ = code:purge(telemetry),
    ok.

split_forms([], [], Acc) ->
    lists:reverse(Acc);
split_forms([{dot, _} = Dot | Rest], Cur, Acc) ->
    {ok, Form} = erl_parse:parse_form(lists:reverse([Dot | Cur])),
    split_forms(Rest, [], [Form | Acc]);
split_forms([T | Rest], Cur, Acc) ->
    split_forms(Rest, [T | Cur], Acc).

event() ->
    receive
        {telemetry, Event, M, Meta} -> {Event, M, Meta}
    after ?WAIT -> ct:fail(no_telemetry_event)
    end.

no_event() ->
    receive
        {telemetry, _, _, _} = E -> ct:fail({unexpected_event, E})
    after 100 -> ok
    end.

restart_events(Sum, Want) when Sum >= Want ->
    Sum;
restart_events(Sum, Want) ->
    receive
        {telemetry, [moat, pool, restart], #{count := C}, #{pool := ?POOL, child := ctr}} ->
            restart_events(Sum + C, Want);
        {telemetry, [moat, task, _], _, _} ->
            restart_events(Sum, Want)
    after ?WAIT -> Sum
    end.

reports(Sum, Want, Acc) when Sum >= Want ->
    lists:reverse(Acc);
reports(Sum, Want, Acc) ->
    receive
        {report, #{label := {moat, child_terminated}, crashes := C} = R} ->
            reports(Sum + C, Want, [R | Acc])
    after 3000 -> lists:reverse(Acc)
    end.

flush() ->
    receive
        _ -> flush()
    after 0 -> ok
    end.

%% logger handler callback: reports of moat's domain go to the case.
log(#{msg := {report, Report}, meta := #{domain := [moat]}}, #{config := #{pid := Pid}}) ->
    Pid ! {report, Report},
    ok;
log(_, _) ->
    ok.
