%%% @private
%%% @doc my_tasks' top supervisor. Its one child is the moat pool that runs
%%% the tasks of priv/my_tasks.so, so the pool starts and stops with the
%%% application, and a pool that gives up takes the application with it.
-module(my_tasks_sup).
-behaviour(supervisor).

-export([start_link/0]).
-export([init/1]).

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% The application environment's pool_opts (a map) are added to the
    %% pool's options: #{backend => cnode} runs the same library out of
    %% the VM, #{size => 8} gives it more threads.
    Extra = application:get_env(my_tasks, pool_opts, #{}),
    Opts = maps:merge(
        #{
            name => my_tasks:pool(),
            size => 2,
            libraries => [{priv, my_tasks, "my_tasks.so"}]
        },
        Extra
    ),
    {ok, {#{strategy => one_for_one, intensity => 3, period => 5}, [moat:child_spec(Opts)]}}.
