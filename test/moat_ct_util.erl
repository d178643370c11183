%%% @private
%%% @doc Internal: helpers the Common Test suites share.
-module(moat_ct_util).

-export([wait_until/2, distributed/0, undistributed/1]).

%% How long a case waits for something it knows will happen.
-define(WAIT, 5000).

%% Polls Fun until it returns true, failing the case with
%% `{timed_out_waiting_for, What}' after 5 s.
-spec wait_until(fun(() -> boolean()), term()) -> ok.
wait_until(Fun, What) ->
    wait_until(Fun, What, erlang:monotonic_time(millisecond) + ?WAIT).

wait_until(Fun, What, Deadline) ->
    case Fun() of
        true ->
            ok;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true ->
                    ct:fail({timed_out_waiting_for, What});
                false ->
                    timer:sleep(2),
                    wait_until(Fun, What, Deadline)
            end
    end.

%% Makes this VM a distributed node (short names) unless it is one,
%% starting epmd first as `erl -sname' would. Returns whether it did, for
%% undistributed/1.
-spec distributed() -> boolean().
distributed() ->
    case erlang:is_alive() of
        true ->
            false;
        false ->
            _ = os:cmd("epmd -daemon"),
            Name = list_to_atom("moat_ct_" ++ os:getpid()),
            {ok, _} = net_kernel:start([Name, shortnames]),
            true
    end.

%% Stops the distribution distributed/0 started.
-spec undistributed(boolean()) -> ok.
undistributed(true) -> net_kernel:stop();
undistributed(false) -> ok.
