%%% @doc The C-node backend (doc/cnode.md) beyond the API suite, which
%%% moat_task_SUITE runs against it: what a hard fault in the C-node costs,
%%% how the pool comes back, start errors as values, and that no C-node
%%% outlives its pool or its VM.
-module(moat_cnode_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-import(moat_ct_util, [wait_until/2]).

-export([all/0, groups/0, suite/0]).
-export([init_per_suite/1, end_per_suite/1]).
-export([init_per_group/2, end_per_group/2]).
-export([init_per_testcase/2, end_per_testcase/2]).
-export([
    segfault_ends_every_task_in_flight/1,
    abort_ends_every_task_in_flight/1,
    pool_serves_again_after_crash/1,
    bad_library_is_a_value/1,
    servers_run_in_the_cnode/1,
    stop_pool_ends_cnode/1,
    vm_sigkill_leaves_no_cnode/1,
    many_callers_during_crashes/1,
    process_fault_costs_one_task/1,
    process_kill_is_real/1,
    process_chaos/1,
    dist_needs_a_live_node/1,
    dist_serves_and_stops/1,
    dist_names_are_reused/1,
    dist_kill_gives_noconnection/1,
    dist_frames_are_checked/1,
    dist_server_by_hand/1
]).

-define(POOL, moat_cnode_pool).
-define(POOL2, moat_cnode_pool2).
-define(WAIT, 5000).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [
        segfault_ends_every_task_in_flight,
        abort_ends_every_task_in_flight,
        pool_serves_again_after_crash,
        bad_library_is_a_value,
        servers_run_in_the_cnode,
        stop_pool_ends_cnode,
        vm_sigkill_leaves_no_cnode,
        many_callers_during_crashes,
        process_fault_costs_one_task,
        process_kill_is_real,
        process_chaos,
        dist_needs_a_live_node,
        {group, dist}
    ].

groups() ->
    [
        {dist, [], [
            dist_serves_and_stops,
            dist_names_are_reused,
            dist_kill_gives_noconnection,
            dist_frames_are_checked,
            dist_server_by_hand
        ]}
    ].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(moat),
    %% The pools here crash on purpose; their error reports are expected.
    ok = logger:set_application_level(moat, critical),
    Config.

end_per_suite(_Config) ->
    _ = application:stop(moat),
    logger:unset_application_level(moat).

init_per_group(dist, Config) ->
    [{started_dist, moat_ct_util:distributed()} | Config].

end_per_group(dist, Config) ->
    moat_ct_util:undistributed(?config(started_dist, Config)).

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, _Config) ->
    _ = moat:stop_pool(?POOL),
    _ = moat:stop_pool(?POOL2),
    %% A server started by hand does not die with its port.
    case get(server_os_pid) of
        undefined -> ok;
        OsPid -> os:cmd("kill -9 " ++ integer_to_list(OsPid))
    end,
    ok.

%%%===================================================================
%%% Cases
%%%===================================================================

%% Distribution (the `dist' group runs on a node made alive for it).

dist_needs_a_live_node(_Config) ->
    %% Over distribution the VM must be a node: a value, not a crash. The
    %% transport is the C-node's: with the NIF backend it is badarg.
    ?assertError(badarg, moat:start_pool(?POOL, #{transport => distribution})),
    ?assertError(badarg, start(#{transport => {distribution, "node"}})),
    case erlang:is_alive() of
        true ->
            {skip, "this VM is already a distributed node"};
        false ->
            ?assertEqual({error, {distribution, not_alive}}, start(#{transport => distribution})),
            ?assertEqual([], cnode_ports())
    end.

dist_serves_and_stops(_Config) ->
    %% The C-node joins as a hidden node and serves; stop_pool ends it
    %% and its node.
    {ok, _} = start(#{transport => distribution, size => 2}),
    [Node] = nodes(hidden),
    ?assertEqual("moat_moat_cnode_pool_", lists:sublist(atom_to_list(Node), 21)),
    ?assertEqual([], nodes()),
    OsPid = cnode_os_pid(),
    ?assertEqual({ok, hello}, moat:run(?POOL, echo, [hello])),
    ?assertEqual({exit, {native_error, <<"boom">>}}, moat:run(?POOL, fail, ["boom"])),
    ?assertEqual({exit, timeout}, moat:run(?POOL, sleep, [10000], 20)),
    ok = moat:stop_pool(?POOL),
    wait_until(fun() -> not os_alive(OsPid) end, cnode_gone),
    wait_until(fun() -> nodes(hidden) =:= [] end, node_gone),
    sweep().

dist_names_are_reused(_Config) ->
    %% A pool's C-nodes take their node names in turn from a few, so that
    %% a pool that keeps losing its C-node does not make an atom each
    %% time: nine starts use eight names, the ninth the first's again.
    Names = [
        begin
            {ok, _} = start(#{transport => distribution, size => 1}),
            [Node] = nodes(hidden),
            ok = moat:stop_pool(?POOL),
            wait_until(fun() -> nodes(hidden) =:= [] end, node_gone),
            Node
        end
     || _ <- lists:seq(1, 9)
    ],
    ?assertEqual(8, length(lists:usort(Names))),
    ?assertEqual(hd(Names), lists:last(Names)),
    sweep().

dist_kill_gives_noconnection(_Config) ->
    %% Killing the C-node ends every task in flight with noconnection;
    %% the pool's supervisor starts a new C-node, which serves.
    {ok, _} = start(#{transport => distribution, size => 4}),
    OsPid = cnode_os_pid(),
    Sleepers = [moat:async(?POOL, sleep, [60000]) || _ <- lists:seq(1, 4)],
    wait_until(fun() -> maps:get(running, moat:stats(?POOL)) =:= 4 end, sleepers_running),
    Spin = moat:async(?POOL, spin, [60000000]),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    [?assertEqual(noconnection, down_reason(T)) || T <- [Spin | Sleepers]],
    wait_until(fun() -> moat:run(?POOL, echo, [back]) =:= {ok, back} end, serving_again),
    ?assertNotEqual(OsPid, cnode_os_pid()),
    %% yield and await see the same reason as a value.
    T2 = moat:async(?POOL, sleep, [60000]),
    wait_until(fun() -> maps:get(running, moat:stats(?POOL)) =:= 1 end, sleeper_running),
    _ = os:cmd("kill -9 " ++ integer_to_list(cnode_os_pid())),
    ?assertEqual({exit, noconnection}, moat:yield(T2, ?WAIT)),
    wait_until(fun() -> moat:run(?POOL, echo, [again]) =:= {ok, again} end, serving_again),
    sweep().

dist_frames_are_checked(_Config) ->
    %% Whatever reaches the C-node's names over distribution is checked,
    %% and the pool keeps serving.
    {ok, _} = start(#{transport => distribution, size => 2}),
    [Node] = nodes(hidden),
    %% This C-node serves one pool: whatever another process sends to
    %% `moat' (junk or a hello) is answered with a refusal.
    Junk = [not_a_binary, <<"not a term">>, term_to_binary({run, 1, echo}),
            term_to_binary({hello, #{size => 1}})],
    [{moat, Node} ! J || J <- Junk],
    {elsewhere, Node} ! hello,
    [
        receive
            {moat_cnode, _, Frame} ->
                ?assertMatch({error, {busy, _}}, binary_to_term(Frame))
        after ?WAIT -> ct:fail(no_refusal)
        end
     || _ <- Junk
    ],
    %% The echo name answers any message (the benchmarks' bare peer).
    {moat_echo, Node} ! {self(), ping},
    receive
        {_, ping} -> ok
    after ?WAIT -> ct:fail(no_echo)
    end,
    ?assertEqual({ok, still}, moat:run(?POOL, echo, [still])),
    sweep().

dist_server_by_hand(Config) ->
    %% A moat_cnode --serve started by hand (here on loopback) serves one
    %% pool at a time, then the next; killing it gives noconnection, and
    %% leaves no session behind.
    Node = server_node(Config),
    Opts = #{transport => {distribution, Node}, size => 2},
    {ok, _} = start(Opts),
    ?assertEqual({ok, one}, moat:run(?POOL, echo, [one])),
    ?assertMatch({error, {busy, _}}, moat:start_pool(?POOL2, maps:merge(#{backend => cnode}, Opts))),
    ok = moat:stop_pool(?POOL),
    %% Each session is a child process of the server: the next pool gets
    %% a fresh one.
    {ok, _} = moat:start_pool(?POOL2, maps:merge(#{backend => cnode}, Opts)),
    ?assertEqual({ok, two}, moat:run(?POOL2, echo, [two])),
    %% A segfault in thread isolation costs the session, not the server:
    %% the pool's supervisor reconnects to the next session.
    ?assertEqual({exit, noconnection}, moat:run(?POOL2, segfault, [])),
    wait_until(fun() -> moat:run(?POOL2, echo, [three]) =:= {ok, three} end, next_session),
    T = moat:async(?POOL2, sleep, [60000]),
    wait_until(fun() -> maps:get(running, moat:stats(?POOL2)) =:= 1 end, sleeper_running),
    Sessions = workers(get(server_os_pid)),
    ?assertMatch([_], Sessions),
    _ = os:cmd("kill -9 " ++ integer_to_list(get(server_os_pid))),
    ?assertEqual(noconnection, down_reason(T)),
    erase(server_os_pid),
    wait_until(fun() -> not lists:any(fun os_alive/1, Sessions) end, sessions_gone),
    sweep().

%% Starts `moat_cnode --serve' as a user would, name and cookie in its
%% environment, and waits until it says it serves. Its port belongs to a
%% process of its own that drops what the server prints.
server_node(_Config) ->
    [_, Host] = string:split(atom_to_list(node()), "@"),
    Node = list_to_atom("moat_server_" ++ os:getpid() ++ "@" ++ Host),
    Exe = filename:join(code:priv_dir(moat), "moat_cnode"),
    Env = [{"MOAT_NODE", atom_to_list(Node)}, {"MOAT_COOKIE", atom_to_list(erlang:get_cookie())}],
    Self = self(),
    spawn(fun() ->
        Port = open_port(
            {spawn_executable, Exe},
            [{args, ["--serve"]}, {env, Env}, {line, 1024}, stderr_to_stdout, exit_status, binary]
        ),
        {os_pid, OsPid} = erlang:port_info(Port, os_pid),
        Self ! {server, OsPid},
        receive
            {Port, {data, {eol, <<"moat_cnode: serving as ", _/binary>>}}} -> Self ! {server, ready}
        end,
        drain(Port)
    end),
    receive
        {server, OsPid} -> put(server_os_pid, OsPid)
    end,
    receive
        {server, ready} -> Node
    after ?WAIT -> ct:fail(server_not_serving)
    end.

drain(Port) ->
    receive
        {Port, {exit_status, _}} -> ok;
        _ -> drain(Port)
    end.

segfault_ends_every_task_in_flight(_Config) ->
    %% In thread isolation a segfault loses the C-node: every task it held,
    %% the faulting one included, gets {native_crash, cnode_down}.
    crash_ends_all(segfault).

abort_ends_every_task_in_flight(_Config) ->
    %% The same for abort().
    crash_ends_all(abort).

pool_serves_again_after_crash(_Config) ->
    %% After a crash the pool's supervisor starts a new C-node and the same
    %% pool name serves again; tasks sent meanwhile get values, not crashes.
    {ok, _} = start(#{size => 2}),
    OsPid = cnode_os_pid(),
    T = moat:async(?POOL, segfault, []),
    ?assertEqual({native_crash, cnode_down}, down_reason(T)),
    wait_until(fun() -> moat:run(?POOL, echo, [back]) =:= {ok, back} end, serving_again),
    ?assertNotEqual(OsPid, cnode_os_pid()),
    wait_until(fun() -> not os_alive(OsPid) end, old_cnode_gone),
    ?assertEqual([{ok, 1}, {ok, 2}, {ok, 3}], moat:async_stream(?POOL, echo, [1, 2, 3], #{})),
    sweep().

bad_library_is_a_value(_Config) ->
    %% A library the C-node cannot load fails start_pool with a message,
    %% and leaves no C-node behind.
    Before = cnode_ports(),
    {error, {bad_library, Msg}} = start(#{libraries => ["/nonexistent/lib.so"]}),
    ?assert(is_binary(Msg)),
    ?assertNotEqual(nomatch, binary:match(Msg, <<"/nonexistent/lib.so">>)),
    ?assertEqual(Before, cnode_ports()),
    ?assertEqual({exit, noproc}, moat:run(?POOL, echo, [x])).

servers_run_in_the_cnode(_Config) ->
    %% Native servers run in a thread-isolation C-node (moat_server_SUITE
    %% covers them): a C-node fault loses them with it, and the pool comes
    %% back with a new C-node and the servers at their initial state.
    Spec = #{id => c, start => {moat_demo, counter, [0]}},
    {ok, _} = start(#{size => 2, servers => [Spec]}),
    OsPid = cnode_os_pid(),
    ?assertEqual({ok, 5}, moat:call(?POOL, c, {add, 5})),
    Slow = spawn_monitor(fun() -> exit({result, moat:call(?POOL, c, {sleep, 60000}, infinity)}) end),
    wait_until(fun() -> maps:get(running, moat:stats(?POOL)) =:= 1 end, call_running),
    ?assertEqual({exit, {native_crash, cnode_down}}, moat:run(?POOL, segfault, [])),
    {SlowPid, SlowRef} = Slow,
    receive
        {'DOWN', SlowRef, process, SlowPid, Reason} ->
            ?assertEqual({result, {exit, {native_crash, cnode_down}}}, Reason)
    after ?WAIT -> ct:fail(call_not_ended)
    end,
    wait_until(
        fun() ->
            case cnode_ports() of
                [P] -> element(2, erlang:port_info(P, os_pid)) =/= OsPid;
                _ -> false
            end
        end,
        new_cnode
    ),
    ?assertEqual({ok, 0}, wait_call(?POOL, c, get)),
    ok = moat:stop_pool(?POOL),
    sweep().

%% A call's outcome once the server answers (a new pool may still be
%% starting).
wait_call(P, Id, Req) ->
    wait_until(fun() -> element(1, moat:call(P, Id, Req)) =:= ok end, {answers, Id}),
    moat:call(P, Id, Req).

stop_pool_ends_cnode(_Config) ->
    %% stop_pool gives pending tasks shutdown and the C-node exits at once,
    %% even with a body that ignores cancellation still running.
    {ok, _} = start(#{size => 2}),
    OsPid = cnode_os_pid(),
    Spin = moat:async(?POOL, spin, [60000000]),
    Sleep = moat:async(?POOL, sleep, [60000]),
    wait_until(fun() -> maps:get(running, moat:stats(?POOL)) =:= 2 end, both_running),
    ok = moat:stop_pool(?POOL),
    ?assertEqual(shutdown, down_reason(Spin)),
    ?assertEqual(shutdown, down_reason(Sleep)),
    wait_until(fun() -> not os_alive(OsPid) end, cnode_gone),
    sweep().

vm_sigkill_leaves_no_cnode(Config) ->
    %% A VM killed with SIGKILL leaves no moat_cnode behind, nor any
    %% process of a process-isolation C-node: its task workers (one busy
    %% in a runaway task), its servers' worker and its fork server.
    Ebin = filename:dirname(code:which(moat)),
    Script =
        "{ok, _} = application:ensure_all_started(moat),"
        "{ok, _} = moat:start_pool(p, #{backend => cnode, size => 1}),"
        "{ok, ok} = moat:run(p, echo, [ok]),"
        "{ok, _} = moat:start_pool(q, #{backend => cnode, isolation => process, size => 2,"
        "  servers => [#{id => c, start => {moat_demo, counter, [0]}}]}),"
        "{ok, 1} = moat:call(q, c, {add, 1}),"
        "[io:format(\"cnode ~b~n\", [element(2, erlang:port_info(P, os_pid))])"
        "  || P <- erlang:ports(),"
        "  lists:suffix(\"moat_cnode\", element(2, erlang:port_info(P, name)))],"
        "_ = moat:async(p, spin, [60000000]),"
        "_ = moat:async(q, spin, [60000000]),"
        "receive after infinity -> ok end.",
    Erl = os:find_executable("erl"),
    Port = open_port(
        {spawn_executable, Erl},
        [{args, ["-noshell", "-pa", Ebin, "-eval", Script]}, {line, 256}, exit_status]
    ),
    {os_pid, VmPid} = erlang:port_info(Port, os_pid),
    Cnodes = [
        receive
            {Port, {data, {eol, "cnode " ++ N}}} -> list_to_integer(N)
        after 20000 -> ct:fail(peer_vm_did_not_start)
        end
     || _ <- [p, q]
    ],
    %% The process-isolation C-node's children: its two task workers, a
    %% spare and the servers' worker, and the fork server they come from.
    wait_until(fun() -> length(lists:append([workers(C) || C <- Cnodes])) =:= 4 end, workers_up),
    Children = lists:append([children(C) || C <- Cnodes]),
    ?assertEqual(5, length(Children)),
    ?assertEqual(1, length([C || C <- Children, comm(integer_to_list(C)) =:= <<"moat_forker">>])),
    ?assert(lists:all(fun os_alive/1, Cnodes)),
    _ = os:cmd("kill -9 " ++ integer_to_list(VmPid)),
    receive
        {Port, {exit_status, _}} -> ok
    after ?WAIT -> ct:fail(peer_vm_not_killed)
    end,
    wait_until(fun() -> not lists:any(fun os_alive/1, Cnodes ++ Children) end, cnode_outlived_vm),
    _ = Config,
    ok.

many_callers_during_crashes(_Config) ->
    %% 200 callers run tasks while the C-node crashes three times: each
    %% call gets exactly one value, a result or a reason from the table,
    %% and every caller lives.
    {ok, _} = start(#{size => 2, max_restarts => 10, max_seconds => 5}),
    Parent = self(),
    Callers = [
        spawn_monitor(fun() ->
            Got = [moat:run(?POOL, echo, [I], 2000) || I <- lists:seq(1, 50)],
            Parent ! {self(), Got}
        end)
     || _ <- lists:seq(1, 200)
    ],
    lists:foreach(
        fun(_) ->
            timer:sleep(20),
            _ = moat:run(?POOL, segfault, [], 1000)
        end,
        lists:seq(1, 3)
    ),
    Allowed = fun
        ({ok, I}) when is_integer(I) -> true;
        ({exit, {native_crash, cnode_down}}) -> true;
        ({exit, noproc}) -> true;
        (_) -> false
    end,
    lists:foreach(
        fun({Pid, MRef}) ->
            receive
                {Pid, Got} ->
                    ?assertEqual(50, length(Got)),
                    ?assertEqual([], [G || G <- Got, not Allowed(G)])
            after 30000 -> ct:fail({caller_stuck, Pid})
            end,
            receive
                {'DOWN', MRef, process, Pid, Why} -> ?assertEqual(normal, Why)
            end
        end,
        Callers
    ),
    wait_until(fun() -> moat:run(?POOL, echo, [x]) =:= {ok, x} end, serving_again),
    sweep().

process_fault_costs_one_task(_Config) ->
    %% In process isolation a segfault or an abort ends only its own task,
    %% with the signal; the tasks beside it finish and the C-node stays.
    {ok, _} = start(#{size => 3, isolation => process}),
    OsPid = cnode_os_pid(),
    Sleepers = [moat:async(?POOL, sleep, [300]) || _ <- lists:seq(1, 2)],
    ?assertEqual({exit, {native_crash, sigsegv}}, moat:run(?POOL, segfault, [])),
    ?assertEqual({exit, {native_crash, sigabrt}}, moat:run(?POOL, abort, [])),
    [?assertEqual(ok, moat:await(T)) || T <- Sleepers],
    ?assertEqual({ok, x}, moat:run(?POOL, echo, [x])),
    ?assertEqual(OsPid, cnode_os_pid()),
    sweep().

process_kill_is_real(_Config) ->
    %% A task past its deadline, or shut down with brutal_kill, is killed
    %% for real: its worker process is gone and replaced, and the pool's
    %% workers are back to size + spares.
    {ok, _} = start(#{size => 2, isolation => process, spares => 1}),
    OsPid = cnode_os_pid(),
    wait_until(fun() -> length(workers(OsPid)) =:= 3 end, workers_up),
    Before = workers(OsPid),
    T = moat:async(?POOL, spin, [60000000], #{timeout => 50}),
    ?assertEqual(timeout, down_reason(T)),
    S = moat:async(?POOL, spin, [60000000]),
    ?assertEqual({ok, started}, moat:run(?POOL, echo, [started])),
    ?assertEqual(nil, moat:shutdown(S, brutal_kill)),
    %% Both spinning workers died; their replacements came up.
    wait_until(
        fun() ->
            Now = workers(OsPid),
            length(Now) =:= 3 andalso length(Before -- Now) =:= 2
        end,
        two_workers_replaced
    ),
    wait_until(fun() -> maps:get(abandoned, moat:stats(?POOL)) =:= 0 end, bodies_gone),
    %% shutdown/2 asks first; a spin does not listen, so past the timeout
    %% its worker is killed too (with threads it would run on, abandoned).
    Before2 = workers(OsPid),
    ?assertEqual({exit, killed}, shutdown_spin(5)),
    wait_until(fun() -> length(Before2 -- workers(OsPid)) =:= 1 end, spin_worker_killed),
    wait_until(fun() -> maps:get(abandoned, moat:stats(?POOL)) =:= 0 end, spin_gone),
    sweep().

%% shutdown(T, 100) of a spin that has begun. A spin cancelled before a
%% worker began it is rightly nil: try again, a few times.
shutdown_spin(Tries) ->
    U = moat:async(?POOL, spin, [60000000]),
    wait_until(fun() -> maps:get(running, moat:stats(?POOL)) =:= 1 end, spin_sent),
    ?assertEqual({ok, x}, moat:run(?POOL, echo, [x])),
    case moat:shutdown(U, 100) of
        nil when Tries > 1 -> shutdown_spin(Tries - 1);
        Outcome -> Outcome
    end.

process_chaos(_Config) ->
    %% 1,000 tasks of which a random tenth segfault, abort, spin past their
    %% deadline or allocate past max_memory: each gets exactly one outcome
    %% with its reason, every other task succeeds, the VM and the C-node
    %% live, a native server beside them counts every cast sent meanwhile
    %% (its worker is not theirs), and after stop_pool no worker or C-node
    %% process is left.
    rand:seed(exsss, {7, 11, 13}),
    {ok, _} = start(#{
        size => 2,
        isolation => process,
        max_memory => 256 * 1024 * 1024,
        max_restarts => 100,
        servers => [#{id => c, start => {moat_demo, counter, [0]}}]
    }),
    OsPid = cnode_os_pid(),
    Plan = [{I, chaos_kind()} || I <- lists:seq(1, 1000)],
    Tasks = [
        {I, Kind, begin ok = moat:cast(?POOL, c, {add, 1}), chaos_async(Kind, I) end}
     || {I, Kind} <- Plan
    ],
    lists:foreach(
        fun({I, Kind, T}) ->
            Outcome = moat:yield(T, 30000),
            ?assert(chaos_expected(Kind, I, Outcome), {I, Kind, Outcome})
        end,
        Tasks
    ),
    ?assertEqual(OsPid, cnode_os_pid()),
    ?assertEqual({ok, 1000}, moat:call(?POOL, c, get)),
    ?assertEqual(0, maps:get(restarts, moat:stats(?POOL))),
    Workers = workers(OsPid),
    ?assertNotEqual([], Workers),
    ok = moat:stop_pool(?POOL),
    wait_until(fun() -> not lists:any(fun os_alive/1, [OsPid | Workers]) end, all_gone),
    sweep().

chaos_kind() ->
    case rand:uniform(40) of
        1 -> segfault;
        2 -> abort;
        3 -> spin;
        4 -> alloc;
        _ -> echo
    end.

chaos_async(segfault, _) -> moat:async(?POOL, segfault, []);
chaos_async(abort, _) -> moat:async(?POOL, abort, []);
chaos_async(spin, _) -> moat:async(?POOL, spin, [60000000], #{timeout => 20});
chaos_async(alloc, _) -> moat:async(?POOL, alloc, [1024 * 1024 * 1024]);
chaos_async(echo, I) -> moat:async(?POOL, echo, [I]).

chaos_expected(echo, I, Outcome) -> Outcome =:= {ok, I};
chaos_expected(segfault, _, Outcome) -> Outcome =:= {exit, {native_crash, sigsegv}};
chaos_expected(abort, _, Outcome) -> Outcome =:= {exit, {native_crash, sigabrt}};
chaos_expected(spin, _, Outcome) -> Outcome =:= {exit, timeout};
chaos_expected(alloc, _, {exit, {native_crash, _}}) -> true;
chaos_expected(alloc, _, {exit, {native_error, _}}) -> true;
chaos_expected(alloc, _, {exit, enomem}) -> true;
chaos_expected(_, _, _) -> false.

%%%===================================================================
%%% Helpers
%%%===================================================================

%% The live child processes of OS process Parent (a C-node's workers),
%% but its fork server, which names itself moat_forker.
workers(Parent) ->
    [C || C <- children(Parent), comm(integer_to_list(C)) =/= <<"moat_forker">>].

%% The live child processes of OS process Parent.
children(Parent) ->
    {ok, Names} = file:list_dir("/proc"),
    lists:sort([
        list_to_integer(N)
     || N <- Names,
        lists:all(fun(C) -> C >= $0 andalso C =< $9 end, N),
        os_alive(list_to_integer(N)),
        ppid(N) =:= Parent
    ]).

comm(Pid) ->
    case file:read_file("/proc/" ++ Pid ++ "/comm") of
        {ok, Comm} -> string:trim(Comm);
        {error, _} -> <<>>
    end.

ppid(Pid) ->
    case file:read_file("/proc/" ++ Pid ++ "/stat") of
        {ok, Stat} ->
            [_, Rest] = binary:split(Stat, <<") ">>),
            [_State, PPid | _] = binary:split(Rest, <<" ">>, [global]),
            binary_to_integer(PPid);
        {error, _} ->
            0
    end.

start(Opts) ->
    moat:start_pool(?POOL, maps:merge(#{backend => cnode}, Opts)).

crash_ends_all(Task) ->
    {ok, _} = start(#{size => 4}),
    Sleepers = [moat:async(?POOL, sleep, [60000]) || _ <- lists:seq(1, 3)],
    wait_until(fun() -> maps:get(running, moat:stats(?POOL)) =:= 3 end, sleepers_running),
    Crash = moat:async(?POOL, Task, []),
    [?assertEqual({native_crash, cnode_down}, down_reason(T)) || T <- [Crash | Sleepers]],
    sweep().

%% The DOWN reason of a task, within ?WAIT.
down_reason(#{ref := Ref}) ->
    receive
        {'DOWN', Ref, process, _, Reason} -> Reason;
        {Ref, Value} -> ct:fail({unexpected_value, Value})
    after ?WAIT -> ct:fail({no_down, Ref})
    end.

%% The C-node ports of the pools of this VM (owned by their pools'
%% processes).
cnode_ports() ->
    lists:sort([
        P
     || P <- erlang:ports(),
        case erlang:port_info(P, name) of
            {name, Name} -> lists:suffix("moat_cnode", Name);
            undefined -> false
        end
    ]).

cnode_os_pid() ->
    [P] = cnode_ports(),
    {os_pid, OsPid} = erlang:port_info(P, os_pid),
    OsPid.

os_alive(OsPid) ->
    %% A zombie (exited, not yet reaped) counts as gone.
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Stat} ->
            [_, Rest] = binary:split(Stat, <<") ">>),
            binary:first(Rest) =/= $Z;
        {error, _} ->
            false
    end.

%% Nothing about any task is left in the mailbox.
sweep() ->
    receive
        Msg -> ct:fail({unexpected_message, Msg})
    after 0 -> ok
    end.
