%%% @private
%%% @doc Internal: the supervisor of one pool.
%%%
%%% Its one child is the pool's owner ({@link moat_pool}), the process that
%%% holds the native pool. When the owner dies (killed, or because the
%%% pool's native supervisor gave up) this supervisor starts a new owner and
%%% so a new native pool; past its own intensity (`max_restarts' /
%%% `max_seconds' of the pool, 3 in 5 s by default) it exits and the tree
%%% above decides, as with any OTP supervisor.
-module(moat_pool_sup).

-behaviour(supervisor).

-export([start_link/2]).
-export([init/1]).

%%%===================================================================
%%% API
%%%===================================================================

%% Starts the supervisor of pool `Name' with its validated options.
-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) ->
    supervisor:start_link(?MODULE, {Name, Opts}).

%%%===================================================================
%%% supervisor callbacks
%%%===================================================================

-spec init({atom(), map()}) ->
    {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init({Name, #{max_restarts := Intensity, max_seconds := Period} = Opts}) ->
    Flags = #{strategy => one_for_one, intensity => Intensity, period => Period},
    Owner = #{
        id => owner,
        start => {moat_pool, start_link, [Name, Opts]},
        restart => permanent,
        %% Closing settles every pending task (one message each) and never
        %% waits for a busy thread, so it is quick even with a full queue.
        shutdown => 30000,
        type => worker,
        modules => [moat_pool]
    },
    {ok, {Flags, [Owner]}}.
