%%% @private
%%% @doc Internal: the NIF (priv/moat_nif.so) behind `moat'. Every function
%%% here is replaced by its C implementation when the module loads; see
%%% c_src/nif/moat_nif.c for each one's contract.
-module(moat_nif).

-export([pool_new/4, pool_close/1, pool_stats/1, pool_owner/1]).
-export([pool_crashes/1]).
-export([cnode_pool_new/6, cnode_deliver/2, cnode_flush/1, cnode_lost/2]).
-export([async/5, run/4, task_cancel/2, task_running/1, task_kill/1, task_spin/1, task_ignore/1]).
-export([stream_new/4, stream_submit/3, stream_take/3, stream_close/1]).
-export([sup_start/3, call/4, cast/3, which_children/1, count_children/1]).

-on_load(load/0).

%% Loads priv/moat_nif.so. A failure names the path, so a broken install
%% says what is missing.
-spec load() -> ok | {error, term()}.
load() ->
    Dir =
        case code:priv_dir(moat) of
            {error, bad_name} ->
                filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
            D ->
                D
        end,
    erlang:load_nif(filename:join(Dir, "moat_nif"), 0).

-spec pool_new(atom(), pos_integer(), pos_integer(), [iodata()]) ->
    {ok, reference()} | {error, term()}.
pool_new(_Name, _Size, _MaxQueue, _Libs) -> nif_missing().

-spec pool_close(reference()) -> ok.
pool_close(_Handle) -> nif_missing().

-spec pool_stats(atom()) -> map() | {error, not_found}.
pool_stats(_Name) -> nif_missing().

-spec pool_owner(atom()) -> pid() | undefined.
pool_owner(_Name) -> nif_missing().

%% The native servers' crashes since the last call: {Count, LastId,
%% LastReason}; the owner is sent {moat_child_crashed, Name} at the next.
-spec pool_crashes(reference()) -> {non_neg_integer(), term(), term()}.
pool_crashes(_Handle) -> nif_missing().

%% A pool whose tasks run in the C-node behind the port, or over
%% distribution with the owner relaying frames (see doc/cnode.md), with
%% the ids of the native servers the C-node runs, in the order of its
%% hello's `servers' (frames name a server by its index).
-spec cnode_pool_new(atom(), pos_integer(), pos_integer(), port() | distribution, [atom()],
                     [term()]) ->
    {ok, reference()} | {error, term()}.
cnode_pool_new(_Name, _Size, _MaxQueue, _Port, _Tasks, _ServerIds) -> nif_missing().

%% A packet from the pool's C-node: ok | {other, Term} | {error, bad_frame}.
-spec cnode_deliver(reference(), binary()) -> ok | {other, term()} | {error, bad_frame}.
cnode_deliver(_Handle, _Frame) -> nif_missing().

%% Sends the C-node the cancels decided off the callers' processes.
-spec cnode_flush(reference()) -> ok.
cnode_flush(_Handle) -> nif_missing().

%% The C-node is gone: its tasks end with Reason ({native_crash,
%% cnode_down}, noconnection over distribution).
-spec cnode_lost(reference(), term()) -> ok.
cnode_lost(_Handle, _Reason) -> nif_missing().

-spec async(atom(), atom(), list(), timeout(), pid() | undefined) -> {reference(), term()}.
async(_Pool, _Task, _Args, _Timeout, _Proxy) -> nif_missing().

-spec run(atom(), atom(), list(), timeout()) ->
    {ok, term()} | {exit, term()} | {wait, reference()}.
run(_Pool, _Task, _Args, _Timeout) -> nif_missing().

-spec task_cancel(reference(), shutdown | killed) -> cancelled | delivered.
task_cancel(_Ref, _Reason) -> nif_missing().

-spec task_running(reference()) -> boolean().
task_running(_Ref) -> nif_missing().

%% After a shutdown timeout: a C-node body still running is told `killed'
%% (in process isolation, a real kill of its worker).
-spec task_kill(reference()) -> ok.
task_kill(_Ref) -> nif_missing().

-spec task_spin(reference()) -> boolean().
task_spin(_Ref) -> nif_missing().

-spec task_ignore(reference()) -> ignored | delivered.
task_ignore(_Ref) -> nif_missing().

-spec stream_new(atom(), atom(), timeout(), pos_integer()) -> reference().
stream_new(_Pool, _Task, _Timeout, _MaxConcurrency) -> nif_missing().

-spec stream_submit(reference(), list(), non_neg_integer()) ->
    [{non_neg_integer(), exit, term()}].
stream_submit(_Stream, _Inputs, _FirstIndex) -> nif_missing().

-spec stream_take(reference(), boolean(), boolean()) ->
    [{non_neg_integer(), ok | exit, term()} | {non_neg_integer(), timeout}]
    | {[{ok | exit, term()}], non_neg_integer(), boolean()}.
stream_take(_Stream, _Ack, _Elements) -> nif_missing().

-spec stream_close(reference()) -> boolean().
stream_close(_Stream) -> nif_missing().

-spec sup_start(reference(), {atom(), non_neg_integer(), pos_integer()},
                [{term(), non_neg_integer(), atom(), list(), atom(), term()}]) ->
    ok | {error, term()}.
sup_start(_Handle, _Flags, _Servers) -> nif_missing().

-spec call(atom(), term(), term(), timeout()) ->
    {ok, term()} | {exit, term()} | {wait, reference()}.
call(_Pool, _Server, _Request, _Timeout) -> nif_missing().

-spec cast(atom(), term(), term()) -> ok.
cast(_Pool, _Server, _Request) -> nif_missing().

%% A C-node pool with servers answers {remote, Outcome, Fallback}: its
%% C-node's answer as a call's outcome, and what to say when none comes.
-spec which_children(atom()) ->
    [{term(), atom(), atom()}]
    | {error, not_found}
    | {remote, {ok, list()} | {exit, term()} | {wait, reference()}, list()}.
which_children(_Pool) -> nif_missing().

-spec count_children(atom()) ->
    map() | {error, not_found} | {remote, {ok, map()} | {exit, term()} | {wait, reference()}, map()}.
count_children(_Pool) -> nif_missing().

nif_missing() -> erlang:nif_error({not_loaded, ?MODULE}).
