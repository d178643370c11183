%%% @private
%%% @doc Internal: the owner of one native pool.
%%%
%%% It creates the pool in `init/1' (loading its task libraries and starting
%%% its threads), holds the NIF handle, and closes the pool in
%%% `terminate/2': every task still pending then gets its `shutdown' DOWN
%%% before the process is gone. The pool is registered by name in the NIF,
%%% so callers reach it without this process; if this process is killed the
%%% NIF sees it die and closes the pool all the same. It traps exits so
%%% that its supervisor's shutdown runs `terminate/2'.
-module(moat_pool).

-behaviour(gen_server).

-include_lib("kernel/include/logger.hrl").

-export([start_link/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-record(state, {name :: atom(), handle :: reference()}).

%%%===================================================================
%%% API
%%%===================================================================

%% Starts the owner of pool `Name'. Fails with the reason the pool could
%% not be made: `{bad_library, Message}', `{already_started, Owner}', ...
-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) ->
    gen_server:start_link(?MODULE, {Name, Opts}, []).

%%%===================================================================
%%% gen_server callbacks
%%%===================================================================

-spec init({atom(), map()}) -> {ok, #state{}} | {stop, term()}.
init({Name, #{size := Size, max_queue := MaxQueue, libraries := Libs} = Opts}) ->
    process_flag(trap_exit, true),
    #{strategy := Strategy, max_restarts := Intensity, max_seconds := Period,
      servers := Servers} = Opts,
    case moat_nif:pool_new(Name, Size, MaxQueue, Libs) of
        {ok, Handle} ->
            case moat_nif:sup_start(Handle, {Strategy, Intensity, Period}, Servers) of
                ok ->
                    {ok, #state{name = Name, handle = Handle}};
                {error, Reason} ->
                    ok = moat_nif:pool_close(Handle),
                    {stop, Reason}
            end;
        {error, Reason} ->
            {stop, Reason}
    end.

-spec handle_call(term(), gen_server:from(), #state{}) ->
    {reply, {error, badarg}, #state{}}.
handle_call(Request, From, State) ->
    ?LOG_WARNING("moat pool ~p: unexpected call ~0p from ~0p", [State#state.name, Request, From]),
    {reply, {error, badarg}, State}.

-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(Request, State) ->
    ?LOG_WARNING("moat pool ~p: unexpected cast ~0p", [State#state.name, Request]),
    {noreply, State}.

%% Exits from the parent supervisor are handled by gen_server itself (it
%% terminates with that reason); any other linked process exiting is not
%% ours to follow.
-spec handle_info(term(), #state{}) -> {noreply, #state{}} | {stop, shutdown, #state{}}.
handle_info({moat_gave_up, Name, Reason}, #state{name = Name} = State) ->
    %% The native supervisor reached its intensity and stopped its
    %% servers. Exit as an OTP supervisor does when it gives up, so that
    %% the one above restarts the pool, under its own intensity.
    ?LOG_ERROR(
        #{
            label => {moat, native_supervisor_gave_up},
            pool => Name,
            reason => Reason
        },
        #{domain => [moat]}
    ),
    {stop, shutdown, State};
handle_info({'EXIT', Pid, Reason}, State) ->
    ?LOG_INFO("moat pool ~p: linked process ~0p exited: ~0p", [State#state.name, Pid, Reason]),
    {noreply, State};
handle_info(Info, State) ->
    ?LOG_WARNING("moat pool ~p: unexpected message ~0p", [State#state.name, Info]),
    {noreply, State}.

-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{name = Name, handle = Handle}) ->
    try
        moat_nif:pool_close(Handle)
    catch
        error:badarg ->
            %% The NIF module was deleted and loaded anew since this pool
            %% started, so the new instance does not know this handle. The
            %% NIF still watches this process and closes the pool when it
            %% exits, a moment from now.
            ?LOG_WARNING("moat pool ~p: closed on exit (moat_nif was reloaded)", [Name])
    end.
