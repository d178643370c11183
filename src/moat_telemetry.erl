%%% @private
%%% @doc Internal: moat's telemetry events (DESIGN.md §10).
%%%
%%% No Erlang code runs when a native task ends, so task events are
%%% emitted in the process that consumes an outcome, and pool events by
%%% the pool's owner. The `telemetry' library is used only when
%%% `code:ensure_loaded(telemetry)' found it when moat started (see
%%% {@link init/0}); otherwise every call here is one `persistent_term'
%%% read. Events:
%%%
%%% <ul>
%%% <li>`[moat, task, stop]', measurements `#{monotonic_time, duration}'
%%%     (`duration' in native time units from the submit, when the caller
%%%     submitted while telemetry was on; stream elements have none),
%%%     metadata `#{pool, task}', for each `{ok, Result}' consumed;</li>
%%% <li>`[moat, task, exception]', the same measurements, metadata
%%%     `#{pool, task, kind => exit, reason}', for each `{exit, Reason}'
%%%     consumed;</li>
%%% <li>`[moat, pool, restart]', measurements `#{count}', metadata
%%%     `#{pool, child, reason}': native servers of the pool crashed and
%%%     their supervisor acts on it (restarts them, or gives up); `count'
%%%     crashes since the last event, `child' and `reason' of the last
%%%     one.</li>
%%% </ul>
-module(moat_telemetry).

-export([init/0, enabled/0, start_time/0, task_outcome/4, pool_restart/4]).

-define(KEY, {moat, telemetry}).

%% Looks for the telemetry library; called when moat starts. The answer is
%% kept in a persistent_term, written only when it changes.
-spec init() -> ok.
init() ->
    On = code:ensure_loaded(telemetry) =:= {module, telemetry},
    case persistent_term:get(?KEY, undefined) of
        On -> ok;
        _ -> persistent_term:put(?KEY, On)
    end.

-spec enabled() -> boolean().
enabled() ->
    persistent_term:get(?KEY, false).

%% The start of a task's duration, or undefined when telemetry is off.
-spec start_time() -> integer() | undefined.
start_time() ->
    case enabled() of
        true -> erlang:monotonic_time();
        false -> undefined
    end.

%% The event of an outcome the caller consumed. Start: start_time/0's.
-spec task_outcome(atom(), atom() | undefined, integer() | undefined, term()) -> ok.
task_outcome(Pool, Task, Start, Outcome) ->
    case enabled() of
        true -> emit_outcome(Pool, Task, Start, Outcome);
        false -> ok
    end.

emit_outcome(Pool, Task, Start, {ok, _}) ->
    telemetry:execute([moat, task, stop], measurements(Start), #{pool => Pool, task => Task});
emit_outcome(Pool, Task, Start, {exit, Reason}) ->
    telemetry:execute(
        [moat, task, exception],
        measurements(Start),
        #{pool => Pool, task => Task, kind => exit, reason => Reason}
    );
emit_outcome(_, _, _, _) ->
    ok.

measurements(undefined) ->
    #{monotonic_time => erlang:monotonic_time()};
measurements(Start) ->
    Now = erlang:monotonic_time(),
    #{monotonic_time => Now, duration => Now - Start}.

%% Native servers of Pool crashed: Count since the last event, the last
%% one's child id and reason.
-spec pool_restart(atom(), non_neg_integer(), term(), term()) -> ok.
pool_restart(Pool, Count, Child, Reason) ->
    case enabled() of
        true ->
            telemetry:execute(
                [moat, pool, restart],
                #{count => Count},
                #{pool => Pool, child => Child, reason => Reason}
            );
        false ->
            ok
    end.
