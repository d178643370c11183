%%% @doc Run native C tasks on supervised pools, with Elixir `Task' semantics.
%%%
%%% A pool runs the tasks of its task libraries (shared objects written
%%% against `include/moat.h'; `moat_demo' is built in) on its own threads.
%%% Start one with {@link start_pool/2} or put {@link child_spec/1} in your
%%% own supervision tree, then call tasks by name:
%%%
%%% ```
%%% {ok, _} = moat:start_pool(p, #{size => 4}),
%%% T = moat:async(p, fib, [30]),
%%% 832040 = moat:await(T),
%%% {ok, ok} = moat:run(p, sleep, [10]),
%%% [{ok, 1}, {ok, 2}] = moat:async_stream(p, echo, [1, 2], #{}).
%%% '''
%%%
%%% Every task started with {@link async/4} gets exactly one outcome message
%%% to its owner: `{Ref, Result}' on success, else
%%% `{'DOWN', Ref, process, Id, Reason}', refusals included (`noproc' when
%%% the pool is not running, `overloaded' when its queue is full,
%%% `{unknown_task, Name}'). Once {@link await/2} times out, or
%%% {@link shutdown/2} or {@link ignore/1} return, no message about that
%%% task arrives any more.
%%%
%%% Known failures are values: no call raises because a pool is down,
%%% restarting, full or missing. Wrong argument types and bad options raise
%%% `badarg'. The deliberate exceptions are Elixir's: `await' exits when
%%% the task failed or timed out, `async_stream' with `on_timeout => exit'
%%% exits its caller, and a linked task's failure is an exit signal.
%%%
%%% Native code cannot be preempted. A task that never checks
%%% `moat_should_stop()' is abandoned, not killed, when it is cancelled:
%%% its outcome is decided at once, its late result is discarded, and its
%%% thread stays busy until the body returns (the pool starts a replacement
%%% thread meanwhile). A hard fault in a task (a segfault) kills the VM in
%%% this backend; the C-node backend is the one that survives those.
-module(moat).

-export([start_pool/2, stop_pool/1, child_spec/1, stats/1]).
-export([async/3, async/4, await/1, await/2, yield/2, yield_many/2]).
-export([shutdown/1, shutdown/2, ignore/1, run/3, run/4]).
-export([async_stream/4, stream/4]).
-export([call/3, call/4, cast/3, which_children/1, count_children/1]).

-export_type([task/0, pool/0, outcome/0, stats/0]).

-type pool() :: atom().
-type task() :: #{
    ref := reference(),
    pool := pool(),
    id := term(),
    owner := pid(),
    pid := pid() | undefined
}.
-type outcome() :: {ok, term()} | {exit, term()}.
-type stats() :: #{
    failed_by := #{native_error | native_crash | badarg | noconnection | exit => non_neg_integer()},
    latency_ns := #{count | p50 | p90 | p99 | p999 | max => non_neg_integer()},
    atom() => non_neg_integer()
}.

-define(DEFAULT_TIMEOUT, 5000).

%%%===================================================================
%%% Pools
%%%===================================================================

%% @doc Starts pool `Name' under moat's own supervisor.
%%
%% The pool's supervisor restarts it (up to `max_restarts' in
%% `max_seconds'); past that the pool is gone, its callers get `noproc',
%% and other pools are not affected. To have a pool that gives up take
%% your application's supervisor with it instead, put
%% {@link child_spec/1} in your own tree.
%%
%% Options (a map or a proplist): `size' (threads; default: schedulers
%% online), `max_queue' (tasks waiting beyond the threads before new ones
%% are `overloaded'; 65536), `libraries' (task libraries: a path to a
%% `.so', `{priv, App, File}' or `moat_demo'; default `[moat_demo]'),
%% `max_restarts' and `max_seconds' (3 in 5 s: the restart intensity of
%% the pool's native supervisor, and of the OTP supervisor that restarts
%% the pool when the native one gives up), `backend' (`nif', the default:
%% tasks run on threads inside the VM; or `cnode': they run in a
%% `moat_cnode' OS process the pool starts, so that a hard fault costs that
%% process and its tasks, each with `{native_crash, cnode_down}', and the
%% pool's supervisor starts a new one; see doc/cnode.md) and `isolation'
%% (`thread', the default, or, with `cnode', `process': each task runs in
%% a worker process of the C-node, so that a fault ends only that task,
%% with `{native_crash, Signal}'; then `max_memory' caps each worker's
%% memory in bytes and `spares' (1) is how many idle workers are kept
%% ready beyond `size'), and `transport' (with `cnode': `port', the
%% default, frames over the C-node's stdio; `distribution', the C-node
%% joins this node as a hidden node, which must be alive (else
%% `{error, {distribution, not_alive}}'); or `{distribution, Node}', the
%% pool is served by `Node', a `moat_cnode --serve' started by hand, here
%% or on another host (its libraries are then paths on that host). Over
%% distribution a lost C-node ends each task it held with `noconnection'.)
%% Bad options raise `badarg'; a library that cannot be loaded is
%% `{error, {bad_library, Message}}'.
%%
%% Native servers (see {@link call/4}): `servers' is a list of child
%% specs, each a map or proplist with `id' (any term, unique), `start'
%% (`{Lib, Server, Args}': server `Server' of task library `Lib', in the
%% same forms as `libraries' (added to them if absent), started with the
%% argument list `Args'), `restart' (`permanent' (default), `transient' or
%% `temporary') and `shutdown' (ms, 5000 by default, `brutal_kill' or
%% `infinity'); `strategy' is the native supervisor's (`one_for_one'
%% (default), `one_for_all' or `rest_for_one'). They start in list order,
%% before this returns; one that fails to start fails the pool with
%% `{error, {shutdown, {failed_to_start_child, Id, Reason}}}'. With
%% `backend => cnode' they run in the C-node, under its native supervisor
%% (a fault that costs the C-node costs them too: the pool restarts with
%% them at their initial state); in process isolation they run in a
%% worker process of their own, beside the task workers, so that a task's
%% fault leaves them as they are, and a hard fault of theirs is their
%% supervisor giving up (see doc/cnode.md).
-spec start_pool(pool(), map() | proplists:proplist()) ->
    {ok, pid()} | {error, {already_started, pid()} | term()}.
start_pool(Name, Opts) when is_atom(Name) ->
    %% Temporary under moat_sup: a pool whose own supervisor gives up is
    %% gone, and neither the other pools nor moat go with it.
    Spec = (child_spec(maps:put(name, Name, opts_map(Opts))))#{restart := temporary},
    case supervisor:start_child(moat_sup, Spec) of
        {ok, Pid} ->
            {ok, Pid};
        {error, {already_started, Pid}} ->
            {error, {already_started, Pid}};
        {error, already_present} ->
            %% A spec left behind by a pool that failed to restart.
            _ = supervisor:delete_child(moat_sup, {moat, Name}),
            start_pool(Name, Opts);
        {error, Reason} ->
            {error, start_error(Reason)}
    end;
start_pool(_, _) ->
    error(badarg).

%% @doc Stops a pool started with {@link start_pool/2}. Returns once every
%% task still pending has had its DOWN with reason `shutdown'; threads busy
%% in abandoned tasks exit when those return.
-spec stop_pool(pool()) -> ok | {error, not_found}.
stop_pool(Name) when is_atom(Name) ->
    case supervisor:terminate_child(moat_sup, {moat, Name}) of
        ok ->
            _ = supervisor:delete_child(moat_sup, {moat, Name}),
            ok;
        {error, not_found} ->
            {error, not_found}
    end;
stop_pool(_) ->
    error(badarg).

%% @doc A child spec that runs a pool in the caller's own supervision tree.
%% `Opts' are those of {@link start_pool/2} plus `name' (required). The
%% child's id is `{moat, Name}'. From Elixir: `{:moat, name: :p, size: 4}'
%% in a children list.
-spec child_spec(map() | proplists:proplist()) -> supervisor:child_spec().
child_spec(Opts0) ->
    Opts = opts_map(Opts0),
    case maps:take(name, Opts) of
        {Name, Rest} when is_atom(Name) ->
            Valid = pool_opts(Rest),
            #{
                id => {moat, Name},
                start => {moat_pool_sup, start_link, [Name, Valid]},
                restart => permanent,
                shutdown => infinity,
                type => supervisor,
                modules => [moat_pool_sup]
            };
        _ ->
            error(badarg)
    end.

%% @doc Counters of a running pool: `queued' and `running' (now),
%% `completed', `failed', `cancelled', `timeouts', `rejected' (since the
%% pool started), `abandoned' and `threads' (now), `restarts' (of native
%% servers) and `size'. Calls to native servers count as tasks: a reply
%% is `completed', any other outcome `failed' (or `timeouts').
%%
%% `failed_by' splits the failures by the class of their reason:
%% `native_error' (`{native_error, _}'), `native_crash'
%% (`{native_crash, _}'), `badarg', `noconnection' (a C-node over
%% distribution lost) and `exit' (any other reason of the task's own).
%% `latency_ns' is the distribution of the time from each submit to its
%% outcome, whatever the outcome, since the pool started: `count', and
%% `p50', `p90', `p99', `p999' and `max' in nanoseconds, each to within
%% 6.25% (a log-linear histogram; 0 before the first outcome).
-spec stats(pool()) -> stats() | {error, not_found}.
stats(Name) when is_atom(Name) ->
    moat_nif:pool_stats(Name);
stats(_) ->
    error(badarg).

%%%===================================================================
%%% Tasks
%%%===================================================================

%% @equiv async(Pool, Task, Args, #{})
-spec async(pool(), atom(), list()) -> task().
async(Pool, Task, Args) ->
    async(Pool, Task, Args, #{}).

%% @doc Starts native task `Task' with `Args' on `Pool' and returns at once.
%%
%% The caller owns the task and gets exactly one message about it (see the
%% module doc). Options: `timeout' (ms or `infinity', the default): past
%% it the task is cancelled and its outcome is a DOWN with reason
%% `timeout'; `link' (`false'): link the caller to a process that stands
%% for the task, which exits with the task's reason (`normal' on success),
%% so a failure reaches a trapping caller as `{'EXIT', Pid, Reason}' and
%% kills one that does not trap; the caller's death cancels the task
%% either way.
-spec async(pool(), atom(), list(), map() | proplists:proplist()) -> task().
%% The proxy's fun never returns (the process exits with the task's reason).
-dialyzer({nowarn_function, async/4}).
async(Pool, Task, Args, Opts) when is_atom(Pool), is_atom(Task), is_list(Args) ->
    {Link, Timeout} = task_opts(Opts),
    _ = length(Args), % an improper list is badarg before anything starts
    Owner = self(),
    Start = moat_telemetry:start_time(),
    T =
        case Link of
            false ->
                {Ref, Id} = moat_nif:async(Pool, Task, Args, Timeout, undefined),
                #{ref => Ref, pool => Pool, id => Id, owner => Owner, pid => undefined};
            true ->
                Proxy = spawn_link(fun() -> proxy(Owner) end),
                {Ref, Id} = moat_nif:async(Pool, Task, Args, Timeout, Proxy),
                #{ref => Ref, pool => Pool, id => Id, owner => Owner, pid => Proxy}
        end,
    case Start of
        undefined -> T;
        _ -> T#{task => Task, start => Start}
    end;
async(_, _, _, _) ->
    error(badarg).

%% @equiv await(T, 5000)
-spec await(task()) -> term().
await(T) ->
    await(T, ?DEFAULT_TIMEOUT).

%% @doc Waits for the task's result, as `Task.await/2' does.
%%
%% Exits with `{Reason, {moat, await, [T, Timeout]}}' if the task failed,
%% and with `{timeout, {moat, await, [T, Timeout]}}' if no outcome came in
%% time; the task is then cancelled and no message about it follows.
-spec await(task(), timeout()) -> term().
await(#{ref := Ref} = T, Timeout) ->
    owner_only(T),
    check_timeout(Timeout),
    Timeout =:= 0 orelse nearly_done(T),
    receive
        {Ref, Reply} ->
            _ = consumed(T, {ok, Reply}),
            Reply;
        {'DOWN', Ref, process, _, Reason} ->
            _ = consumed(T, {exit, Reason}),
            exit({Reason, {moat, await, [T, Timeout]}})
    after Timeout ->
        case give_up(T, shutdown) of
            cancelled ->
                exit({timeout, {moat, await, [T, Timeout]}});
            delivered ->
                %% The outcome won the race: it is in the mailbox now.
                case take(T) of
                    {ok, Reply} -> Reply;
                    {exit, Reason} -> exit({Reason, {moat, await, [T, Timeout]}});
                    nil -> exit({timeout, {moat, await, [T, Timeout]}})
                end
        end
    end;
await(_, _) ->
    error(badarg).

%% @doc Waits up to `Timeout' for the task's outcome: `{ok, Result}',
%% `{exit, Reason}', or `nil' if none came (the task runs on; yield again).
-spec yield(task(), timeout()) -> outcome() | nil.
yield(#{ref := Ref} = T, Timeout) ->
    owner_only(T),
    check_timeout(Timeout),
    receive
        {Ref, Reply} -> consumed(T, {ok, Reply});
        {'DOWN', Ref, process, _, Reason} -> consumed(T, {exit, Reason})
    after Timeout -> nil
    end;
yield(_, _) ->
    error(badarg).

%% @doc Waits up to `Timeout' in all for the outcomes of several tasks.
%% Returns `[{T, {ok, R} | {exit, R} | nil}]' in the order of `Tasks'.
-spec yield_many([task()], timeout()) -> [{task(), outcome() | nil}].
yield_many(Tasks, Timeout) when is_list(Tasks) ->
    check_timeout(Timeout),
    Pending = maps:from_list([{task_ref(T), nil} || T <- Tasks]),
    Deadline =
        case Timeout of
            infinity -> infinity;
            _ -> erlang:monotonic_time(millisecond) + Timeout
        end,
    Got = collect_many(Pending, maps:size(Pending), Deadline),
    [{T, consumed(T, maps:get(Ref, Got))} || #{ref := Ref} = T <- Tasks];
yield_many(_, _) ->
    error(badarg).

%% @equiv shutdown(T, 5000)
-spec shutdown(task()) -> outcome() | nil.
shutdown(T) ->
    shutdown(T, ?DEFAULT_TIMEOUT).

%% @doc Stops the task, as `Task.shutdown/2' does: `{ok, R}' or
%% `{exit, R}' if its outcome was already there, `nil' if moat's own
%% cancellation ended it. With a timeout the task is asked to stop; a
%% body that has not returned after `Timeout' ms is abandoned (in a
%% C-node's process isolation, its worker is killed) and the answer is
%% `{exit, killed}'. With `brutal_kill' the task is abandoned at
%% once (`nil'). `{exit, noproc}' if its outcome was already consumed.
-spec shutdown(task(), timeout() | brutal_kill) -> outcome() | nil.
shutdown(#{ref := Ref} = T, How) ->
    owner_only(T),
    How =:= brutal_kill orelse check_timeout(How),
    unlink_proxy(T),
    case take(T) of
        nil ->
            Reason =
                case How of
                    brutal_kill -> killed;
                    _ -> shutdown
                end,
            Result =
                case moat_nif:task_cancel(Ref, Reason) of
                    cancelled when How =:= brutal_kill ->
                        nil;
                    cancelled ->
                        case wait_stopped(Ref, How) of
                            true ->
                                nil;
                            false ->
                                %% In a C-node's process isolation the
                                %% kill is real; elsewhere the body runs
                                %% on, abandoned.
                                ok = moat_nif:task_kill(Ref),
                                {exit, killed}
                        end;
                    delivered ->
                        case take(T) of
                            nil -> {exit, noproc};
                            Outcome -> Outcome
                        end
                end,
            kill_proxy(T),
            Result;
        Outcome ->
            kill_proxy(T),
            Outcome
    end;
shutdown(_, _) ->
    error(badarg).

%% @doc Lets the task run to completion and discards its outcome, as
%% `Task.ignore/1' does: `{ok, R}' or `{exit, R}' if the outcome is
%% already there, else `nil'; no message about the task arrives later. A
%% linked task is unlinked first; its process ends when the task does.
-spec ignore(task()) -> outcome() | nil.
ignore(#{ref := Ref} = T) ->
    owner_only(T),
    unlink_proxy(T),
    case moat_nif:task_ignore(Ref) of
        ignored -> nil;
        delivered -> take(T)
    end;
ignore(_) ->
    error(badarg).

%% @equiv run(Pool, Task, Args, 5000)
-spec run(pool(), atom(), list()) -> outcome().
run(Pool, Task, Args) ->
    run(Pool, Task, Args, ?DEFAULT_TIMEOUT).

%% @doc Runs a task and waits for it: `{ok, Result}' or `{exit, Reason}'.
%% Never raises for a failed, refused or late task: past `Timeout' the
%% task is cancelled and the answer is `{exit, timeout}'.
-spec run(pool(), atom(), list(), timeout()) -> outcome().
run(Pool, Task, Args, Timeout) when is_atom(Pool), is_atom(Task), is_list(Args) ->
    check_timeout(Timeout),
    Start = moat_telemetry:start_time(),
    Outcome = settled(moat_nif:run(Pool, Task, Args, Timeout)),
    Start =:= undefined orelse moat_telemetry:task_outcome(Pool, Task, Start, Outcome),
    Outcome;
run(_, _, _, _) ->
    error(badarg).

%% The outcome of run/4 or call/4. The NIF waits a few microseconds for a
%% short task's outcome; else ({wait, Ref}) it comes as a message. The
%% pool's own deadline ends the task, so exactly one comes either way.
settled({wait, Ref}) ->
    receive
        {Ref, Reply} -> {ok, Reply};
        {'DOWN', Ref, process, _, Reason} -> {exit, Reason}
    end;
settled(Outcome) ->
    Outcome.

%%%===================================================================
%%% Native servers
%%%===================================================================

%% @equiv call(Pool, Server, Request, 5000)
-spec call(pool(), term(), term()) -> outcome().
call(Pool, Server, Request) ->
    call(Pool, Server, Request, ?DEFAULT_TIMEOUT).

%% @doc Calls native server `Server' of `Pool' (its `id' in the pool's
%% `servers') and waits for the reply: `{ok, Reply}' or `{exit, Reason}'.
%%
%% Never raises for a failed call: `{exit, noproc}' when the pool or the
%% server is not running (restarting, ended, or no such id),
%% `{exit, timeout}' past `Timeout' (the server still handles the request,
%% but its late reply is dropped: no message follows), and the server's
%% exit reason when it ends before replying (it crashed on this request or
%% an earlier one, or stopped), e.g. `{exit, {native_error, <<"crash">>}}'.
%% Requests to one server are handled one at a time, in order, on the
%% pool's threads.
-spec call(pool(), term(), term(), timeout()) -> outcome().
call(Pool, Server, Request, Timeout) when is_atom(Pool) ->
    check_timeout(Timeout),
    settled(moat_nif:call(Pool, Server, Request, Timeout));
call(_, _, _, _) ->
    error(badarg).

%% @doc Sends `Request' to native server `Server' of `Pool' without
%% waiting. Always `ok': a cast to a server that is not running is
%% dropped, as `gen_server:cast/2' drops it.
-spec cast(pool(), term(), term()) -> ok.
cast(Pool, Server, Request) when is_atom(Pool) ->
    moat_nif:cast(Pool, Server, Request);
cast(_, _, _) ->
    error(badarg).

%% @doc The pool's native servers in start order, as
%% `supervisor:which_children/1' lists them, with `running' in place of
%% the pid: `restarting' while a restart is pending (also for every server
%% from the moment the native supervisor gives up until the pool is
%% restarted), `undefined' for a child that ended and is not restarted.
%% With `backend => cnode' the C-node answers (within 5 s); while it
%% cannot (lost, or between C-nodes) every server is `restarting'.
-spec which_children(pool()) ->
    [{term(), running | restarting | undefined, worker | supervisor}]
    | {error, not_found}.
which_children(Pool) when is_atom(Pool) ->
    children(moat_nif:which_children(Pool));
which_children(_) ->
    error(badarg).

%% @doc Counts of the pool's native servers, as
%% `supervisor:count_children/1' gives them.
-spec count_children(pool()) ->
    #{specs := non_neg_integer(), active := non_neg_integer(),
      supervisors := non_neg_integer(), workers := non_neg_integer()}
    | {error, not_found}.
count_children(Pool) when is_atom(Pool) ->
    children(moat_nif:count_children(Pool));
count_children(_) ->
    error(badarg).

%% A C-node pool's servers run in its C-node, which answers for them like
%% a call; while it cannot (a C-node lost or restarting), every server is
%% restarting.
children({remote, Outcome, Fallback}) ->
    case settled(Outcome) of
        {ok, Answer} -> Answer;
        {exit, _} -> Fallback
    end;
children(Local) ->
    Local.

%%%===================================================================
%%% Streams
%%%===================================================================

-record(st, {
    s :: reference(),
    inputs :: list(),
    next = 0 :: non_neg_integer(),
    inflight = 0 :: non_neg_integer(),
    max :: pos_integer(),
    ordered :: boolean(),
    timeout :: timeout(),
    on_timeout :: exit | kill_task,
    zip :: boolean(),
    % index => input of tasks in flight (zip_input_on_exit only)
    zipped = #{} :: #{non_neg_integer() => term()},
    % ordered: index => element not yet emitted
    held = #{} :: #{non_neg_integer() => outcome()},
    emit = 0 :: non_neg_integer(),
    ready = [] :: [outcome()],
    % telemetry: the pool and task of each element, when it is on
    tel = undefined :: {pool(), atom()} | undefined
}).

%% @doc Runs `Task' once for each input (`Args = [Input]') with at most
%% `max_concurrency' in flight, and returns every element, like
%% `Task.Supervisor.async_stream_nolink/4' followed by `Enum.to_list/1'.
%%
%% `Inputs' is a list or, from Elixir, any finite Enumerable (read in full
%% before the first task starts). Elements are `{ok, Result}' or
%% `{exit, Reason}'. Options:
%% `max_concurrency' (default: the pool's size), `ordered' (`true'),
%% `timeout' (5000 ms per task, counted from when the stream submits it,
%% or `infinity'), `on_timeout' (`exit': the caller exits with
%% `{timeout, {moat, async_stream, [Timeout]}}' after every task of the
%% stream is cancelled; `kill_task': that element is `{exit, timeout}'),
%% `zip_input_on_exit' (`false'; `true' makes failed elements
%% `{exit, {Input, Reason}}').
-spec async_stream(pool(), atom(), list() | term(), map() | proplists:proplist()) ->
    [outcome()].
async_stream(Pool, Task, Inputs0, Opts) when is_atom(Pool), is_atom(Task) ->
    Inputs = input_list(Inputs0),
    St = stream_start(Pool, Task, Inputs, stream_opts(Pool, Opts)),
    drain(St, []);
async_stream(_, _, _, _) ->
    error(badarg).

%% @doc The lazy form of {@link async_stream/4}: same options and elements,
%% as a function in Elixir's reducer protocol, so `Stream' and `Enum'
%% functions work on it (`Enum.take(:moat.stream(p, :echo, 1..10 |> Enum.to_list(), []), 3)').
%% Nothing runs until it is reduced, and it runs in the reducing process.
%% Halting early cancels the tasks not yet consumed and leaves no message
%% behind.
-spec stream(pool(), atom(), list() | term(), map() | proplists:proplist()) ->
    fun((term(), fun()) -> term()).
stream(Pool, Task, Inputs, Opts) when is_atom(Pool), is_atom(Task) ->
    is_list(Inputs) orelse elixir_enumerable(Inputs) orelse error(badarg),
    O = stream_opts(Pool, Opts),
    fun(Acc, Fun) when is_function(Fun, 2) ->
        reduce(stream_start(Pool, Task, input_list(Inputs), O), Acc, Fun)
    end;
stream(_, _, _, _) ->
    error(badarg).

reduce(St, {halt, Acc}, _Fun) ->
    stream_close(St),
    {halted, Acc};
reduce(St, {suspend, Acc}, Fun) ->
    {suspended, Acc, fun(A) -> reduce(St, A, Fun) end};
reduce(St, {cont, Acc}, Fun) ->
    case stream_next(St) of
        done ->
            {done, Acc};
        {Elem, St1} ->
            Next =
                try
                    Fun(Elem, Acc)
                catch
                    Class:Error:Stack ->
                        stream_close(St1),
                        erlang:raise(Class, Error, Stack)
                end,
            reduce(St1, Next, Fun)
    end.

drain(St, Acc) ->
    case stream_next(St) of
        done -> lists:reverse(Acc);
        {Elem, St1} -> drain(St1, [Elem | Acc])
    end.

stream_start(Pool, Task, Inputs, #{max_concurrency := Max0} = O) ->
    %% The NIF keeps a slot per task in flight: no more than there are
    %% inputs, nor than 2^24 (16M tasks in flight).
    Max = max(1, min(Max0, min(length(Inputs), 1 bsl 24))),
    #st{
        s = moat_nif:stream_new(Pool, Task, maps:get(timeout, O), Max),
        tel =
            case moat_telemetry:enabled() of
                true -> {Pool, Task};
                false -> undefined
            end,
        inputs = Inputs,
        max = Max,
        ordered = maps:get(ordered, O),
        timeout = maps:get(timeout, O),
        on_timeout = maps:get(on_timeout, O),
        zip = maps:get(zip_input_on_exit, O)
    }.

%% The next element, or done (the stream is closed then).
stream_next(#st{ready = [E | Rest], tel = undefined} = St) ->
    {E, St#st{ready = Rest}};
stream_next(#st{ready = [E | Rest], tel = {Pool, Task}} = St) ->
    moat_telemetry:task_outcome(Pool, Task, undefined, E),
    {E, St#st{ready = Rest}};
stream_next(#st{inputs = [], inflight = 0} = St) ->
    stream_close(St),
    done;
stream_next(St0) ->
    St = top_up(St0),
    S = St#st.s,
    case St#st.ready of
        [] when not St#st.ordered, not St#st.zip ->
            %% Unordered and unzipped: the NIF makes the elements.
            Taken =
                case moat_nif:stream_take(S, false, true) of
                    {[], 0, _} ->
                        receive
                            {moat_stream, S} -> moat_nif:stream_take(S, true, true)
                        end;
                    Some ->
                        Some
                end,
            stream_next(ready(Taken, St));
        [] ->
            Entries =
                case moat_nif:stream_take(S, false, false) of
                    [] ->
                        receive
                            {moat_stream, S} -> moat_nif:stream_take(S, true, false)
                        end;
                    Some ->
                        Some
                end,
            stream_next(place(Entries, St));
        _ ->
            stream_next(St)
    end.

ready({_, _, true}, #st{on_timeout = exit, timeout = Timeout} = St) ->
    stream_close(St),
    exit({timeout, {moat, async_stream, [Timeout]}});
ready({Elements, N, _}, #st{inflight = Inflight} = St) ->
    St#st{ready = Elements, inflight = Inflight - N}.

%% Submits inputs until max_concurrency are in flight.
top_up(#st{inputs = []} = St) ->
    St;
top_up(#st{inflight = N, max = Max} = St) when N >= Max ->
    St;
top_up(#st{inputs = Inputs, next = Next, inflight = N, max = Max, zip = Zip} = St) ->
    {Chunk, Rest} = split(Max - N, Inputs, []),
    Zipped =
        case Zip of
            true -> zip_inputs(Chunk, Next, St#st.zipped);
            false -> St#st.zipped
        end,
    Refused = moat_nif:stream_submit(St#st.s, Chunk, Next),
    Sent = length(Chunk),
    %% Refused inputs were never in flight: place/2 counts them back.
    place(Refused, St#st{
        inputs = Rest,
        next = Next + Sent,
        inflight = N + Sent,
        zipped = Zipped
    }).

split(0, Rest, Acc) -> {lists:reverse(Acc), Rest};
split(_, [], Acc) -> {lists:reverse(Acc), []};
split(N, [X | Rest], Acc) -> split(N - 1, Rest, [X | Acc]).

zip_inputs([], _, Map) -> Map;
zip_inputs([X | Xs], I, Map) -> zip_inputs(Xs, I + 1, Map#{I => X}).

%% Turns the NIF's outcomes into the elements to emit next, in completion
%% order or, when ordered, in input order. Called with nothing ready.
place(Entries, #st{ready = []} = St) ->
    place(Entries, St, []).

place([], St, Acc) ->
    St#st{ready = lists:reverse(Acc)};
place([Entry | Rest], #st{inflight = N} = St, Acc) ->
    {Index, Elem, St1} = element_of(Entry, St),
    St2 = St1#st{inflight = N - 1},
    case St2#st.ordered of
        false ->
            place(Rest, St2, [Elem | Acc]);
        true ->
            {St3, Acc1} = release(St2#st{held = maps:put(Index, Elem, St2#st.held)}, Acc),
            place(Rest, St3, Acc1)
    end.

release(#st{held = Held, emit = I} = St, Acc) ->
    case maps:take(I, Held) of
        {Elem, Held1} -> release(St#st{held = Held1, emit = I + 1}, [Elem | Acc]);
        error -> {St, Acc}
    end.

element_of({Index, ok, Value}, St) ->
    {Index, {ok, Value}, forget(Index, St)};
element_of({Index, exit, Reason}, St) ->
    {Index, {exit, zip(Index, Reason, St)}, forget(Index, St)};
element_of({Index, timeout}, #st{on_timeout = kill_task} = St) ->
    {Index, {exit, zip(Index, timeout, St)}, forget(Index, St)};
element_of({_Index, timeout}, #st{on_timeout = exit, timeout = Timeout} = St) ->
    stream_close(St),
    exit({timeout, {moat, async_stream, [Timeout]}}).

zip(Index, Reason, #st{zip = true, zipped = Zipped}) ->
    {maps:get(Index, Zipped), Reason};
zip(_, Reason, _) ->
    Reason.

forget(Index, #st{zip = true, zipped = Zipped} = St) ->
    St#st{zipped = maps:remove(Index, Zipped)};
forget(_, St) ->
    St.

%% Cancels what is still in flight and removes the stream's message, if
%% one is in the mailbox: nothing of the stream arrives afterwards.
stream_close(#st{s = S}) ->
    case moat_nif:stream_close(S) of
        true ->
            receive
                {moat_stream, S} -> ok
            after 0 -> ok
            end;
        false ->
            ok
    end.

%%%===================================================================
%%% Internal
%%%===================================================================

%% Inputs as a list: a list as it is; from Elixir, any other Enumerable (a
%% range, a finite Stream) through Enum.to_list/1, read in full first.
input_list(Inputs) when is_list(Inputs) ->
    Inputs;
input_list(Inputs) ->
    case elixir_enumerable(Inputs) of
        true -> 'Elixir.Enum':to_list(Inputs);
        false -> error(badarg)
    end.

elixir_enumerable(Inputs) ->
    code:ensure_loaded('Elixir.Enumerable') =:= {module, 'Elixir.Enumerable'} andalso
        'Elixir.Enumerable':impl_for(Inputs) =/= nil.

%% The process standing for a linked task: it exits with the task's
%% reason when the NIF reports the outcome, or when the owner is gone.
%% The NIF monitors it: if it dies first (killed, say), the task is
%% cancelled and its outcome is `killed', as a BEAM task's would be.
proxy(Owner) ->
    process_flag(trap_exit, true),
    receive
        {moat_task_done, Reason} -> exit(Reason);
        {'EXIT', Owner, Reason} -> exit(Reason)
    end.

unlink_proxy(#{pid := undefined}) ->
    ok;
unlink_proxy(#{pid := Pid}) ->
    unlink(Pid),
    receive
        {'EXIT', Pid, _} -> ok
    after 0 -> ok
    end.

kill_proxy(#{pid := undefined}) -> ok;
kill_proxy(#{pid := Pid}) -> exit(Pid, kill).

%% Gives the task up: unlinks its proxy, then cancels it. `cancelled': no
%% message about it will come; `delivered': its message is in the mailbox.
give_up(#{ref := Ref} = T, Reason) ->
    unlink_proxy(T),
    Result = moat_nif:task_cancel(Ref, Reason),
    kill_proxy(T),
    Result.

%% Gives a short task a few microseconds to finish before the caller
%% blocks: waking a sleeping scheduler costs more than that. Returns at
%% once when the outcome was sent already.
nearly_done(#{ref := Ref}) ->
    moat_nif:task_spin(Ref).

%% The task's outcome if its message is in the mailbox, else nil.
take(#{ref := Ref} = T) ->
    receive
        {Ref, Reply} -> consumed(T, {ok, Reply});
        {'DOWN', Ref, process, _, Reason} -> consumed(T, {exit, Reason})
    after 0 -> nil
    end.

%% An outcome the owner consumed, reported to telemetry when the task was
%% submitted with telemetry on (moat_telemetry).
consumed(#{start := Start, pool := Pool, task := Task}, Outcome) ->
    moat_telemetry:task_outcome(Pool, Task, Start, Outcome),
    Outcome;
consumed(_, Outcome) ->
    Outcome.

%% After a cancel decided the outcome: waits up to Timeout for the body to
%% leave its thread. True when it did (it heeded the stop request).
wait_stopped(Ref, Timeout) ->
    Deadline =
        case Timeout of
            infinity -> infinity;
            _ -> erlang:monotonic_time(millisecond) + Timeout
        end,
    wait_stopped(Ref, Deadline, 0).

wait_stopped(Ref, Deadline, Pause) ->
    case moat_nif:task_running(Ref) of
        false ->
            true;
        true ->
            Now = erlang:monotonic_time(millisecond),
            case Deadline =/= infinity andalso Now >= Deadline of
                true ->
                    false;
                false ->
                    Left =
                        case Deadline of
                            infinity -> Pause;
                            _ -> min(Pause, Deadline - Now)
                        end,
                    receive
                    after Left -> ok
                    end,
                    wait_stopped(Ref, Deadline, min(max(1, Pause * 2), 50))
            end
    end.

collect_many(Got, 0, _Deadline) ->
    Got;
collect_many(Pending, Left, Deadline) ->
    Wait =
        case Deadline of
            infinity -> infinity;
            _ -> max(0, Deadline - erlang:monotonic_time(millisecond))
        end,
    receive
        {Ref, Reply} when is_map_key(Ref, Pending), map_get(Ref, Pending) =:= nil ->
            collect_many(Pending#{Ref := {ok, Reply}}, Left - 1, Deadline);
        {'DOWN', Ref, process, _, Reason} when
            is_map_key(Ref, Pending), map_get(Ref, Pending) =:= nil
        ->
            collect_many(Pending#{Ref := {exit, Reason}}, Left - 1, Deadline)
    after Wait -> Pending
    end.

owner_only(#{owner := Owner}) when Owner =:= self() -> true;
owner_only(_) -> error(badarg).

task_ref(#{ref := Ref} = T) ->
    owner_only(T),
    Ref;
task_ref(_) ->
    error(badarg).

check_timeout(infinity) -> ok;
check_timeout(T) when is_integer(T), T >= 0 -> ok;
check_timeout(_) -> error(badarg).

opts_map(Opts) when is_map(Opts) ->
    Opts;
opts_map(Opts) when is_list(Opts) ->
    try
        maps:from_list([opt_pair(O) || O <- Opts])
    catch
        error:_ -> error(badarg)
    end;
opts_map(_) ->
    error(badarg).

opt_pair({K, V}) when is_atom(K) -> {K, V};
opt_pair(K) when is_atom(K) -> {K, true}.

task_opts(Opts0) ->
    Opts = opts_map(Opts0),
    maps:fold(
        fun
            (link, V, Acc) when is_boolean(V) -> Acc;
            (timeout, V, Acc) -> check_timeout(V), Acc;
            (_, _, _) -> error(badarg)
        end,
        ok,
        Opts
    ),
    {maps:get(link, Opts, false), maps:get(timeout, Opts, infinity)}.

stream_opts(Pool, Opts0) ->
    Defaults = #{
        ordered => true,
        timeout => ?DEFAULT_TIMEOUT,
        on_timeout => exit,
        zip_input_on_exit => false
    },
    Opts = maps:merge(Defaults, opts_map(Opts0)),
    maps:foreach(fun check_stream_opt/2, Opts),
    case Opts of
        #{max_concurrency := _} ->
            Opts;
        _ ->
            Size =
                case moat_nif:pool_stats(Pool) of
                    #{size := S} -> S;
                    {error, not_found} -> erlang:system_info(schedulers_online)
                end,
            Opts#{max_concurrency => Size}
    end.

check_stream_opt(max_concurrency, N) when is_integer(N), N > 0 -> ok;
check_stream_opt(ordered, B) when is_boolean(B) -> ok;
check_stream_opt(timeout, T) -> check_timeout(T);
check_stream_opt(on_timeout, exit) -> ok;
check_stream_opt(on_timeout, kill_task) -> ok;
check_stream_opt(zip_input_on_exit, B) when is_boolean(B) -> ok;
check_stream_opt(_, _) -> error(badarg).

pool_opts(Opts) ->
    Defaults = #{
        backend => nif,
        size => erlang:system_info(schedulers_online),
        max_queue => 65536,
        libraries => [moat_demo],
        max_restarts => 3,
        max_seconds => 5,
        strategy => one_for_one,
        servers => [],
        isolation => thread,
        transport => port
    },
    Merged = maps:merge(Defaults, Opts),
    maps:foreach(fun check_pool_opt/2, Merged),
    %% Process isolation is the C-node's, and so are its options.
    Process = maps:get(isolation, Merged) =:= process,
    Process =:= false orelse maps:get(backend, Merged) =:= cnode orelse error(badarg),
    Process orelse not lists:any(fun(K) -> maps:is_key(K, Merged) end, [max_memory, spares]) orelse
        error(badarg),
    maps:get(transport, Merged) =:= port orelse maps:get(backend, Merged) =:= cnode orelse
        error(badarg),
    Libs0 = [library_path(L) || L <- maps:get(libraries, Merged)],
    {Servers, Libs} = server_specs(maps:get(servers, Merged), Libs0),
    Merged#{libraries := Libs, servers := Servers}.

%% Child specs as the NIF takes them, {Id, LibIndex, Server, Args,
%% Restart, Shutdown}, and the libraries with the servers' own appended.
server_specs(Specs, Libs0) ->
    {Rev, Libs} = lists:foldl(
        fun(Spec, {Acc, Libs}) ->
            {S, Libs1} = server_spec(opts_map(Spec), Libs),
            {[S | Acc], Libs1}
        end,
        {[], Libs0},
        Specs
    ),
    Servers = lists:reverse(Rev),
    Ids = [element(1, S) || S <- Servers],
    length(lists:usort(Ids)) =:= length(Ids) orelse error(badarg),
    {Servers, Libs}.

server_spec(#{id := Id, start := {Lib, Server, Args}} = Spec, Libs) when
    is_atom(Server), is_list(Args)
->
    Keys = [id, start, restart, shutdown, type],
    [] =:= maps:keys(maps:without(Keys, Spec)) orelse error(badarg),
    _ = length(Args),
    Restart = maps:get(restart, Spec, permanent),
    lists:member(Restart, [permanent, transient, temporary]) orelse error(badarg),
    Shutdown = maps:get(shutdown, Spec, 5000),
    case Shutdown of
        brutal_kill -> ok;
        infinity -> ok;
        Ms when is_integer(Ms), Ms >= 0, Ms < 1 bsl 31 -> ok;
        _ -> error(badarg)
    end,
    worker =:= maps:get(type, Spec, worker) orelse error(badarg),
    Path = library_path(Lib),
    Libs1 =
        case lists:member(Path, Libs) of
            true -> Libs;
            false -> Libs ++ [Path]
        end,
    Index = length(lists:takewhile(fun(L) -> L =/= Path end, Libs1)),
    {{Id, Index, Server, Args, Restart, Shutdown}, Libs1};
server_spec(_, _) ->
    error(badarg).

check_pool_opt(backend, nif) -> ok;
check_pool_opt(backend, cnode) -> ok;
check_pool_opt(isolation, thread) -> ok;
check_pool_opt(isolation, process) -> ok;
check_pool_opt(transport, port) -> ok;
check_pool_opt(transport, distribution) -> ok;
check_pool_opt(transport, {distribution, Node}) when is_atom(Node) -> ok;
check_pool_opt(max_memory, N) when is_integer(N), N > 0 -> ok;
check_pool_opt(spares, N) when is_integer(N), N >= 0, N =< 1024 -> ok;
check_pool_opt(size, N) when is_integer(N), N > 0, N =< 1024 -> ok;
check_pool_opt(max_queue, N) when is_integer(N), N > 0, N < 1 bsl 32 -> ok;
check_pool_opt(libraries, [_ | _] = L) -> lists:foreach(fun library_path/1, L);
check_pool_opt(max_restarts, N) when is_integer(N), N >= 0, N < 1 bsl 31 -> ok;
check_pool_opt(max_seconds, N) when is_integer(N), N > 0, N < 1 bsl 31 -> ok;
check_pool_opt(strategy, S) when
    S =:= one_for_one; S =:= one_for_all; S =:= rest_for_one
->
    ok;
check_pool_opt(servers, L) when is_list(L) -> ok;
check_pool_opt(_, _) -> error(badarg).

library_path(moat_demo) ->
    filename:join(priv_dir(moat), "moat_demo.so");
library_path({priv, App, File}) when is_atom(App) ->
    filename:join(priv_dir(App), File);
library_path(Path) when is_binary(Path) ->
    Path;
library_path(Path) when is_list(Path) ->
    try unicode:characters_to_binary(Path) of
        Bin when is_binary(Bin) -> Bin;
        _ -> error(badarg)
    catch
        error:_ -> error(badarg)
    end;
library_path(_) ->
    error(badarg).

priv_dir(App) ->
    case code:priv_dir(App) of
        {error, bad_name} -> error(badarg);
        Dir -> Dir
    end.

%% The reason a pool could not start, without the supervisors' wrapping.
start_error({Reason, Child}) when element(1, Child) =:= child -> start_error(Reason);
start_error({shutdown, {failed_to_start_child, owner, Reason}}) -> Reason;
start_error(Reason) -> Reason.
