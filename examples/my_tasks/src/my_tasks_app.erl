%%% @private
%%% @doc my_tasks' application callback: starts the supervisor that holds
%%% the application's moat pool.
-module(my_tasks_app).
-behaviour(application).

-export([start/2, stop/1]).

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    my_tasks_sup:start_link().

-spec stop(term()) -> ok.
stop(_State) ->
    ok.
