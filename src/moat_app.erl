%%% @private
%%% @doc The moat application callback module; internal to moat.
%%%
%%% It starts {@link moat_sup}, the root of moat's supervision tree. Nothing
%%% outside moat calls it: applications start moat with
%%% `application:ensure_all_started(moat)' or by listing it as a dependency.
-module(moat_app).

-behaviour(application).

-export([start/2, stop/1]).

%%%===================================================================
%%% application callbacks
%%%===================================================================

%% Looks for telemetry (moat_telemetry), then starts moat's root
%% supervisor, the process whose exit stops the application.
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_StartType, _StartArgs) ->
    ok = moat_telemetry:init(),
    moat_sup:start_link().

%% Nothing to release here: the supervision tree has already stopped.
-spec stop(term()) -> ok.
stop(_State) ->
    ok.
