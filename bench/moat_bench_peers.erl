%%% @private
%%% @doc Internal to moat_bench: the peers that moat is measured against,
%%% each doing the same job as moat's task in the same run.
%%%
%%% A job is `echo' (return the input) or `{spin, Us}' (busy-wait `Us'
%%% microseconds on the monotonic clock, as moat_demo's `spin' does). The
%%% fan-out peers:
%%%
%%% <ul>
%%% <li>`task_async_stream': Elixir's `Task.async_stream/3', unordered,
%%%     `max_concurrency' the number of schedulers (Task's default), then
%%%     `Enum.to_list/1'; where Elixir cannot be loaded, an Erlang stand-in
%%%     (at most that many `spawn_monitor'ed workers, each replying once);</li>
%%% <li>`task_supervisor': `Task.Supervisor.async_stream_nolink/4' on a
%%%     fresh `Task.Supervisor', the same options (Elixir only);</li>
%%% <li>`dirty_nif': one dirty CPU NIF call per job
%%%     (bench/peers/moat_bench_dirty.c), from as many processes as moat
%%%     has tasks in flight, each taking the next job from a shared
%%%     counter;</li>
%%% <li>`port': one `{packet, 4}' round trip per job to a port program
%%%     that does the job (bench/peers/moat_bench_port.c), one port per
%%%     scheduler, the jobs in flight shared among them.</li>
%%% </ul>
%%%
%%% The distribution round trip's peer is a bare ei C-node
%%% (bench/peers/moat_bench_ei.c: one thread, blocking reads, each message
%%% sent straight back), started by {@link ei_echo_start/0}.
%%%
%%% The C peers are built by `make bench', `make shell' and `make iex' into
%%% `_build/c/plain/bench/'; {@link dir/0} says where they are looked for.
-module(moat_bench_peers).

-export([dir/0, elixir/0, available/1, label/2, describe/3]).
-export([fanout/5, round_trip/1, close_port/0]).
-export([ei_echo_start/0, ei_echo_stop/1]).
-export([trap_exit_restarts/1, port_restarts/1, port_recovery/0]).
% The supervised port owner of port_recovery/0.
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-behaviour(gen_server).

-export_type([job/0, peer/0, fanout_result/0, ei_echo/0]).

% Elixir is optional: loaded at run time when it is there (see elixir/0).
-ignore_xref([
    {'Elixir.Task', async_stream, 3},
    {'Elixir.Task.Supervisor', start_link, 1},
    {'Elixir.Task.Supervisor', async_stream_nolink, 4},
    {'Elixir.Enum', to_list, 1},
    {'Elixir.System', version, 0}
]).

-type job() :: echo | {spin, non_neg_integer()}.
-type peer() :: task_async_stream | task_supervisor | dirty_nif | port.
%% A running bare ei echo: its port and its node name.
-type ei_echo() :: {port(), node()}.
-type fanout_result() :: #{
    tasks := non_neg_integer(),
    seconds := float(),
    per_second := float(),
    concurrency := pos_integer(),
    failed := non_neg_integer()
}.

-define(ELIXIR_EBIN, "/usr/lib/elixir/lib/elixir/ebin").
-define(DIRTY, "moat_bench_dirty").
-define(PORT, "moat_bench_port").
-define(EI, "moat_bench_ei").
-define(OWNER, moat_bench_port_owner).
% How long a fan-out waits for the next answer before it counts the rest
% as lost.
-define(IDLE_MS, 10000).

%%%===================================================================
%%% Where the peers are
%%%===================================================================

%% @doc The directory of the C peers: `$MOAT_BENCH_PEERS' if set, else
%% `_build/c/plain/bench' of the moat checkout this module was built in.
-spec dir() -> file:filename().
dir() ->
    case os:getenv("MOAT_BENCH_PEERS") of
        Dir when is_list(Dir), Dir =/= "" ->
            Dir;
        _ ->
            % rebar3 puts moat in _build/default/lib/moat; the C build is
            % _build/c.
            filename:join([code:lib_dir(moat), "..", "..", "..", "c", "plain", "bench"])
    end.

%% @doc Elixir's version if Elixir can be loaded, from the code path or
%% from where Debian installs it, else `erlang'.
-spec elixir() -> {elixir, string()} | erlang.
elixir() ->
    case elixir_loaded() orelse (code:add_patha(?ELIXIR_EBIN) =:= true andalso elixir_loaded()) of
        true ->
            Version =
                try 'Elixir.System':version() of
                    V when is_binary(V) -> binary_to_list(V)
                catch
                    _:_ -> "?"
                end,
            {elixir, Version};
        false ->
            erlang
    end.

-spec elixir_loaded() -> boolean().
elixir_loaded() ->
    lists:all(
        fun(M) -> element(1, code:ensure_loaded(M)) =:= module end,
        ['Elixir.Task', 'Elixir.Task.Supervisor', 'Elixir.Enum', 'Elixir.System']
    ).

%% @doc `ok' when the peer can run here, else why not.
-spec available(peer()) -> ok | {unavailable, string()}.
available(task_async_stream) ->
    ok;
available(task_supervisor) ->
    case elixir() of
        {elixir, _} -> ok;
        erlang -> {unavailable, "Elixir not found"}
    end;
available(dirty_nif) ->
    case moat_bench_dirty:load(filename:join(dir(), ?DIRTY)) of
        ok -> ok;
        {error, _} -> {unavailable, "not built: make bench-peers"}
    end;
available(port) ->
    case filelib:is_regular(port_program()) of
        true -> ok;
        false -> {unavailable, "not built: make bench-peers"}
    end.

%% @doc The peer's name in a table.
-spec label(peer(), {elixir, string()} | erlang) -> string().
label(task_async_stream, {elixir, _}) -> "Task.async_stream";
label(task_async_stream, erlang) -> "Erlang workers (no Elixir)";
label(task_supervisor, _) -> "Task.Supervisor.async_stream_nolink";
label(dirty_nif, _) -> "dirty NIF call per job";
label(port, _) -> "port round trip per job".

%% @doc What the peer runs, for the inputs line.
-spec describe(peer(), job(), pos_integer()) -> iolist().
describe(task_async_stream, Job, Size) ->
    case elixir() of
        {elixir, V} ->
            io_lib:format(
                "Task.async_stream (Elixir ~s) of ~s, max_concurrency ~b, unordered, "
                "then Enum.to_list",
                [V, erlang_job(Job), Size]
            );
        erlang ->
            io_lib:format(
                "Elixir not loadable: at most ~b spawn_monitor'ed workers at a time, "
                "each running ~s and replying once",
                [Size, erlang_job(Job)]
            )
    end;
describe(task_supervisor, Job, Size) ->
    io_lib:format(
        "Task.Supervisor.async_stream_nolink of ~s, max_concurrency ~b, unordered",
        [erlang_job(Job), Size]
    );
describe(dirty_nif, Job, _Size) ->
    io_lib:format("~s, a dirty CPU NIF (bench/peers/moat_bench_dirty.c)", [c_job(Job)]);
describe(port, Job, Size) ->
    io_lib:format(
        "~b port programs (bench/peers/moat_bench_port.c, {packet, 4}), each "
        "running ~s per frame",
        [Size, c_job(Job)]
    ).

erlang_job(echo) -> "fun(X) -> X end";
erlang_job({spin, Us}) -> io_lib:format("a ~b us busy loop on monotonic_time", [Us]).

c_job(echo) -> "echo";
c_job({spin, Us}) -> io_lib:format("a ~b us busy loop on CLOCK_MONOTONIC", [Us]).

%%%===================================================================
%%% Fan-out
%%%===================================================================

%% @doc `N' jobs through the peer, at most `Concurrency' in flight where
%% the peer takes a bound of its own choosing (`dirty_nif', `port'), else
%% `Size' (the Task peers, as Task's default), timed from the first
%% submit to the last answer; the inputs are built before the clock
%% starts.
-spec fanout(peer(), job(), non_neg_integer(), pos_integer(), pos_integer()) ->
    fanout_result().
fanout(task_async_stream, Job, N, _Concurrency, Size) ->
    {F, Arg} = erlang_fun(Job),
    Inputs = lists:duplicate(N, Arg),
    Stream =
        case elixir() of
            {elixir, _} ->
                fun() ->
                    'Elixir.Enum':to_list(
                        'Elixir.Task':async_stream(Inputs, F, [
                            {max_concurrency, Size}, {ordered, false}
                        ])
                    )
                end;
            erlang ->
                fun() -> erl_stream(Inputs, F, Size, 0, []) end
        end,
    timed(N, Size, Stream);
fanout(task_supervisor, Job, N, _Concurrency, Size) ->
    {F, Arg} = erlang_fun(Job),
    Inputs = lists:duplicate(N, Arg),
    {ok, Sup} = 'Elixir.Task.Supervisor':start_link([]),
    try
        timed(N, Size, fun() ->
            'Elixir.Enum':to_list(
                'Elixir.Task.Supervisor':async_stream_nolink(Sup, Inputs, F, [
                    {max_concurrency, Size}, {ordered, false}
                ])
            )
        end)
    after
        unlink(Sup),
        exit(Sup, shutdown)
    end;
fanout(dirty_nif, Job, N, Concurrency, _Size) ->
    ok = available(dirty_nif),
    Call =
        case Job of
            echo -> fun() -> moat_bench_dirty:echo(1) =:= 1 end;
            {spin, Us} -> fun() -> moat_bench_dirty:spin(Us) =:= ok end
        end,
    Next = atomics:new(1, []),
    Parent = self(),
    Workers = min(Concurrency, max(1, N)),
    T0 = erlang:monotonic_time(nanosecond),
    Pids = [
        spawn_link(fun() -> Parent ! {?MODULE, self(), dirty_loop(Call, Next, N, 0)} end)
     || _ <- lists:seq(1, Workers)
    ],
    Failed = lists:sum([
        receive
            {?MODULE, P, F} -> F
        end
     || P <- Pids
    ]),
    result(N, Concurrency, T0, Failed);
fanout(port, Job, N, Concurrency, Size) ->
    Frame =
        case Job of
            echo -> <<$e, 1>>;
            {spin, Us} -> <<$s, Us:32>>
        end,
    Ports = [open_port({spawn_executable, port_program()}, [{packet, 4}, binary]) || _ <- lists:seq(1, Size)],
    try
        T0 = erlang:monotonic_time(nanosecond),
        First = min(N, Concurrency),
        _ = [
            true = port_command(lists:nth(1 + I rem Size, Ports), Frame)
         || I <- lists:seq(0, First - 1)
        ],
        Got = pipeline(Frame, N - First, First, 0),
        result(N, Concurrency, T0, N - Got)
    after
        _ = [catch port_close(P) || P <- Ports],
        flush_ports()
    end.

-spec timed(non_neg_integer(), pos_integer(), fun(() -> [moat:outcome()])) -> fanout_result().
timed(N, Concurrency, Stream) ->
    T0 = erlang:monotonic_time(nanosecond),
    Elems = Stream(),
    result(N, Concurrency, T0, length([E || E <- Elems, element(1, E) =/= ok])).

-spec result(non_neg_integer(), pos_integer(), integer(), non_neg_integer()) -> fanout_result().
result(N, Concurrency, T0, Failed) ->
    Seconds = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    #{
        tasks => N,
        seconds => Seconds,
        per_second => N / max(Seconds, 1.0e-9),
        concurrency => Concurrency,
        failed => Failed
    }.

erlang_fun(echo) -> {fun(X) -> X end, 1};
erlang_fun({spin, Us}) -> {fun busy_wait/1, Us}.

%% Takes jobs from the shared counter until there are none left: the
%% calls that failed.
dirty_loop(Call, Next, N, Failed) ->
    case atomics:add_get(Next, 1, 1) =< N of
        true ->
            Ok =
                try
                    Call()
                catch
                    _:_ -> false
                end,
            dirty_loop(Call, Next, N, Failed + length([x || not Ok]));
        false ->
            Failed
    end.

%% Each answer from a port sends the next frame to that port.
pipeline(_Frame, 0, 0, Got) ->
    Got;
pipeline(Frame, ToSend, InFlight, Got) ->
    receive
        {Port, {data, _}} when is_port(Port), ToSend > 0 ->
            true = port_command(Port, Frame),
            pipeline(Frame, ToSend - 1, InFlight, Got + 1);
        {Port, {data, _}} when is_port(Port) ->
            pipeline(Frame, 0, InFlight - 1, Got + 1)
    after ?IDLE_MS -> Got
    end.

flush_ports() ->
    receive
        {Port, _} when is_port(Port) -> flush_ports()
    after 0 -> ok
    end.

%% The Erlang stand-in for Task.async_stream: at most Max workers at a
%% time, each spawn_monitor'ed and replying once; elements in completion
%% order.
erl_stream([], _F, _Max, 0, Acc) ->
    Acc;
erl_stream([X | Rest], F, Max, Running, Acc) when Running < Max ->
    Parent = self(),
    _ = spawn_monitor(fun() -> Parent ! {?MODULE, self(), F(X)} end),
    erl_stream(Rest, F, Max, Running + 1, Acc);
erl_stream(Inputs, F, Max, Running, Acc) ->
    receive
        {'DOWN', _, process, Pid, normal} ->
            % The reply came before the DOWN: signals from one process keep
            % their order.
            receive
                {?MODULE, Pid, R} -> erl_stream(Inputs, F, Max, Running - 1, [{ok, R} | Acc])
            end;
        {'DOWN', _, process, _, Reason} ->
            erl_stream(Inputs, F, Max, Running - 1, [{exit, Reason} | Acc])
    end.

%% @doc Spins for `Us' microseconds on the monotonic clock, as `spin'
%% does.
-spec busy_wait(non_neg_integer()) -> ok.
busy_wait(Us) ->
    spin_until(erlang:monotonic_time(nanosecond) + Us * 1000).

spin_until(End) ->
    case erlang:monotonic_time(nanosecond) < End of
        true -> spin_until(End);
        false -> ok
    end.

%%%===================================================================
%%% Round trips
%%%===================================================================

%% @doc One trivial job through the peer, one outstanding: true when its
%% answer came. The port is the calling process's own, opened on first
%% use and kept until {@link close_port/0}; `{ei_echo, Node}' sends one
%% message to the bare ei echo `Node' (see {@link ei_echo_start/0}).
-spec round_trip(dirty_nif | port | {ei_echo, node()}) -> boolean().
round_trip(dirty_nif) ->
    moat_bench_dirty:echo(1) =:= 1;
round_trip({ei_echo, Node}) ->
    Ref = make_ref(),
    {echo, Node} ! Ref,
    receive
        Ref -> true
    after 5000 -> false
    end;
round_trip(port) ->
    Port =
        case get(?MODULE) of
            undefined ->
                P = open_port({spawn_executable, port_program()}, [{packet, 4}, binary]),
                put(?MODULE, P),
                P;
            P ->
                P
        end,
    true = port_command(Port, <<$e, 1>>),
    receive
        {Port, {data, <<$e, 1>>}} -> true
    after 5000 -> false
    end.

%% @doc Closes the calling process's round-trip port, if it has one.
-spec close_port() -> ok.
close_port() ->
    case erase(?MODULE) of
        undefined -> ok;
        Port -> catch port_close(Port), ok
    end.

%% @doc Starts the bare ei echo as a port program of the calling process
%% and connects this node to it; {@link ei_echo_stop/1} ends it (as does
%% the caller's exit). This node must be alive.
-spec ei_echo_start() -> {ok, ei_echo()} | {unavailable, string()}.
ei_echo_start() ->
    Prog = filename:join(dir(), ?EI),
    case {erlang:is_alive(), filelib:is_regular(Prog)} of
        {false, _} ->
            {unavailable, "this node is not distributed"};
        {true, false} ->
            {unavailable, "not built: make bench-peers"};
        {true, true} ->
            [_, Host] = string:split(atom_to_list(node()), "@"),
            Alive = lists:concat(["moat_bench_ei_", os:getpid(), "_", erlang:unique_integer([positive])]),
            Node = list_to_atom(Alive ++ "@" ++ Host),
            Env = [
                {"MOAT_BENCH_EI_NODE", atom_to_list(Node)},
                {"MOAT_BENCH_EI_COOKIE", atom_to_list(erlang:get_cookie())}
            ],
            Port = open_port({spawn_executable, Prog}, [{line, 256}, binary, exit_status, {env, Env}]),
            receive
                {Port, {data, {eol, <<"listening">>}}} ->
                    case net_kernel:connect_node(Node) of
                        true ->
                            {ok, {Port, Node}};
                        _ ->
                            ok = ei_echo_stop({ok, {Port, Node}}),
                            {unavailable, "cannot connect to it"}
                    end;
                {Port, {exit_status, Status}} ->
                    {unavailable, lists:flatten(io_lib:format("it exited with status ~b", [Status]))}
            after 5000 ->
                ok = ei_echo_stop({ok, {Port, Node}}),
                {unavailable, "it did not start within 5 s"}
            end
    end.

%% @doc Ends a bare ei echo that {@link ei_echo_start/0} started (its
%% stdin closes); anything else is left alone.
-spec ei_echo_stop({ok, ei_echo()} | {unavailable, string()}) -> ok.
ei_echo_stop({ok, {Port, Node}}) ->
    catch port_close(Port),
    _ = erlang:disconnect_node(Node),
    ok;
ei_echo_stop({unavailable, _}) ->
    ok.

%%%===================================================================
%%% Restarts and recovery
%%%===================================================================

%% @doc The bare BEAM loop: a process trapping exits spawn_links a process
%% that exits at once with a reason of its own, and waits for its `EXIT',
%% for `Ms' milliseconds: restarts done, and per second.
-spec trap_exit_restarts(pos_integer()) -> #{restarts := non_neg_integer(),
    seconds := float(), per_second := float(), failed := non_neg_integer()}.
trap_exit_restarts(Ms) ->
    process_flag(trap_exit, true),
    T0 = erlang:monotonic_time(nanosecond),
    {Restarts, Failed} = trap_exit_loop(T0 + Ms * 1000000, 0, 0),
    restart_result(Restarts, Failed, T0).

trap_exit_loop(Deadline, Restarts, Failed) ->
    case erlang:monotonic_time(nanosecond) < Deadline of
        false ->
            {Restarts, Failed};
        true ->
            Pid = spawn_link(fun() -> exit(crash) end),
            receive
                {'EXIT', Pid, crash} -> trap_exit_loop(Deadline, Restarts + 1, Failed);
                {'EXIT', Pid, _} -> trap_exit_loop(Deadline, Restarts, Failed + 1)
            end
    end.

%% @doc A port program respawned per crash, for `Ms' milliseconds: open
%% the port, tell it to segfault, wait for its exit status (139, that is
%% SIGSEGV); restarts done, and per second.
-spec port_restarts(pos_integer()) -> #{restarts := non_neg_integer(),
    seconds := float(), per_second := float(), failed := non_neg_integer()}.
port_restarts(Ms) ->
    Prog = port_program(),
    T0 = erlang:monotonic_time(nanosecond),
    {Restarts, Failed} = port_loop(Prog, T0 + Ms * 1000000, 0, 0),
    restart_result(Restarts, Failed, T0).

port_loop(Prog, Deadline, Restarts, Failed) ->
    case erlang:monotonic_time(nanosecond) < Deadline of
        false ->
            {Restarts, Failed};
        true ->
            Port = open_port({spawn_executable, Prog}, [{packet, 4}, binary, exit_status]),
            true = port_command(Port, <<$x>>),
            receive
                {Port, {exit_status, 139}} -> port_loop(Prog, Deadline, Restarts + 1, Failed);
                {Port, {exit_status, _}} -> port_loop(Prog, Deadline, Restarts, Failed + 1)
            after 5000 ->
                catch port_close(Port),
                port_loop(Prog, Deadline, Restarts, Failed + 1)
            end
    end.

restart_result(Restarts, Failed, T0) ->
    Seconds = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    #{
        restarts => Restarts,
        seconds => Seconds,
        per_second => Restarts / max(Seconds, 1.0e-9),
        failed => Failed
    }.

%% @doc Crash recovery of a port program the OTP way: a registered
%% gen_server owns the port, under an OTP supervisor; the port program is
%% told to segfault, its owner stops on the exit status, the supervisor
%% starts a new owner with a new port. Returns the milliseconds from the
%% crash frame to the first echo the new owner answers (or `error').
%% Starts and stops the supervisor itself; logger is quiet for it
%% meanwhile.
-spec port_recovery() -> float() | error.
port_recovery() ->
    Quiet = [gen_server, proc_lib, supervisor],
    Saved = logger:get_module_level(Quiet),
    ok = logger:set_module_level(Quiet, none),
    {ok, Sup} = supervisor:start_link(?MODULE, port_sup),
    try
        true = owner_echo(),
        T0 = erlang:monotonic_time(nanosecond),
        ok = gen_server:call(?OWNER, crash),
        case wait_echo(T0 + 5000000000) of
            true -> (erlang:monotonic_time(nanosecond) - T0) / 1.0e6;
            false -> error
        end
    after
        unlink(Sup),
        Ref = monitor(process, Sup),
        exit(Sup, shutdown),
        receive
            {'DOWN', Ref, process, Sup, _} -> ok
        end,
        ok = logger:unset_module_level(Quiet),
        _ = [logger:set_module_level(M, L) || {M, L} <- Saved]
    end.

wait_echo(Deadline) ->
    case owner_echo() of
        true ->
            true;
        false ->
            case erlang:monotonic_time(nanosecond) < Deadline of
                true ->
                    erlang:yield(),
                    wait_echo(Deadline);
                false ->
                    false
            end
    end.

owner_echo() ->
    try
        gen_server:call(?OWNER, echo, 5000) =:= true
    catch
        exit:_ -> false
    end.

%% @private The OTP supervisor of the port owner, or the owner.
-spec init(port_sup | port_owner) -> {ok, term()}.
init(port_sup) ->
    Flags = #{strategy => one_for_one, intensity => 1000, period => 1},
    Child = #{
        id => owner,
        start => {gen_server, start_link, [{local, ?OWNER}, ?MODULE, port_owner, []]}
    },
    {ok, {Flags, [Child]}};
init(port_owner) ->
    {ok, open_port({spawn_executable, port_program()}, [{packet, 4}, binary, exit_status])}.

%% @private `echo' answers true once the port echoed a frame; `crash'
%% tells the port program to segfault.
-spec handle_call(echo | crash, gen_server:from(), port()) ->
    {reply, term(), port()} | {stop, term(), false, port()}.
handle_call(echo, _From, Port) ->
    true = port_command(Port, <<$e, 1>>),
    receive
        {Port, {data, <<$e, 1>>}} -> {reply, true, Port};
        {Port, {exit_status, S}} -> {stop, {port_exit, S}, false, Port}
    after 5000 -> {reply, false, Port}
    end;
handle_call(crash, _From, Port) ->
    true = port_command(Port, <<$x>>),
    {reply, ok, Port}.

%% @private
-spec handle_cast(term(), port()) -> {noreply, port()}.
handle_cast(_, Port) ->
    {noreply, Port}.

%% @private The port program's exit ends the owner, so its supervisor
%% starts another.
-spec handle_info(term(), port()) -> {noreply, port()} | {stop, term(), port()}.
handle_info({Port, {exit_status, S}}, Port) ->
    {stop, {port_exit, S}, Port};
handle_info(_, Port) ->
    {noreply, Port}.

port_program() ->
    filename:join(dir(), ?PORT).
