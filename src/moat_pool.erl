%%% @private
%%% @doc Internal: the owner of one native pool.
%%%
%%% It creates the pool in `init/1' (loading its task libraries and starting
%%% its threads), holds the NIF handle, and closes the pool in
%%% `terminate/2': every task still pending then gets its `shutdown' DOWN
%%% before the process is gone. The pool is registered by name in the NIF,
%%% so callers reach it without this process; if this process is killed the
%%% NIF sees it die and closes the pool all the same. It traps exits so
%%% that its supervisor's shutdown runs `terminate/2'.
%%%
%%% With `backend => cnode' it also starts the pool's `moat_cnode' and owns
%%% its port (doc/cnode.md): callers send tasks to the port themselves,
%%% and this process hands each packet that comes back to the NIF, which
%%% settles the tasks and sends the callers their outcomes. When the
%%% C-node ends, every task it held gets `{native_crash, cnode_down}' and
%%% this process exits, so that the pool's supervisor starts a new one.
%%%
%%% With `transport => distribution' the C-node it starts joins this node
%%% as a hidden node instead (its port is then only a lifeline, and its
%%% stdout and stderr come as lines to log); with `{distribution, Node}'
%%% it uses `Node', a `moat_cnode --serve' started by hand, perhaps on
%%% another host. A NIF cannot send to another node, so this process
%%% relays the frames callers address to the C-node
%%% (`{moat_cnode_send, Frame}'); frames come back as
%%% `{moat_cnode, CNodePid, Frame}'. It links to the C-node's pid (the
%%% C-node ends the session when this process exits) and watches the node:
%%% on `nodedown' every task in flight ends with `noconnection'.
%%%
%%% A C-node pool's native servers run in the C-node, under its native
%%% supervisor (thread isolation only): hello carries their specs, calls
%%% are remote tasks, and the C-node reports its supervisor's restarts,
%%% crashes and giving up in frames this process handles as it handles the
%%% NIF's. Before the pool closes it asks the C-node to stop them in order
%%% (`{stop_servers}') and waits for the answer, relaying frames meanwhile.
-module(moat_pool).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-record(state, {
    name :: atom(),
    handle :: reference() | undefined,
    port :: port() | undefined,
    os_pid :: non_neg_integer() | undefined,
    %% over distribution: the C-node's node and pid
    node :: node() | undefined,
    cpid :: pid() | undefined,
    %% a C-node pool with native servers
    servers = false :: boolean(),
    %% crash reports of native servers, at most one per ?REPORT_MS: when
    %% the last went out, the crashes held back since, the last of them
    reported_at :: integer() | undefined,
    held = 0 :: non_neg_integer(),
    held_last :: {term(), term()} | undefined,
    report_timer = false :: boolean()
}).

%% At most one crash report of native servers per this many ms per pool:
%% a crash loop cannot flood the log; the next report counts the rest.
-define(REPORT_MS, 1000).

%% How long a new C-node may take to load its libraries and answer hello.
-define(HELLO_TIMEOUT, 10000).

%% How many distribution node names one pool's C-nodes take in turn
%% (cnode_generation/1).
-define(NAMES_PER_POOL, 8).

%%%===================================================================
%%% API
%%%===================================================================

%% Starts the owner of pool `Name'. Fails with the reason the pool could
%% not be made: `{bad_library, Message}', `{already_started, Owner}', ...
-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) ->
    gen_server:start_link(?MODULE, {Name, Opts}, []).

%%%===================================================================
%%% gen_server callbacks
%%%===================================================================

-spec init({atom(), map()}) -> {ok, #state{}} | {stop, term()}.
init({Name, #{backend := cnode, size := Size, max_queue := MaxQueue} = Opts}) ->
    process_flag(trap_exit, true),
    case cnode_start(Name, Opts) of
        {ok, C, Tasks} ->
            Via =
                case C#state.node of
                    undefined -> C#state.port;
                    _ -> distribution
                end,
            Servers = maps:get(servers, Opts),
            Ids = [element(1, S) || S <- Servers],
            case moat_nif:cnode_pool_new(Name, Size, MaxQueue, Via, Tasks, Ids) of
                {ok, Handle} ->
                    {ok, C#state{handle = Handle, servers = Servers =/= []}};
                {error, Reason} ->
                    cnode_close(C),
                    {stop, Reason}
            end;
        {error, Reason} ->
            {stop, Reason}
    end;
init({Name, #{size := Size, max_queue := MaxQueue, libraries := Libs} = Opts}) ->
    process_flag(trap_exit, true),
    #{strategy := Strategy, max_restarts := Intensity, max_seconds := Period,
      servers := Servers} = Opts,
    case moat_nif:pool_new(Name, Size, MaxQueue, Libs) of
        {ok, Handle} ->
            case moat_nif:sup_start(Handle, {Strategy, Intensity, Period}, Servers) of
                ok ->
                    {ok, #state{name = Name, handle = Handle}};
                {error, Reason} ->
                    ok = moat_nif:pool_close(Handle),
                    {stop, Reason}
            end;
        {error, Reason} ->
            {stop, Reason}
    end.

-spec handle_call(term(), gen_server:from(), #state{}) ->
    {reply, {error, badarg}, #state{}}.
handle_call(Request, From, State) ->
    ?LOG_WARNING("moat pool ~p: unexpected call ~0p from ~0p", [State#state.name, Request, From]),
    {reply, {error, badarg}, State}.

-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(Request, State) ->
    ?LOG_WARNING("moat pool ~p: unexpected cast ~0p", [State#state.name, Request]),
    {noreply, State}.

%% Exits from the parent supervisor are handled by gen_server itself (it
%% terminates with that reason); any other linked process exiting is not
%% ours to follow.
-spec handle_info(term(), #state{}) -> {noreply, #state{}} | {stop, shutdown, #state{}}.
handle_info({moat_gave_up, Name, Reason}, #state{name = Name} = State) ->
    gave_up(Reason, State);
handle_info({Port, {data, Frame}}, #state{port = Port} = State) when is_binary(Frame) ->
    deliver(Frame, State);
handle_info({moat_child_crashed, Name}, #state{name = Name, handle = Handle} = State) ->
    {N, Id, Reason} = moat_nif:pool_crashes(Handle),
    moat_telemetry:pool_restart(Name, N, Id, Reason),
    {noreply, crash_report(N, Id, Reason, State)};
handle_info({moat_crash_report, Name}, #state{name = Name} = State) ->
    {noreply, flush_crash_report(State#state{report_timer = false})};
handle_info({moat_cnode_send, Frame}, #state{cpid = CPid} = State) ->
    CPid ! Frame,
    {noreply, State};
handle_info({moat_cnode, CPid, Frame}, #state{cpid = CPid} = State) ->
    deliver(Frame, State);
handle_info({moat_cnode_out, Name}, #state{name = Name, handle = Handle} = State) ->
    ok = moat_nif:cnode_flush(Handle),
    {noreply, State};
handle_info({Port, {data, {_, Line}}}, #state{port = Port} = State) ->
    log_line(State#state.name, Line),
    {noreply, State};
handle_info({Port, {exit_status, Status}}, #state{port = Port} = State) ->
    cnode_lost(exit_status(Status), State);
handle_info({'EXIT', Port, Reason}, #state{port = Port} = State) ->
    cnode_lost({port_exit, Reason}, State);
handle_info({nodedown, Node}, #state{node = Node} = State) when Node =/= undefined ->
    cnode_lost(nodedown, State);
handle_info({'EXIT', CPid, Reason}, #state{cpid = CPid} = State) when CPid =/= undefined ->
    cnode_lost({link, Reason}, State);
handle_info({'EXIT', Pid, Reason}, State) ->
    ?LOG_INFO("moat pool ~p: linked process ~0p exited: ~0p", [State#state.name, Pid, Reason]),
    {noreply, State};
handle_info(Info, State) ->
    ?LOG_WARNING("moat pool ~p: unexpected message ~0p", [State#state.name, Info]),
    {noreply, State}.

-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{name = Name, handle = Handle} = State) ->
    %% Servers stop in order, each running its terminate, while calls to
    %% them still get their replies; then the rest ends.
    stop_servers(State),
    try
        moat_nif:pool_close(Handle)
    catch
        error:badarg ->
            %% The NIF module was deleted and loaded anew since this pool
            %% started, so the new instance does not know this handle. The
            %% NIF still watches this process and closes the pool when it
            %% exits, a moment from now.
            ?LOG_WARNING("moat pool ~p: closed on exit (moat_nif was reloaded)", [Name])
    end,
    %% The tasks have their outcomes: the C-node may go.
    cnode_close(State).

%% The native supervisor reached its intensity and stopped its servers.
%% Exit as an OTP supervisor does when it gives up, so that the one above
%% restarts the pool, under its own intensity.
gave_up(Reason, #state{name = Name} = State) ->
    ?LOG_ERROR(
        #{
            label => {moat, native_supervisor_gave_up},
            pool => Name,
            reason => Reason
        },
        #{domain => [moat]}
    ),
    {stop, shutdown, State}.

%%%===================================================================
%%% Crash reports
%%%===================================================================

%% N native servers crashed, the last one Id with Reason. Reported at
%% once unless a report went out less than ?REPORT_MS ago; then held, and
%% a timer sends the summary when that time is up.
crash_report(0, _Id, _Reason, State) ->
    State;
crash_report(N, Id, Reason, #state{held = Held} = State) ->
    State1 = State#state{held = Held + N, held_last = {Id, Reason}},
    Now = erlang:monotonic_time(millisecond),
    case State#state.reported_at of
        At when is_integer(At), Now - At < ?REPORT_MS ->
            arm_report_timer(State1, ?REPORT_MS - (Now - At));
        _ ->
            flush_crash_report(State1)
    end.

arm_report_timer(#state{report_timer = true} = State, _Ms) ->
    State;
arm_report_timer(#state{name = Name} = State, Ms) ->
    _ = erlang:send_after(Ms, self(), {moat_crash_report, Name}),
    State#state{report_timer = true}.

flush_crash_report(#state{held = 0} = State) ->
    State;
flush_crash_report(#state{name = Name, held = N, held_last = {Id, Reason}} = State) ->
    ?LOG_ERROR(
        #{
            label => {moat, child_terminated},
            pool => Name,
            child => Id,
            reason => Reason,
            crashes => N
        },
        #{domain => [moat], report_cb => fun crash_report_text/1}
    ),
    State#state{held = 0, held_last = undefined, reported_at = erlang:monotonic_time(millisecond)}.

crash_report_text(#{pool := Pool, child := Id, reason := Reason, crashes := 1}) ->
    {"moat pool ~p: native server ~0p crashed: ~0p", [Pool, Id, Reason]};
crash_report_text(#{pool := Pool, child := Id, reason := Reason, crashes := N}) ->
    {"moat pool ~p: native servers crashed ~b times since the last report; the last, ~0p: ~0p",
        [Pool, N, Id, Reason]}.

%%%===================================================================
%%% The C-node
%%%===================================================================

%% Starts the pool's C-node (or reaches it, over distribution) and waits
%% for its answer to hello.
cnode_start(Name, Opts) ->
    Deadline = erlang:monotonic_time(millisecond) + ?HELLO_TIMEOUT,
    case maps:get(transport, Opts, port) of
        port ->
            PortOpts = [{packet, 4}, binary, exit_status, use_stdio, hide],
            case cnode_spawn(PortOpts) of
                {ok, Port} ->
                    true = port_command(Port, term_to_binary({hello, hello(Name, Opts)})),
                    await_ready(Name, #state{name = Name, port = Port}, Deadline);
                Error ->
                    Error
            end;
        Transport ->
            case erlang:is_alive() of
                true -> dist_start(Name, Transport, Opts, Deadline);
                false -> {error, {distribution, not_alive}}
            end
    end.

cnode_spawn(PortOpts) ->
    Exe = filename:join(code:priv_dir(moat), "moat_cnode"),
    try
        {ok, open_port({spawn_executable, Exe}, PortOpts)}
    catch
        error:Why -> {error, {cnode_spawn, Why}}
    end.

hello(Name, Opts) ->
    #{size := Size, max_queue := MaxQueue, libraries := Libs, isolation := Isolation} = Opts,
    Hello = #{
        size => Size,
        max_queue => MaxQueue,
        libraries => [path_binary(L) || L <- Libs],
        isolation => Isolation,
        name => Name,
        max_restarts => maps:get(max_restarts, Opts),
        max_seconds => maps:get(max_seconds, Opts)
    },
    Servers =
        case maps:get(servers, Opts) of
            [] -> #{};
            Specs -> #{servers => Specs, strategy => maps:get(strategy, Opts)}
        end,
    maps:merge(maps:merge(Hello, Servers), maps:with([max_memory, spares], Opts)).

%% Distribution: a C-node of our own, named after the pool and this OS
%% process, or the one at Node.
dist_start(Name, distribution, Opts, Deadline) ->
    Node = cnode_node_name(Name),
    Env = [{"MOAT_NODE", atom_to_list(Node)}, {"MOAT_COOKIE", atom_to_list(erlang:get_cookie())}],
    PortOpts = [{line, 1024}, binary, exit_status, use_stdio, stderr_to_stdout, hide, {env, Env}],
    case cnode_spawn(PortOpts) of
        {ok, Port} ->
            C = #state{name = Name, port = Port, node = Node},
            case await_listening(C, Deadline) of
                ok ->
                    dist_hello(C, Opts, Deadline);
                Error ->
                    cnode_close(C),
                    Error
            end;
        Error ->
            Error
    end;
dist_start(Name, {distribution, Node}, Opts, Deadline) ->
    case dist_connect(Node, Deadline) of
        ok ->
            case dist_hello(#state{name = Name, node = Node}, Opts, Deadline) of
                {error, {cnode_exit, nodedown}} = Error ->
                    %% Connected to a server's session just as it ended:
                    %% the next one is starting.
                    case erlang:monotonic_time(millisecond) < Deadline of
                        true ->
                            timer:sleep(50),
                            dist_start(Name, {distribution, Node}, Opts, Deadline);
                        false ->
                            Error
                    end;
                Result ->
                    Result
            end;
        Error ->
            Error
    end.

cnode_node_name(Name) ->
    Safe = [
        case C of
            _ when C >= $a, C =< $z; C >= $A, C =< $Z; C >= $0, C =< $9; C =:= $_ -> C;
            _ -> $_
        end
     || C <- lists:sublist(atom_to_list(Name), 100)
    ],
    [_, Host] = string:split(atom_to_list(node()), "@"),
    Alive = lists:concat(["moat_", Safe, "_", os:getpid(), "_", cnode_generation(Name)]),
    list_to_atom(Alive ++ "@" ++ Host).

%% Which of NAMES_PER_POOL names this start of pool Name's C-node takes:
%% each start takes the next, so that a new C-node does not meet the name
%% its predecessor may still hold in epmd, and a pool that keeps losing
%% its C-node makes no more than NAMES_PER_POOL atoms. The counter lives
%% as long as the VM (one persistent_term per pool name, written once).
cnode_generation(Name) ->
    Key = {?MODULE, cnode_generation, Name},
    Counter =
        case persistent_term:get(Key, undefined) of
            undefined ->
                C = atomics:new(1, []),
                persistent_term:put(Key, C),
                C;
            C ->
                C
        end,
    atomics:add_get(Counter, 1, 1) rem ?NAMES_PER_POOL.

%% A server between two sessions (its next session's child starting)
%% refuses connections for a moment: retry until the deadline.
dist_connect(Node, Deadline) ->
    case net_kernel:connect_node(Node) of
        true ->
            ok;
        _ ->
            case erlang:monotonic_time(millisecond) < Deadline of
                true ->
                    timer:sleep(50),
                    dist_connect(Node, Deadline);
                false ->
                    {error, {cnode_unreachable, Node}}
            end
    end.

%% The C-node we started says on stdout when its name is published.
await_listening(#state{name = Name, port = Port} = C, Deadline) ->
    Wait = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, {eol, <<"moat_cnode listening">>}}} ->
            ok;
        {Port, {data, {_, Line}}} ->
            log_line(Name, Line),
            await_listening(C, Deadline);
        {Port, {exit_status, Status}} ->
            {error, {cnode_exit, exit_status(Status)}}
    after Wait ->
        {error, {cnode_start, timeout}}
    end.

dist_hello(#state{name = Name, node = Node} = C, Opts, Deadline) ->
    true = erlang:monitor_node(Node, true),
    {moat, Node} ! term_to_binary({hello, hello(Name, Opts)}),
    case await_ready(Name, C, Deadline) of
        {ok, #state{cpid = CPid} = C1, Tasks} ->
            %% The C-node ends the session when this process exits.
            true = link(CPid),
            {ok, C1, Tasks};
        Error ->
            cnode_close(C),
            Error
    end.

%% The answer to hello: over the port, or from the C-node's node.
await_ready(Name, #state{port = Port, node = Node} = C, Deadline) ->
    Wait = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, {_, Line}}} when Port =/= undefined ->
            log_line(Name, Line),
            await_ready(Name, C, Deadline);
        {Port, {data, Frame}} when Port =/= undefined, Node =:= undefined ->
            ready_frame(Name, Frame, C, Deadline);
        {moat_cnode, CPid, Frame} when node(CPid) =:= Node, is_binary(Frame) ->
            ready_frame(Name, Frame, C#state{cpid = CPid}, Deadline);
        {Port, {exit_status, Status}} when Port =/= undefined ->
            {error, {cnode_exit, exit_status(Status)}};
        {nodedown, Node} when Node =/= undefined ->
            {error, {cnode_exit, nodedown}}
    after Wait ->
        cnode_close(C),
        {error, {cnode_start, timeout}}
    end.

ready_frame(Name, Frame, #state{port = Port} = C, Deadline) ->
    %% Not [safe]: the answer to hello brings task names, which become
    %% atoms (callers name tasks by atom); one frame per C-node start.
    case catch binary_to_term(Frame) of
        {ready, OsPid, Tasks} when is_integer(OsPid), is_list(Tasks) ->
            {ok, C#state{os_pid = OsPid}, Tasks};
        {error, Reason} ->
            %% The C-node exits (status 2) after saying why.
            Port =:= undefined orelse
                receive
                    {Port, {exit_status, _}} -> ok
                after 1000 -> catch port_close(Port)
                end,
            {error, Reason};
        {log, _, _} = Log ->
            _ = cnode_frame(Log, C),
            await_ready(Name, C, Deadline);
        Other ->
            cnode_close(C),
            {error, {cnode_protocol, Other}}
    end.

path_binary(Path) when is_binary(Path) -> Path;
path_binary(Path) -> unicode:characters_to_binary(Path).

%% A packet of the C-node: the NIF settles tasks with it, or hands it
%% back.
deliver(Frame, #state{handle = Handle} = State) ->
    case moat_nif:cnode_deliver(Handle, Frame) of
        ok ->
            {noreply, State};
        {other, Term} ->
            cnode_frame(Term, State);
        {error, bad_frame} ->
            log_bad_frame(Frame, State),
            {noreply, State}
    end.

%% A frame the NIF did not take: logs from the C-node (its own, and what
%% its task libraries wrote to stderr), and its native supervisor's
%% reports.
cnode_frame({log, Level, Message}, #state{name = Name} = State) when
    (Level =:= error orelse Level =:= warning orelse Level =:= info), is_binary(Message)
->
    logger:log(Level, "moat pool ~p: C-node: ~ts", [Name, Message], #{domain => [moat]}),
    {noreply, State};
cnode_frame({crashed, N, Id, Reason}, #state{name = Name} = State) when is_integer(N), N > 0 ->
    moat_telemetry:pool_restart(Name, N, Id, Reason),
    {noreply, crash_report(N, Id, Reason, State)};
cnode_frame({gave_up, Reason}, State) ->
    gave_up(Reason, State);
cnode_frame({servers_stopped}, State) ->
    {noreply, State};
cnode_frame(Other, #state{name = Name} = State) ->
    ?LOG_WARNING("moat pool ~p: unexpected frame from the C-node: ~0p", [Name, Other]),
    {noreply, State}.

%% Asks the C-node to stop its servers (its tasks end first) and waits
%% until it has, or is gone, handling its frames meanwhile: calls to the
%% servers being stopped get their replies.
stop_servers(#state{servers = false}) ->
    ok;
stop_servers(#state{port = undefined, cpid = undefined}) ->
    ok;
stop_servers(#state{handle = undefined}) ->
    ok;
stop_servers(State) ->
    cnode_send(term_to_binary({stop_servers}), State),
    await_stopped(State).

cnode_send(Frame, #state{node = undefined, port = Port}) ->
    catch port_command(Port, Frame),
    ok;
cnode_send(Frame, #state{cpid = CPid}) ->
    CPid ! Frame,
    ok.

await_stopped(#state{name = Name, port = Port, cpid = CPid, node = Node, handle = Handle} = State) ->
    Frame =
        receive
            {Port, {data, F}} when is_binary(F), Node =:= undefined -> F;
            {moat_cnode, CPid, F} when is_binary(F) -> F;
            {Port, {data, {_, Line}}} -> log_line(Name, Line), none;
            {moat_cnode_send, F} when CPid =/= undefined -> CPid ! F, none;
            {moat_cnode_out, Name} -> ok = moat_nif:cnode_flush(Handle), none;
            {Port, {exit_status, _}} -> gone;
            {'EXIT', Port, _} -> gone;
            {nodedown, Node} -> gone;
            {'EXIT', CPid, _} -> gone
        end,
    case Frame of
        gone ->
            ok;
        none ->
            await_stopped(State);
        _ ->
            case moat_nif:cnode_deliver(Handle, Frame) of
                {other, {servers_stopped}} ->
                    ok;
                {other, Term} ->
                    _ = cnode_frame(Term, State),
                    await_stopped(State);
                _ ->
                    await_stopped(State)
            end
    end.

%% A line a C-node over distribution wrote to stdout or stderr.
log_line(Name, Line) ->
    logger:warning("moat pool ~p: C-node: ~ts", [Name, Line], #{domain => [moat]}).

log_bad_frame(Frame, #state{name = Name}) ->
    ?LOG_ERROR("moat pool ~p: malformed frame from the C-node (~b bytes)", [Name, byte_size(Frame)]).

%% The C-node ended under the pool: its tasks end with
%% {native_crash, cnode_down} (noconnection over distribution) and the
%% pool's supervisor starts a new one.
cnode_lost(How, #state{name = Name, handle = Handle} = State) ->
    Reason =
        case State#state.node of
            undefined -> {native_crash, cnode_down};
            _ -> noconnection
        end,
    ok = moat_nif:cnode_lost(Handle, Reason),
    ?LOG_ERROR(
        #{label => {moat, cnode_down}, pool => Name, how => How, os_pid => State#state.os_pid},
        #{domain => [moat]}
    ),
    {stop, {shutdown, {cnode_down, How}}, State#state{port = undefined, cpid = undefined}}.

%% An exit status as the C-node's end: 128 + N is signal N.
exit_status(Status) when Status > 128 -> {signal, signal_name(Status - 128)};
exit_status(Status) -> {exit_status, Status}.

signal_name(6) -> sigabrt;
signal_name(9) -> sigkill;
signal_name(11) -> sigsegv;
signal_name(7) -> sigbus;
signal_name(8) -> sigfpe;
signal_name(4) -> sigill;
signal_name(15) -> sigterm;
signal_name(N) -> N.

%% Closing the port ends a C-node we started (stdin's end); a server
%% started by hand ends the session when this process exits (the link).
cnode_close(#state{port = undefined}) ->
    ok;
cnode_close(#state{port = Port}) ->
    catch port_close(Port),
    ok.
