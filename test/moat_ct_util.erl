%%% @private
%%% @doc Internal: helpers the Common Test suites share.
-module(moat_ct_util).

-export([wait_until/2, distributed/0, undistributed/1, init_backend/2, end_backend/2]).

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

%% Makes this VM a distributed node unless it is one, as the benchmarks
%% do. Returns whether it did, for undistributed/1.
-spec distributed() -> boolean().
distributed() ->
    moat_bench:distributed().

%% Stops the distribution distributed/0 started.
-spec undistributed(boolean()) -> ok.
undistributed(true) -> net_kernel:stop();
undistributed(false) -> ok.

%% The pool options of the suites' backend groups (nif, cnode_thread,
%% cnode_process, cnode_dist), put in Config as `backend'; cnode_dist
%% makes this VM a node first.
-spec init_backend(atom(), list()) -> list().
init_backend(nif, Config) ->
    [{backend, #{}} | Config];
init_backend(cnode_thread, Config) ->
    [{backend, #{backend => cnode, isolation => thread}} | Config];
init_backend(cnode_process, Config) ->
    [{backend, #{backend => cnode, isolation => process}} | Config];
init_backend(cnode_dist, Config) ->
    %% The distribution transport, with the C-node on loopback.
    Started = distributed(),
    [{backend, #{backend => cnode, transport => distribution}}, {started_dist, Started} | Config].

%% Undoes init_backend/2.
-spec end_backend(atom(), list()) -> ok.
end_backend(cnode_dist, Config) ->
    undistributed(proplists:get_value(started_dist, Config));
end_backend(_Group, _Config) ->
    ok.
