%%% @doc Starting and stopping the moat application and its root
%%% supervisor.
-module(moat_app_SUITE).

-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([
    starts/1,
    root_supervisor_is_registered_and_alive/1,
    stops_cleanly/1,
    starts_again_after_stop/1
]).

%% How long a stopped supervisor may take to be seen as gone.
-define(DOWN_TIMEOUT, 5000).

%%%===================================================================
%%% Common Test callbacks
%%%===================================================================

-spec all() -> [atom()].
all() ->
    [
        starts,
        root_supervisor_is_registered_and_alive,
        stops_cleanly,
        starts_again_after_stop
    ].

%% Every case starts from a stopped application, whatever the last one did.
-spec init_per_testcase(atom(), list()) -> list().
init_per_testcase(_Case, Config) ->
    _ = application:stop(moat),
    Config.

-spec end_per_testcase(atom(), list()) -> ok.
end_per_testcase(_Case, _Config) ->
    _ = application:stop(moat),
    ok.

%%%===================================================================
%%% Cases
%%%===================================================================

-spec starts(list()) -> ok.
starts(_Config) ->
    %% The application starts and is then listed as running.
    ?assertEqual({ok, [moat]}, application:ensure_all_started(moat)),
    ?assert(lists:keymember(moat, 1, application:which_applications())),
    ok.

-spec root_supervisor_is_registered_and_alive(list()) -> ok.
root_supervisor_is_registered_and_alive(_Config) ->
    %% Once started, moat_sup is registered, alive, moat's, and a supervisor.
    {ok, _} = application:ensure_all_started(moat),
    Sup = whereis(moat_sup),
    ?assert(is_pid(Sup)),
    ?assert(is_process_alive(Sup)),
    ?assertEqual({ok, moat}, application:get_application(Sup)),
    ?assertEqual([], supervisor:which_children(moat_sup)),
    ok.

-spec stops_cleanly(list()) -> ok.
stops_cleanly(_Config) ->
    %% Stopping ends moat_sup with reason shutdown and frees its name.
    {ok, _} = application:ensure_all_started(moat),
    Sup = whereis(moat_sup),
    ?assert(is_pid(Sup)),
    Ref = monitor(process, Sup),
    ?assertEqual(ok, application:stop(moat)),
    receive
        {'DOWN', Ref, process, Sup, Reason} ->
            ?assertEqual(shutdown, Reason)
    after ?DOWN_TIMEOUT ->
        ct:fail({still_alive, moat_sup, Sup})
    end,
    ?assertEqual(undefined, whereis(moat_sup)),
    ?assertNot(lists:keymember(moat, 1, application:which_applications())),
    ok.

-spec starts_again_after_stop(list()) -> ok.
starts_again_after_stop(_Config) ->
    %% After a stop the application starts again, with a new moat_sup.
    {ok, _} = application:ensure_all_started(moat),
    First = whereis(moat_sup),
    ok = application:stop(moat),
    ?assertEqual({ok, [moat]}, application:ensure_all_started(moat)),
    Second = whereis(moat_sup),
    ?assert(is_pid(Second)),
    ?assert(is_process_alive(Second)),
    ?assertNotEqual(First, Second),
    ok.
