%%% @private
%%% @doc The root supervisor of the moat application; internal to moat.
%%%
%%% It is registered as `moat_sup'. Each pool will get its own supervisor
%%% under this one, started when the pool is started; until then it has no
%%% children.
-module(moat_sup).

-behaviour(supervisor).

-export([start_link/0]).
-export([init/1]).

%%%===================================================================
%%% API
%%%===================================================================

%% Starts the supervisor and registers it locally as `moat_sup'.
-spec start_link() ->
    {ok, pid()}
    | {error, {already_started, pid()} | {shutdown, term()} | term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%%%===================================================================
%%% supervisor callbacks
%%%===================================================================

%% Per-pool supervisors are added here as temporary children, one for
%% each pool started with moat:start_pool/2 (a pool embedded with
%% moat:child_spec/1 lives in its caller's tree instead): a pool that
%% gives up is gone without taking the other pools or moat with it.
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    SupFlags = #{strategy => one_for_one, intensity => 3, period => 5},
    {ok, {SupFlags, []}}.
