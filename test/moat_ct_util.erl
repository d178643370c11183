%%% @private
%%% @doc Internal: helpers the Common Test suites share.
-module(moat_ct_util).

-export([wait_until/2]).

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
