%%% @doc moat's public benchmarks: moat's figures from Erlang, each beside
%%% its target and beside a BEAM peer measured in the same run.
%%%
%%% This module is public (DESIGN.md section 4) and compiled into moat's
%%% `ebin', so it runs wherever moat does:
%%%
%%% ```
%%% make bench                  (after bench/core.c; the full run)
%%% make shell                  then  moat_bench:run(#{quick => true}).
%%% erl -pa _build/default/lib/moat/ebin
%%%                             then  moat_bench:run(#{quick => true}).
%%% iex -S mix                  (in a project that depends on moat)
%%%                             then  :moat_bench.run(%{quick: true})
%%% '''
%%%
%%% {@link run/1} starts moat if it is not running, starts the pool
%%% `moat_bench' with one thread per online scheduler and two native
%%% servers, `c' and `crasher' (both `moat_demo' `counter [0]', restart
%%% intensity 100,000,000 in 1 s), and the C-node pool `moat_bench_cnode'
%%% of the same size, prints one table and stops the pools.
%%% The rows (DESIGN.md section 10: inputs and concurrency are printed
%%% under each row):
%%%
%%% <ol>
%%% <li>fan-out of trivial tasks (`echo') through
%%%     `moat:async_stream/4', unordered, 1024 in flight; target at least
%%%     1,000,000 tasks/s and at least 10x the peer, Elixir's
%%%     `Task.async_stream/3' of the identity function (unordered, one
%%%     worker per scheduler) consumed with `Enum.to_list/1';</li>
%%% <li>the round trip of one `moat:run(Pool, echo, [1])', one outstanding,
%%%     each call timed on its own; target a median of at most 3 us; peer: a
%%%     `spawn_monitor' whose process replies once (one process per call;
%%%     a dirty NIF call would be the closer peer, but moat has no such
%%%     NIF);</li>
%%% <li>10 us CPU tasks (`spin [10]') through `async_stream' as a
%%%     percentage of the ideal (pool size x 100,000 tasks/s); target at
%%%     least 90%; peer: `Task.async_stream' of a 10 us Erlang busy-wait,
%%%     against the same ideal;</li>
%%% <li>memory over 10,000,000 trivial tasks in streams of 100,000:
%%%     `erlang:memory(total)' and the OS resident set after the first
%%%     1,000,000 (the warm-up) and at the end, each after a garbage
%%%     collection of every process; target: no growth, that is, each grows
%%%     by less than 16 MiB or by less than 5%. Samples every 1,000,000 in
%%%     between give the range and the trend, since the resident set
%%%     moves by several MiB from one sample to the next as allocators
%%%     keep and return memory. No peer;</li>
%%% <li>the round trip of one `moat:call(Pool, c, get, 5000)' to a native
%%%     server, one outstanding, timed as in row 2; target a median of at
%%%     most 3 us; peer: `gen_server:call/3' to a registered Erlang
%%%     gen_server counter (this module's own callbacks);</li>
%%% <li>native server restarts per second through the whole path, a
%%%     `moat:call/4' round trip included in each: the caller crashes
%%%     `crasher' with a call, the exit signal reaches the pool's native
%%%     supervisor, which restarts it and runs its init, and the caller's
%%%     next call goes as soon as its reply is in (retried while the restart
%%%     is pending); restarts counted by `moat:stats/1'. Target at least 10x
%%%     the peer: an OTP supervisor (one_for_one, the same intensity)
%%%     restarting a gen_server crashed the same way, logger off for it
%%%     meanwhile. Every crash must be followed by exactly one restart, on
%%%     both sides, else the figure is replaced by ERROR. The restart alone
%%%     in C (target at least 1,000,000/s) is row 5 of `bench/core.c'.</li>
%%% <li>the round trip of one `moat:run(Pool, echo, [1])' on a C-node pool
%%%     (`backend => cnode', thread isolation, the port transport), timed as
%%%     in row 2; target a median of at most 20 us; peer: a bare `{packet,
%%%     4}' port echo (`/bin/cat') round trip of one byte;</li>
%%% <li>fan-out of trivial tasks on that C-node pool, as in row 1 (1024 in
%%%     flight); target at least 500,000 tasks/s; peer: the bare port echo
%%%     pipelined, 1024 one-byte packets in flight.</li>
%%% <li>fan-out of trivial tasks on a C-node pool with `isolation =>
%%%     process' (a worker process per task at a time, one spare), as in
%%%     row 8; target at least 100,000 tasks/s; peer: row 8's bare port
%%%     echo;</li>
%%% <li>worker restarts per second in that pool: one `segfault' task at a
%%%     time, each killing its worker, which a spare replaces; timed until
%%%     the last crash's outcome is in; target at least 2,000/s; no
%%%     peer.</li>
%%% <li>the round trip of one `moat:run(Pool, echo, [1])' on a C-node pool
%%%     over the distribution transport (`transport => distribution', thread
%%%     isolation), timed as in row 2; target a median of at most 35 us;
%%%     peer: a bare ei echo, one message to the same C-node's `moat_echo'
%%%     name and back. The bench makes the VM a distributed node for this
%%%     row if it is not one (short names, epmd started as `erl -sname'
%%%     would), and stops the distribution afterwards.</li>
%%% </ol>
%%%
%%% Where Elixir cannot be loaded (it is looked for in the code path, then
%%% in `/usr/lib/elixir/lib/elixir/ebin'), the peer of rows 1 and 3 is an
%%% Erlang equivalent, and its label says so: at most one `spawn_monitor'ed
%%% worker per scheduler at a time, each replying once.
%%%
%%% The full run takes about 80 seconds on two cores, the quick one
%%% (`#{quick => true}', or `MOAT_BENCH_QUICK=1' for {@link main/0}) about
%%% 12 seconds. Figures drift 20-40% between runs on shared machines:
%%% compare moat with the peer of the same run, and read the CPU figures
%%% under each row (cores used by the schedulers, by the pool's threads and
%%% by other processes on the machine). Each trial runs in a fresh
%%% process, so that no trial inherits another's heap; moat and peer
%%% trials alternate. Benchmarks never gate CI; a row that loses or fails
%%% tasks, or whose counts do not add up (row 6), prints an ERROR line,
%%% and {@link main/0} then returns `error'.
-module(moat_bench).

-export([main/0, run/1]).
-export([fanout/3, fanout/4]).
% The Erlang peers of rows 5 and 6: a gen_server counter, and the OTP
% supervisor that restarts it.
-export([init/1, handle_call/3, handle_cast/2]).

-behaviour(gen_server).

-export_type([fanout_result/0, row/0]).

% Elixir is optional: loaded at run time when it is there (see peer/0).
-ignore_xref([
    {'Elixir.Task', async_stream, 3},
    {'Elixir.Enum', to_list, 1},
    {'Elixir.System', version, 0}
]).

-type fanout_result() :: #{
    tasks := non_neg_integer(),
    seconds := float(),
    per_second := float(),
    concurrency := pos_integer(),
    failed := non_neg_integer()
}.
%% `failed' counts the elements that were not `{ok, _}'.

-type row() :: #{
    row := 1..11,
    figure := string(),
    moat := number(),
    unit := string(),
    target := string(),
    met := boolean(),
    peer := number() | undefined,
    peer_label := string(),
    ratio := float() | undefined,
    failed := non_neg_integer(),
    inputs := string(),
    detail := string(),
    atom() => term()
}.
%% One row of the table. `moat' and `peer' are in `unit'; `ratio' is
%% moat's advantage over the peer (above 1: moat does better), `undefined'
%% where there is no peer; `failed' counts moat's tasks that did not
%% succeed; `inputs' and `detail' are the row's printed notes. Rows add
%% their own figures: `p99' and `peer_p99' (rows 2 and 5), `vm_growth'
%% and `rss_growth' (row 4), `peer_failed', and `moat_error' and
%% `peer_error' (row 6: why that side's figure cannot be trusted, printed
%% as ERROR in its place, or `undefined').

-type peer() :: {elixir, string()} | erlang.

%% Row 6: whose restarts a trial measures (the peer's with its counter of
%% starts), and what one trial found.
-type restart_side() :: moat | {peer, atomics:atomics_ref()}.
-type restart_result() :: #{
    restarts := non_neg_integer(),
    crashes := non_neg_integer(),
    retries := non_neg_integer(),
    stale := non_neg_integer(),
    others := non_neg_integer(),
    warm_restarts := non_neg_integer(),
    warm_crashes := non_neg_integer(),
    warm_retries := non_neg_integer(),
    up := boolean(),
    seconds := float(),
    per_second := float()
}.

%% CPU time over some wall time, all in nanoseconds: of the VM's schedulers
%% (the callers, spinning included), of the bench pool's threads, of the
%% whole VM, and of every other process on the machine.
-type usage() :: #{
    wall := integer(),
    schedulers := integer(),
    pool := integer(),
    vm := integer(),
    others := integer()
}.

-define(POOL, moat_bench).
-define(CONCURRENCY, 1024).
-define(ELIXIR_EBIN, "/usr/lib/elixir/lib/elixir/ebin").
-define(MIB, 1048576).
% What the statm field is counted in; Linux on x86_64 and arm64 (4 KiB pages).
-define(PAGE, 4096).
% Row 3: each task's length, and so the ideal rate of one thread.
-define(SPIN_US, 10).
% Row 4: tasks per stream, and the targets (either one is enough).
-define(CHUNK, 100000).
-define(GROWTH_MIB, 16).
-define(GROWTH_SHARE, 0.05).
% The columns: row, figure, moat, target, verdict, peer, moat vs peer.
-define(COLUMNS, [3, 35, 27, 26, 7, 38, 0]).
% The rows of the table (row() says 1..8 too).
-define(ROWS, 10).
% Rows 7 and 8: the C-node pool, and the bare port echo of their peer.
-define(CNODE_POOL, moat_bench_cnode).
% Rows 9 and 10: the C-node pool with process isolation.
-define(PROC_POOL, moat_bench_process).
-define(DIST_POOL, moat_bench_dist).
-define(ECHO, "/bin/cat").
% Rows 5 and 6: the peer's registered name, and the restart intensity of
% the bench pool's native supervisor and of the peer's OTP supervisor.
-define(PEER_SERVER, moat_bench_peer).
-define(INTENSITY, 100000000).
-define(PERIOD, 1).

%%%===================================================================
%%% API
%%%===================================================================

%% @doc What `make bench' runs: the full run, or the quick one when the
%% environment variable `MOAT_BENCH_QUICK' is set to anything but `0'.
%% Returns `error' when moat or a peer lost or failed tasks in some row (an
%% ERROR line says which), else `ok'; it never halts the VM.
-spec main() -> ok | error.
main() ->
    Quick =
        case os:getenv("MOAT_BENCH_QUICK") of
            false -> false;
            "" -> false;
            "0" -> false;
            _ -> true
        end,
    Rows = run(#{quick => Quick}),
    Clean = fun(#{failed := F} = R) ->
        F + maps:get(peer_failed, R, 0) =:= 0 andalso
            maps:get(moat_error, R, undefined) =:= undefined andalso
            maps:get(peer_error, R, undefined) =:= undefined
    end,
    case lists:all(Clean, Rows) of
        true -> ok;
        false -> error
    end.

%% @doc Runs every row, prints the table and returns its rows.
%%
%% `Opts': `quick' (`false'): a short run with a tenth of the tasks.
%% Starts moat if needed and the pool `moat_bench' (a pool of that name
%% left over from an interrupted run is replaced), and stops the pool
%% before returning. Other options raise `badarg'.
-spec run(map()) -> [row()].
run(Opts) when is_map(Opts) ->
    Quick =
        case maps:get(quick, Opts, false) of
            Q when is_boolean(Q) -> Q;
            _ -> error(badarg)
        end,
    [] =:= maps:keys(maps:remove(quick, Opts)) orelse error(badarg),
    {ok, _} = application:ensure_all_started(moat),
    Size = erlang:system_info(schedulers_online),
    _ = moat:stop_pool(?POOL),
    {ok, _} = moat:start_pool(?POOL, #{
        size => Size,
        servers => [
            #{id => c, start => {moat_demo, counter, [0]}},
            #{id => crasher, start => {moat_demo, counter, [0]}}
        ],
        max_restarts => ?INTENSITY,
        max_seconds => ?PERIOD
    }),
    _ = moat:stop_pool(?CNODE_POOL),
    {ok, _} = moat:start_pool(?CNODE_POOL, #{backend => cnode, size => Size}),
    _ = moat:stop_pool(?PROC_POOL),
    {ok, _} = moat:start_pool(?PROC_POOL, #{
        backend => cnode,
        isolation => process,
        size => Size,
        max_restarts => ?INTENSITY,
        max_seconds => ?PERIOD
    }),
    Distributed = distributed(),
    _ = moat:stop_pool(?DIST_POOL),
    {ok, _} = moat:start_pool(?DIST_POOL, #{
        backend => cnode, transport => distribution, size => Size
    }),
    T0 = erlang:monotonic_time(millisecond),
    try
        Peer = peer(),
        Header = header(Quick, Size, Peer),
        Rows = [
            row_fanout(Quick, Size, Peer),
            row_round_trip(Quick),
            row_cpu(Quick, Size, Peer),
            row_memory(Quick),
            row_call(Quick),
            row_restarts(Quick),
            row_cnode_round_trip(Quick),
            row_cnode_fanout(Quick, Size),
            row_process_fanout(Quick, Size),
            row_process_restarts(Quick),
            row_dist_round_trip(Quick)
        ],
        status(""),
        Seconds = (erlang:monotonic_time(millisecond) - T0) / 1000,
        print(Header, Rows, Seconds),
        Rows
    catch
        Class:Reason:Stack ->
            status(""),
            erlang:raise(Class, Reason, Stack)
    after
        moat:stop_pool(?POOL),
        moat:stop_pool(?CNODE_POOL),
        moat:stop_pool(?PROC_POOL),
        moat:stop_pool(?DIST_POOL),
        Distributed andalso net_kernel:stop()
    end;
run(_) ->
    error(badarg).

%% @equiv fanout(Pool, Task, N, #{})
-spec fanout(moat:pool(), atom(), non_neg_integer()) -> fanout_result().
fanout(Pool, Task, N) ->
    fanout(Pool, Task, N, #{}).

%% @doc Runs `N' tasks `Task' on `Pool' through
%% `moat:async_stream(Pool, Task, Inputs, #{max_concurrency => C,
%% ordered => false, on_timeout => kill_task})' in the calling process, and
%% measures the wall time from the call until every element is in.
%%
%% `Opts': `concurrency' (`C', default 1024) and `arg' (every task's one
%% argument, default 1: what `echo' returns, or the microseconds of
%% `spin'). The inputs are built before the clock starts. A task that
%% times out (after 5 s) is counted in `failed' rather than exiting the
%% caller. Bad arguments raise `badarg'.
-spec fanout(moat:pool(), atom(), non_neg_integer(), map()) -> fanout_result().
fanout(Pool, Task, N, Opts) when
    is_atom(Pool), is_atom(Task), is_integer(N), N >= 0, is_map(Opts)
->
    C = maps:get(concurrency, Opts, ?CONCURRENCY),
    (is_integer(C) andalso C > 0) orelse error(badarg),
    [] =:= maps:keys(maps:without([concurrency, arg], Opts)) orelse error(badarg),
    Inputs = lists:duplicate(N, maps:get(arg, Opts, 1)),
    StreamOpts = #{max_concurrency => C, ordered => false, on_timeout => kill_task},
    T0 = erlang:monotonic_time(nanosecond),
    Elems = moat:async_stream(Pool, Task, Inputs, StreamOpts),
    Seconds = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    #{
        tasks => N,
        seconds => Seconds,
        per_second => rate(N, Seconds),
        concurrency => C,
        failed => failed(Elems)
    };
fanout(_, _, _, _) ->
    error(badarg).

%%%===================================================================
%%% Rows
%%%===================================================================

%% Row 1: moat's fan-out of trivial tasks against the peer's, trials
%% alternating.
-spec row_fanout(boolean(), pos_integer(), peer()) -> row().
row_fanout(Quick, Size, Peer) ->
    N = pick(Quick, 100000, 1000000),
    Identity = fun(X) -> X end,
    {MoatRuns, MoatUsage, PeerRuns, PeerUsage} = alternating_trials(
        1,
        fun() -> fanout(?POOL, echo, N) end,
        fun() -> peer_fanout(Peer, Identity, 1, N, Size) end
    ),
    Moat = median([R || #{per_second := R} <- MoatRuns]),
    PeerRate = median([R || #{per_second := R} <- PeerRuns]),
    Ratio = PeerRate > 0 andalso Moat / PeerRate,
    Failed = lists:sum([F || #{failed := F} <- MoatRuns]),
    #{
        row => 1,
        figure => "fan-out, trivial tasks (echo)",
        moat => Moat,
        unit => "tasks/s",
        target => ">= 1 M/s and >= 10x peer",
        met => Moat >= 1.0e6 andalso Ratio =/= false andalso Ratio >= 10,
        peer => PeerRate,
        peer_label => peer_label(Peer),
        ratio => ratio(Ratio),
        failed => Failed,
        peer_failed => lists:sum([F || #{failed := F} <- PeerRuns]),
        inputs => lists:flatten(
            io_lib:format(
                "~b tasks per trial, 3 trials each, alternating; moat: echo [1], pool "
                "of ~b threads, max_concurrency ~b, unordered; peer: ~s",
                [N, Size, ?CONCURRENCY, peer_text(Peer, "fun(X) -> X end", Size)]
            )
        ),
        detail => lists:flatten(
            io_lib:format(
                "trials (k tasks/s): moat ~s; peer ~s; ~s",
                [trials(MoatRuns), trials(PeerRuns), cpu_text(MoatUsage, PeerUsage)]
            )
        )
    }.

%% Three trials of moat's fan-out and three of the peer's, alternating:
%% each side's results and CPU usages.
-spec alternating_trials(pos_integer(), fun(() -> fanout_result()), fun(() -> fanout_result())) ->
    {[fanout_result()], [usage()], [fanout_result()], [usage()]}.
alternating_trials(Row, MoatFun, PeerFun) ->
    Trials = [{trial(Row, I, moat, MoatFun), trial(Row, I, peer, PeerFun)} || I <- [1, 2, 3]],
    {MoatTrials, PeerTrials} = lists:unzip(Trials),
    {MoatRuns, MoatUsage} = lists:unzip(MoatTrials),
    {PeerRuns, PeerUsage} = lists:unzip(PeerTrials),
    {MoatRuns, MoatUsage, PeerRuns, PeerUsage}.

%% Row 2: one moat:run/3 at a time against one spawn_monitor and reply at
%% a time, in alternating blocks, every call timed on its own.
-spec row_round_trip(boolean()) -> row().
row_round_trip(Quick) ->
    Pool = ?POOL,
    latency_row(
        2,
        Quick,
        "round trip, run/3 echo, median",
        "spawn_monitor + reply",
        fun() -> moat:run(Pool, echo, [1]) =:= {ok, 1} end,
        fun spawn_reply/0,
        "peer: spawn_monitor of a process that sends one reply, then wait for the "
        "reply and the DOWN (a dirty NIF call would need a NIF moat lacks)",
        3.0
    ).

%% A latency row (2 and 5): one moat call at a time against one peer call
%% at a time, in alternating blocks, every call timed on its own; medians
%% against the 3 us target.
-spec latency_row(pos_integer(), boolean(), string(), string(),
                  fun(() -> boolean()), fun(() -> boolean()), string(), float()) -> row().
latency_row(Row, Quick, Figure, PeerLabel, MoatCall, PeerCall, What, TargetUs) ->
    Calls = pick(Quick, 20000, 100000),
    Blocks = 10,
    {MoatBlocks, PeerBlocks} = timed_blocks(Row, Calls, Blocks, MoatCall, PeerCall),
    {MoatMed, MoatP99, MoatMean, MoatFailed} = latencies(MoatBlocks),
    {PeerMed, PeerP99, PeerMean, PeerFailed} = latencies(PeerBlocks),
    MoatUsage = [U || {_, U} <- MoatBlocks],
    PeerUsage = [U || {_, U} <- PeerBlocks],
    #{
        row => Row,
        figure => Figure,
        moat => MoatMed,
        unit => "us",
        target => lists:flatten(io_lib:format("median <= ~w us", [round(TargetUs)])),
        met => MoatMed =< TargetUs,
        peer => PeerMed,
        peer_label => PeerLabel,
        ratio => ratio(MoatMed > 0 andalso PeerMed / MoatMed),
        failed => MoatFailed,
        peer_failed => PeerFailed,
        p99 => MoatP99,
        peer_p99 => PeerP99,
        inputs => lists:flatten(
            io_lib:format(
                "~b calls each, one outstanding, in ~b alternating blocks after "
                "1000 warm-up calls a block; each call timed on its own; ~s",
                [Calls, Blocks, What]
            )
        ),
        detail => lists:flatten(
            io_lib:format(
                "p99 (us): moat ~.2f, peer ~.2f; mean (us): moat ~.2f, peer ~.2f; "
                "block medians (us): moat ~s; peer ~s; ~s",
                [
                    MoatP99,
                    PeerP99,
                    MoatMean,
                    PeerMean,
                    block_medians(MoatBlocks),
                    block_medians(PeerBlocks),
                    cpu_text(MoatUsage, PeerUsage)
                ]
            )
        )
    }.

%% Row 3: 10 us CPU tasks, as a share of what the pool's threads could do.
-spec row_cpu(boolean(), pos_integer(), peer()) -> row().
row_cpu(Quick, Size, Peer) ->
    N = pick(Quick, 20000, 100000),
    Ideal = Size * 1.0e6 / ?SPIN_US,
    Spin = fun busy_wait/1,
    {MoatRuns, MoatUsage, PeerRuns, PeerUsage} = alternating_trials(
        3,
        fun() -> fanout(?POOL, spin, N, #{arg => ?SPIN_US}) end,
        fun() -> peer_fanout(Peer, Spin, ?SPIN_US, N, Size) end
    ),
    Moat = 100 * median([R || #{per_second := R} <- MoatRuns]) / Ideal,
    PeerShare = 100 * median([R || #{per_second := R} <- PeerRuns]) / Ideal,
    #{
        row => 3,
        figure => "10 us CPU tasks (spin), % of ideal",
        moat => Moat,
        unit => "%",
        target => ">= 90% of ideal",
        met => Moat >= 90,
        peer => PeerShare,
        peer_label => peer_label(Peer),
        ratio => ratio(PeerShare > 0 andalso Moat / PeerShare),
        failed => lists:sum([F || #{failed := F} <- MoatRuns]),
        peer_failed => lists:sum([F || #{failed := F} <- PeerRuns]),
        inputs => lists:flatten(
            io_lib:format(
                "~b tasks per trial, 3 trials each, alternating; ideal ~b x ~b k/s = "
                "~b k/s; moat: spin [~b] (busy loop on the monotonic clock), "
                "max_concurrency ~b, unordered; peer: ~s",
                [
                    N,
                    Size,
                    1000 div ?SPIN_US,
                    round(Ideal / 1000),
                    ?SPIN_US,
                    ?CONCURRENCY,
                    peer_text(Peer, "a busy loop on monotonic_time(nanosecond)", Size)
                ]
            )
        ),
        detail => lists:flatten(
            io_lib:format(
                "trials (k tasks/s): moat ~s; peer ~s; ~s",
                [trials(MoatRuns), trials(PeerRuns), cpu_text(MoatUsage, PeerUsage)]
            )
        )
    }.

%% Row 4: memory after a warm-up and after many more tasks.
-spec row_memory(boolean()) -> row().
row_memory(Quick) ->
    Total = pick(Quick, 1000000, 10000000),
    Warm = Total div 10,
    {{Samples, Failed}, Usage} =
        isolated(fun() -> usage(fun() -> memory_run(Warm, Total) end) end),
    {_, Vm0, Rss0} = hd(Samples),
    {_, Vm1, Rss1} = lists:last(Samples),
    Vm = (Vm1 - Vm0) / ?MIB,
    Rss = (Rss1 - Rss0) / ?MIB,
    Met = no_growth(Vm0, Vm1) andalso no_growth(Rss0, Rss1),
    #{
        row => 4,
        figure => "memory growth, trivial tasks",
        moat => Rss,
        unit => "MiB",
        target => "< 16 MiB or < 5% each",
        met => Met,
        peer => undefined,
        peer_label => "(none: the target is absolute)",
        ratio => undefined,
        failed => Failed,
        vm_growth => Vm,
        rss_growth => Rss,
        inputs => lists:flatten(
            io_lib:format(
                "~b echo tasks in streams of ~b, max_concurrency ~b, unordered; "
                "sampled after the first ~b (warm-up) and at the end, each after "
                "garbage collecting every process; also sampled every ~b between "
                "them, for the range and the trend (least squares)",
                [Total, ?CHUNK, ?CONCURRENCY, Warm, Warm]
            )
        ),
        detail => lists:flatten(
            io_lib:format(
                "OS RSS ~.1f -> ~.1f MiB, ~s; erlang:memory(total) ~.1f -> ~.1f MiB, ~s; "
                "~b k tasks/s; ~s",
                [
                    Rss0 / ?MIB,
                    Rss1 / ?MIB,
                    spread([{D, R} || {D, _, R} <- Samples]),
                    Vm0 / ?MIB,
                    Vm1 / ?MIB,
                    spread([{D, V} || {D, V, _} <- Samples]),
                    round(Total / max(1, maps:get(wall, Usage)) * 1.0e6),
                    cpu_text([Usage], [])
                ]
            )
        )
    }.


%% Row 5: one moat:call/4 to a native counter at a time against one
%% gen_server:call/3 to an Erlang counter at a time, in alternating blocks,
%% every call timed on its own.
-spec row_call(boolean()) -> row().
row_call(Quick) ->
    Pool = ?POOL,
    {ok, Peer} = gen_server:start({local, ?PEER_SERVER}, ?MODULE, {counter, undefined}, []),
    try
        latency_row(
            5,
            Quick,
            "call round trip, call/4 get, median",
            "gen_server:call",
            fun() -> moat:call(Pool, c, get, 5000) =:= {ok, 0} end,
            fun() ->
                try
                    gen_server:call(?PEER_SERVER, get, 5000) =:= 0
                catch
                    exit:_ -> false
                end
            end,
            lists:flatten(
                io_lib:format(
                    "moat: moat:call(~s, c, get, 5000) to the native server c "
                    "(moat_demo counter [0]) of the bench pool; peer: "
                    "gen_server:call(~s, get, 5000) to a registered Erlang "
                    "gen_server counter (moat_bench's own callbacks)",
                    [?POOL, ?PEER_SERVER]
                )
            ),
            3.0
        )
    after
        gen_server:stop(Peer)
    end.

%% Row 7: one moat:run/3 at a time on the C-node pool against one bare
%% port echo at a time, in alternating blocks, every call timed on its own.
-spec row_cnode_round_trip(boolean()) -> row().
row_cnode_round_trip(Quick) ->
    Pool = ?CNODE_POOL,
    latency_row(
        7,
        Quick,
        "C-node round trip, run/3 echo, median",
        "port echo ({packet,4})",
        fun() -> moat:run(Pool, echo, [1]) =:= {ok, 1} end,
        fun port_echo/0,
        "moat: the C-node pool moat_bench_cnode (backend cnode, thread "
        "isolation, port transport); peer: one byte through a {packet, 4} "
        "port to " ?ECHO " and back",
        20.0
    ).

%% Row 8: fan-out of trivial tasks on the C-node pool against the bare
%% port echo pipelined, trials alternating.
-spec row_cnode_fanout(boolean(), pos_integer()) -> row().
row_cnode_fanout(Quick, Size) ->
    N = pick(Quick, 50000, 300000),
    port_fanout_row(
        {8, "C-node fan-out, trivial tasks (echo)", 5.0e5, ">= 500 k/s"},
        ?CNODE_POOL,
        N,
        io_lib:format("the C-node pool ~s (thread isolation, ~b threads)", [?CNODE_POOL, Size])
    ).

%% Row 9: the same with process isolation.
-spec row_process_fanout(boolean(), pos_integer()) -> row().
row_process_fanout(Quick, Size) ->
    N = pick(Quick, 20000, 100000),
    port_fanout_row(
        {9, "process isolation fan-out (echo)", 1.0e5, ">= 100 k/s"},
        ?PROC_POOL,
        N,
        io_lib:format("the C-node pool ~s (process isolation, ~b workers, 1 spare)", [
            ?PROC_POOL, Size
        ])
    ).

%% A fan-out row of a C-node pool against the bare port echo pipelined
%% (N one-byte packets, ?CONCURRENCY in flight), trials alternating.
-spec port_fanout_row({pos_integer(), string(), float(), string()}, moat:pool(),
                      pos_integer(), iodata()) -> row().
port_fanout_row({Row, Figure, Target, TargetText}, Pool, N, PoolText) ->
    {MoatRuns, MoatUsage, PeerRuns, PeerUsage} = alternating_trials(
        Row,
        fun() -> fanout(Pool, echo, N) end,
        fun() -> port_pipeline(N, ?CONCURRENCY) end
    ),
    Moat = median([R || #{per_second := R} <- MoatRuns]),
    PeerRate = median([R || #{per_second := R} <- PeerRuns]),
    #{
        row => Row,
        figure => Figure,
        moat => Moat,
        unit => "tasks/s",
        target => TargetText,
        met => Moat >= Target,
        peer => PeerRate,
        peer_label => "port echo, pipelined",
        ratio => ratio(PeerRate > 0 andalso Moat / PeerRate),
        failed => lists:sum([F || #{failed := F} <- MoatRuns]),
        peer_failed => lists:sum([F || #{failed := F} <- PeerRuns]),
        inputs => lists:flatten(
            io_lib:format(
                "~b tasks per trial, 3 trials each, alternating; moat: echo [1] on "
                "~s, max_concurrency ~b, unordered; peer: ~b one-byte packets "
                "through a {packet, 4} port to " ?ECHO ", ~b in flight",
                [N, PoolText, ?CONCURRENCY, N, ?CONCURRENCY]
            )
        ),
        detail => lists:flatten(
            io_lib:format(
                "trials (k tasks/s): moat ~s; peer ~s; ~s",
                [trials(MoatRuns), trials(PeerRuns), cpu_text(MoatUsage, PeerUsage)]
            )
        )
    }.

%% Row 10: worker processes replaced per second, one segfault at a time.
-spec row_process_restarts(boolean()) -> row().
row_process_restarts(Quick) ->
    N = pick(Quick, 300, 2000),
    Runs = [
        element(1, trial(10, I, moat, fun() -> crash_workers(N) end))
     || I <- [1, 2, 3]
    ],
    Moat = median([R || #{per_second := R} <- Runs]),
    #{
        row => 10,
        figure => "process isolation worker restarts",
        moat => Moat,
        unit => "restarts/s",
        target => ">= 2000/s",
        met => Moat >= 2000,
        peer => undefined,
        peer_label => "(none)",
        ratio => undefined,
        failed => lists:sum([F || #{failed := F} <- Runs]),
        inputs => lists:flatten(
            io_lib:format(
                "~b segfault tasks per trial, one at a time, 3 trials; each kills "
                "its worker, a spare takes its place and a new spare is spawned; "
                "timed from the first submit to the last outcome",
                [N]
            )
        ),
        detail => lists:flatten(
            io_lib:format("trials (restarts/s): ~s", [
                lists:join(" / ", [io_lib:format("~b", [round(R)]) || #{per_second := R} <- Runs])
            ])
        )
    }.

%% N segfault tasks in turn on the process pool; a task whose outcome is
%% not {native_crash, sigsegv} counts as failed.
-spec crash_workers(pos_integer()) -> fanout_result().
crash_workers(N) ->
    T0 = erlang:monotonic_time(nanosecond),
    Failed = length([
        x
     || _ <- lists:seq(1, N),
        moat:run(?PROC_POOL, segfault, []) =/= {exit, {native_crash, sigsegv}}
    ]),
    Seconds = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    #{tasks => N, seconds => Seconds, per_second => rate(N, Seconds), concurrency => 1, failed => Failed}.

%% Row 11: one moat:run/3 at a time on the C-node pool over distribution
%% against one bare ei echo at a time (the same C-node's moat_echo name).
-spec row_dist_round_trip(boolean()) -> row().
row_dist_round_trip(Quick) ->
    Pool = ?DIST_POOL,
    Prefix = "moat_" ++ atom_to_list(Pool) ++ "_",
    [Node] = [N || N <- nodes(hidden), lists:prefix(Prefix, atom_to_list(N))],
    latency_row(
        11,
        Quick,
        "distribution round trip, run/3 echo, median",
        "ei echo (one message)",
        fun() -> moat:run(Pool, echo, [1]) =:= {ok, 1} end,
        fun() -> ei_echo(Node) end,
        "moat: the C-node pool moat_bench_dist (backend cnode, thread "
        "isolation, transport distribution); peer: one message to the same "
        "C-node's moat_echo name and back, over the same connection",
        35.0
    ).

%% Makes this VM a distributed node unless it is one; returns whether it
%% did.
-spec distributed() -> boolean().
distributed() ->
    case erlang:is_alive() of
        true ->
            false;
        false ->
            _ = os:cmd("epmd -daemon"),
            Name = list_to_atom("moat_bench_" ++ os:getpid()),
            {ok, _} = net_kernel:start([Name, shortnames]),
            true
    end.

%% One message to the C-node's echo name and back.
-spec ei_echo(node()) -> boolean().
ei_echo(Node) ->
    Ref = make_ref(),
    {moat_echo, Node} ! {self(), Ref},
    receive
        {_, Ref} -> true
    after 5000 -> false
    end.

%% One byte through the calling process's own echo port and back.
-spec port_echo() -> boolean().
port_echo() ->
    Port = echo_port(),
    true = port_command(Port, <<1>>),
    receive
        {Port, {data, <<1>>}} -> true
    after 5000 -> false
    end.

echo_port() ->
    case get(moat_bench_echo) of
        undefined ->
            Port = open_port({spawn_executable, ?ECHO}, [{packet, 4}, binary]),
            put(moat_bench_echo, Port),
            Port;
        Port ->
            Port
    end.

%% N one-byte packets through a new echo port, at most Window in flight;
%% the same figures as fanout/4.
-spec port_pipeline(pos_integer(), pos_integer()) -> fanout_result().
port_pipeline(N, Window) ->
    Port = open_port({spawn_executable, ?ECHO}, [{packet, 4}, binary]),
    T0 = erlang:monotonic_time(nanosecond),
    First = min(N, Window),
    [true = port_command(Port, <<1>>) || _ <- lists:seq(1, First)],
    Got = pipeline(Port, N - First, First, 0),
    Seconds = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    port_close(Port),
    #{
        tasks => N,
        seconds => Seconds,
        per_second => rate(N, Seconds),
        concurrency => Window,
        failed => N - Got
    }.

pipeline(_Port, 0, 0, Got) ->
    Got;
pipeline(Port, ToSend, InFlight, Got) ->
    receive
        {Port, {data, _}} when ToSend > 0 ->
            true = port_command(Port, <<1>>),
            pipeline(Port, ToSend - 1, InFlight, Got + 1);
        {Port, {data, _}} ->
            pipeline(Port, 0, InFlight - 1, Got + 1)
    after 5000 -> Got
    end.

%% Row 6: restarts of a native server under the pool's native supervisor,
%% each provoked by a moat:call/4 that crashes it, against an OTP
%% supervisor restarting a gen_server crashed the same way; timed trials,
%% alternating, each after a warm-up.
-spec row_restarts(boolean()) -> row().
row_restarts(Quick) ->
    {WarmMs, TimedMs} = pick(Quick, {200, 400}, {1000, 2000}),
    Starts = atomics:new(1, []),
    {ok, Sup} = supervisor:start_link(?MODULE, {peer_sup, Starts}),
    % The trials run in processes of their own; the row stops it.
    true = unlink(Sup),
    Quiet = [gen_server, proc_lib, supervisor],
    Saved = logger:get_module_level(Quiet),
    try
        % Else every crash of the peer logs three reports (the gen_server's
        % error, the crash report, the supervisor's child_terminated).
        ok = logger:set_module_level(Quiet, none),
        Trials = [
            {
                trial(6, I, moat, fun() -> restart_trial(moat, WarmMs, TimedMs) end),
                trial(6, I, peer, fun() -> restart_trial({peer, Starts}, WarmMs, TimedMs) end)
            }
         || I <- [1, 2, 3]
        ],
        {MoatTrials, PeerTrials} = lists:unzip(Trials),
        {MoatRuns, MoatUsage} = lists:unzip(MoatTrials),
        {PeerRuns, PeerUsage} = lists:unzip(PeerTrials),
        restarts_row(WarmMs, TimedMs, MoatRuns, MoatUsage, PeerRuns, PeerUsage)
    after
        ok = logger:unset_module_level(Quiet),
        _ = [logger:set_module_level(M, L) || {M, L} <- Saved],
        gen_server:stop(Sup)
    end.

-spec restarts_row(
    pos_integer(), pos_integer(), [restart_result()], [usage()], [restart_result()], [usage()]
) -> row().
restarts_row(WarmMs, TimedMs, MoatRuns, MoatUsage, PeerRuns, PeerUsage) ->
    MoatError = count_error(MoatRuns),
    PeerError = count_error(PeerRuns),
    Moat = median([R || #{per_second := R} <- MoatRuns]),
    PeerRate = median([R || #{per_second := R} <- PeerRuns]),
    Ratio =
        MoatError =:= undefined andalso PeerError =:= undefined andalso PeerRate > 0 andalso
            Moat / PeerRate,
    #{
        row => 6,
        figure => "restarts incl. a call/4 round trip",
        moat => Moat,
        unit => "restarts/s",
        target => ">= 10x peer",
        met => Ratio =/= false andalso Ratio >= 10,
        peer => PeerRate,
        peer_label => "OTP supervisor",
        ratio => ratio(Ratio),
        failed => lists:sum([O || #{others := O} <- MoatRuns]),
        peer_failed => lists:sum([O || #{others := O} <- PeerRuns]),
        moat_error => MoatError,
        peer_error => PeerError,
        inputs => lists:flatten(
            io_lib:format(
                "a call round trip per restart, in the loop: call {stop, {crash, I}} "
                "(I counts the calls, so each crash is told from a stale reply), the "
                "server exits with that reason, the caller gets it as {exit, _}, exit "
                "signal to the pool's native supervisor (one_for_one, intensity ~b in "
                "~b s), restart, init of moat_demo counter [0] (server crasher of the "
                "bench pool); the next call goes as soon as the reply is in, and "
                "another follows, after erlang:yield(), while it gets {exit, noproc} "
                "(restart pending) or a stale reply; restarts counted by "
                "moat:stats/1; 3 trials each, alternating, each ~b ms of warm-up then "
                "~b ms timed, until the server answers after the last crash; peer: "
                "the same loop with gen_server:call/3 to a registered gen_server "
                "whose handle_call({stop, R}) returns {stop, R, _}, under an OTP "
                "supervisor (one_for_one, same intensity; its check scans the "
                "restarts of the last second), starts counted in init; logger off "
                "for gen_server, proc_lib and supervisor meanwhile. The restart alone, "
                "in C with no Erlang in the loop (target >= 1 M/s), is bench_core's "
                "row 5",
                [?INTENSITY, ?PERIOD, WarmMs, TimedMs]
            )
        ),
        detail => lists:flatten(
            io_lib:format(
                "trials (k restarts/s): moat ~s; peer ~s; noproc retries per restart: "
                "moat ~.2f, peer ~.2f; stale calls (answered with the previous "
                "call's crash): moat ~b, peer ~b; restarts counted (crashes), "
                "warm-up + timed: moat ~s; peer ~s; ~s",
                [
                    restart_trials(MoatRuns),
                    restart_trials(PeerRuns),
                    retries_per_restart(MoatRuns),
                    retries_per_restart(PeerRuns),
                    lists:sum([S || #{stale := S} <- MoatRuns]),
                    lists:sum([S || #{stale := S} <- PeerRuns]),
                    restart_counts(MoatRuns),
                    restart_counts(PeerRuns),
                    cpu_text(MoatUsage, PeerUsage)
                ]
            )
        )
    }.

%%%===================================================================
%%% Measuring
%%%===================================================================

%% Runs Fun in a fresh process, with the status line naming it, and
%% measures the CPU time it took.
-spec trial(1..10, pos_integer(), moat | peer, fun(() -> Result)) -> {Result, usage()}.
trial(Row, I, Who, Fun) ->
    status(io_lib:format("moat_bench: row ~b of ~b, trial ~b, ~s ...", [Row, ?ROWS, I, Who])),
    isolated(fun() -> usage(Fun) end).

%% Fun's value, computed in a fresh process so that no trial inherits the
%% heap (or the mailbox) of another.
-spec isolated(fun(() -> Result)) -> Result.
isolated(Fun) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({?MODULE, Fun()}) end),
    receive
        {'DOWN', Ref, process, Pid, {?MODULE, Result}} -> Result;
        {'DOWN', Ref, process, Pid, Reason} -> error({trial_failed, Reason})
    end.

%% N runs of F through the peer, timed like fanout/4.
-spec peer_fanout(peer(), fun((term()) -> term()), term(), non_neg_integer(), pos_integer()) ->
    fanout_result().
peer_fanout(Peer, F, Arg, N, Max) ->
    Inputs = lists:duplicate(N, Arg),
    T0 = erlang:monotonic_time(nanosecond),
    Elems = peer_stream(Peer, Inputs, F, Max),
    Seconds = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    #{
        tasks => N,
        seconds => Seconds,
        per_second => rate(N, Seconds),
        concurrency => Max,
        failed => failed(Elems)
    }.

-spec peer_stream(peer(), list(), fun((term()) -> term()), pos_integer()) ->
    [moat:outcome()].
peer_stream({elixir, _}, Inputs, F, Max) ->
    Stream = 'Elixir.Task':async_stream(Inputs, F, [{max_concurrency, Max}, {ordered, false}]),
    'Elixir.Enum':to_list(Stream);
peer_stream(erlang, Inputs, F, Max) ->
    erl_stream(Inputs, F, Max, 0, []).

%% The Erlang stand-in for Task.async_stream: at most Max workers at a
%% time, each spawn_monitor'ed and replying once; elements in completion
%% order.
-spec erl_stream(list(), fun((term()) -> term()), pos_integer(), non_neg_integer(), list()) ->
    [moat:outcome()].
erl_stream([], _F, _Max, 0, Acc) ->
    Acc;
erl_stream([X | Rest], F, Max, Running, Acc) when Running < Max ->
    Parent = self(),
    _ = spawn_monitor(fun() -> Parent ! {?MODULE, self(), F(X)} end),
    erl_stream(Rest, F, Max, Running + 1, Acc);
erl_stream(Inputs, F, Max, Running, Acc) ->
    receive
        {'DOWN', _, process, Pid, normal} ->
            % The reply came before the DOWN: signals from one process keep
            % their order.
            receive
                {?MODULE, Pid, R} -> erl_stream(Inputs, F, Max, Running - 1, [{ok, R} | Acc])
            end;
        {'DOWN', _, process, _, Reason} ->
            erl_stream(Inputs, F, Max, Running - 1, [{exit, Reason} | Acc])
    end.

%% One call of row 2's peer: spawn a process that replies once, and wait
%% for its reply and its DOWN.
-spec spawn_reply() -> boolean().
spawn_reply() ->
    Parent = self(),
    {Pid, Ref} = spawn_monitor(fun() -> Parent ! {?MODULE, self(), 1} end),
    receive
        {?MODULE, Pid, R} ->
            receive
                {'DOWN', Ref, process, Pid, _} -> R =:= 1
            end
    end.

%% K calls of MoatCall and of PeerCall in alternating blocks, each block
%% in a fresh process after 1000 warm-up calls, every call timed on its
%% own: moat's blocks and the peer's, each {Samples, usage()}.
-spec timed_blocks(
    1..10, pos_integer(), pos_integer(), fun(() -> boolean()), fun(() -> boolean())
) -> {[{[{integer(), boolean()}], usage()}], [{[{integer(), boolean()}], usage()}]}.
timed_blocks(Row, Calls, Blocks, MoatCall, PeerCall) ->
    Block = fun(Who, Call, I) ->
        status(io_lib:format("moat_bench: row ~b of ~b, block ~b, ~s ...", [Row, ?ROWS, I, Who])),
        isolated(fun() ->
            _ = time_calls(Call, 1000, []),
            usage(fun() -> time_calls(Call, Calls div Blocks, []) end)
        end)
    end,
    lists:unzip([
        {Block(moat, MoatCall, I), Block(peer, PeerCall, I)}
     || I <- lists:seq(1, Blocks)
    ]).

%% One trial of row 6 on one side: WarmMs of crashes, then TimedMs of
%% crashes timed from the first call to the moment the server answers
%% again after the last one.
-spec restart_trial(restart_side(), pos_integer(), pos_integer()) -> restart_result().
restart_trial(Side, WarmMs, TimedMs) ->
    Up0 = wait_up(Side),
    R0 = restarts(Side),
    {WarmCrashes, WarmRetries, WarmStale, WarmOthers} =
        crash_loop(Side, deadline(WarmMs), {0, 0, 0, 0}),
    Up1 = wait_up(Side),
    R1 = restarts(Side),
    T0 = erlang:monotonic_time(nanosecond),
    {Crashes, Retries, Stale, Others} = crash_loop(Side, deadline(TimedMs), {0, 0, 0, 0}),
    Up2 = wait_up(Side),
    T1 = erlang:monotonic_time(nanosecond),
    R2 = restarts(Side),
    Seconds = (T1 - T0) / 1.0e9,
    #{
        restarts => R2 - R1,
        crashes => Crashes,
        retries => Retries + element(1, Up2),
        stale => WarmStale + Stale,
        others => WarmOthers + Others,
        warm_restarts => R1 - R0,
        warm_crashes => WarmCrashes,
        warm_retries => WarmRetries,
        up => lists:all(fun({_, Up}) -> Up end, [Up0, Up1, Up2]),
        seconds => Seconds,
        per_second => rate(R2 - R1, Seconds)
    }.

-spec deadline(pos_integer()) -> integer().
deadline(Ms) ->
    erlang:monotonic_time(nanosecond) + Ms * 1000000.

%% Crashes the server until Deadline, one call at a time: {crashes, calls
%% that found it restarting, stale calls, other outcomes}.
%%
%% Each call asks the server to stop with a reason of its own, `{crash, I}'
%% (I counts the calls), so that a call taken in by the server that the
%% previous call crashed, and answered with that crash's reason (moat:call/4
%% allows it: "it crashed on this request or an earlier one"), is told
%% apart from a crash of its own. Such stale calls are retried too, as
%% calls that find the server restarting are, after erlang:yield/0.
-spec crash_loop(restart_side(), integer(), {N, N, N, N}) -> {N, N, N, N} when
    N :: non_neg_integer().
crash_loop(Side, Deadline, Acc) ->
    crash_loop(Side, Deadline, 1, Acc).

-spec crash_loop(restart_side(), integer(), pos_integer(), {N, N, N, N}) -> {N, N, N, N} when
    N :: non_neg_integer().
crash_loop(Side, Deadline, I, {C, R, S, O} = Acc) ->
    case erlang:monotonic_time(nanosecond) < Deadline of
        false ->
            Acc;
        true ->
            % Before a retry, the caller lets the processes of its scheduler
            % run (the peer's restarting child may be one of them).
            case crash(Side, I) of
                crashed ->
                    crash_loop(Side, Deadline, I + 1, {C + 1, R, S, O});
                noproc ->
                    erlang:yield(),
                    crash_loop(Side, Deadline, I + 1, {C, R + 1, S, O});
                stale ->
                    erlang:yield(),
                    crash_loop(Side, Deadline, I + 1, {C, R, S + 1, O});
                other ->
                    crash_loop(Side, Deadline, I + 1, {C, R, S, O + 1})
            end
    end.

-spec crash(restart_side(), pos_integer()) -> crashed | noproc | stale | other.
crash(moat, I) ->
    case moat:call(?POOL, crasher, {stop, {crash, I}}, 5000) of
        {exit, {crash, I}} -> crashed;
        {exit, {crash, _}} -> stale;
        {exit, noproc} -> noproc;
        _ -> other
    end;
crash({peer, _}, I) ->
    try gen_server:call(?PEER_SERVER, {stop, {crash, I}}, 5000) of
        _ -> other
    catch
        exit:{{crash, I}, _} -> crashed;
        exit:{{crash, _}, _} -> stale;
        exit:{noproc, _} -> noproc;
        exit:_ -> other
    end.

%% Calls get until the server answers, for at most 5 s: {the calls that
%% found it restarting, whether it answered}.
-spec wait_up(restart_side()) -> {non_neg_integer(), boolean()}.
wait_up(Side) ->
    wait_up(Side, deadline(5000), 0).

-spec wait_up(restart_side(), integer(), non_neg_integer()) -> {non_neg_integer(), boolean()}.
wait_up(Side, Deadline, Retries) ->
    case answers(Side) of
        true ->
            {Retries, true};
        false ->
            case erlang:monotonic_time(nanosecond) < Deadline of
                true ->
                    erlang:yield(),
                    wait_up(Side, Deadline, Retries + 1);
                false ->
                    {Retries, false}
            end
    end.

-spec answers(restart_side()) -> boolean().
answers(moat) ->
    element(1, moat:call(?POOL, crasher, get, 5000)) =:= ok;
answers({peer, _}) ->
    try gen_server:call(?PEER_SERVER, get, 5000) of
        _ -> true
    catch
        exit:_ -> false
    end.

%% The restarts done so far: the native supervisor's count, or the peer's
%% starts (each init counts one).
-spec restarts(restart_side()) -> non_neg_integer().
restarts(moat) ->
    #{restarts := N} = moat:stats(?POOL),
    N;
restarts({peer, Starts}) ->
    atomics:get(Starts, 1).

%% Why a side's restart figures cannot be trusted, or undefined when every
%% crash was followed by exactly one restart.
-spec count_error([restart_result()]) -> string() | undefined.
count_error(Runs) ->
    Bad = [
        R
     || #{restarts := Rs, crashes := Cs, warm_restarts := WRs, warm_crashes := WCs, up := Up} = R <-
            Runs,
        Rs =/= Cs orelse WRs =/= WCs orelse not Up
    ],
    case Bad of
        [] ->
            undefined;
        _ ->
            lists:flatten(
                io_lib:format(
                    "every crash must be followed by exactly one restart; restarts "
                    "counted (crashes), warm-up + timed, per trial: ~s~s",
                    [
                        restart_counts(Runs),
                        [
                            "; the server did not answer within 5 s after some crash"
                         || lists:any(fun(#{up := Up}) -> not Up end, Runs)
                        ]
                    ]
                )
            )
    end.

-spec restart_trials([restart_result()]) -> iolist().
restart_trials(Runs) ->
    lists:join(" / ", [io_lib:format("~.1f", [R / 1000]) || #{per_second := R} <- Runs]).

-spec restart_counts([restart_result()]) -> iolist().
restart_counts(Runs) ->
    lists:join(
        " / ",
        [
            io_lib:format("~b (~b) + ~b (~b)", [WRs, WCs, Rs, Cs])
         || #{warm_restarts := WRs, warm_crashes := WCs, restarts := Rs, crashes := Cs} <- Runs
        ]
    ).

-spec retries_per_restart([restart_result()]) -> float().
retries_per_restart(Runs) ->
    lists:sum([R || #{retries := R} <- Runs]) / max(1, lists:sum([C || #{crashes := C} <- Runs])).

%% K calls of Call, each timed: [{Nanoseconds, Succeeded}].
-spec time_calls(fun(() -> boolean()), non_neg_integer(), [{integer(), boolean()}]) ->
    [{integer(), boolean()}].
time_calls(_Call, 0, Acc) ->
    Acc;
time_calls(Call, K, Acc) ->
    T0 = erlang:monotonic_time(nanosecond),
    Ok = Call(),
    T1 = erlang:monotonic_time(nanosecond),
    time_calls(Call, K - 1, [{T1 - T0, Ok} | Acc]).

%% Median, p99 and mean (us) and the failed calls of row 2's blocks.
-spec latencies([{[{integer(), boolean()}], usage()}]) ->
    {float(), float(), float(), non_neg_integer()}.
latencies(Blocks) ->
    Samples = lists:append([S || {S, _} <- Blocks]),
    Sorted = lists:sort([T || {T, _} <- Samples]),
    N = length(Sorted),
    {
        percentile(Sorted, N, 0.5) / 1000,
        percentile(Sorted, N, 0.99) / 1000,
        lists:sum(Sorted) / max(1, N) / 1000,
        length([x || {_, false} <- Samples])
    }.

%% Each block's median (us), to show how the figure moved during the row.
-spec block_medians([{[{integer(), boolean()}], usage()}]) -> iolist().
block_medians(Blocks) ->
    Medians = [median([T || {T, _} <- S]) / 1000 || {S, _} <- Blocks],
    lists:join(" ", [io_lib:format("~.1f", [M]) || M <- Medians]).

%% Row 4's body: streams of ?CHUNK echo tasks until Total have run, with
%% samples after Warm and at the end.
-spec memory_run(pos_integer(), pos_integer()) ->
    {[{pos_integer(), integer(), integer()}], non_neg_integer()}.
memory_run(Warm, Total) ->
    Failed = chunks(0, Warm, Total, 0),
    memory_run(Warm, Warm, Total, Failed, [memory_sample(Warm)]).

%% Runs Step tasks at a time from Done up to Total, sampling after each
%% step: the samples in order, and the tasks that failed.
-spec memory_run(
    pos_integer(),
    pos_integer(),
    pos_integer(),
    non_neg_integer(),
    [{pos_integer(), integer(), integer()}]
) ->
    {[{pos_integer(), integer(), integer()}], non_neg_integer()}.
memory_run(Done, _Step, Total, Failed, Samples) when Done >= Total ->
    {lists:reverse(Samples), Failed};
memory_run(Done, Step, Total, Failed0, Samples) ->
    Next = min(Total, Done + Step),
    Failed = chunks(Done, Next, Total, Failed0),
    memory_run(Next, Step, Total, Failed, [memory_sample(Next) | Samples]).

-spec chunks(non_neg_integer(), non_neg_integer(), pos_integer(), non_neg_integer()) ->
    non_neg_integer().
chunks(Done, Until, _Total, Failed) when Done >= Until ->
    Failed;
chunks(Done, Until, Total, Failed) ->
    N = min(?CHUNK, Until - Done),
    #{failed := F} = fanout(?POOL, echo, N),
    status(
        io_lib:format(
            "moat_bench: row 4 of ~b, memory: ~.1f of ~b M tasks",
            [?ROWS, (Done + N) / 1.0e6, Total div 1000000]
        )
    ),
    chunks(Done + N, Until, Total, Failed + F).

%% The tasks run so far, erlang:memory(total) and the resident set size,
%% in bytes, after a garbage collection of every process.
-spec memory_sample(pos_integer()) -> {pos_integer(), integer(), integer()}.
memory_sample(Done) ->
    _ = [erlang:garbage_collect(P) || P <- erlang:processes()],
    {Done, erlang:memory(total), rss()}.

-spec rss() -> integer().
rss() ->
    {ok, Statm} = file:read_file("/proc/self/statm"),
    [_Size, Resident | _] = binary:split(Statm, <<" ">>, [global]),
    binary_to_integer(Resident) * ?PAGE.

%% Fun's value and the CPU time spent while it ran. The figures come from
%% /proc in clock ticks (10 ms): good over a trial, not over one call.
-spec usage(fun(() -> T)) -> {T, usage()}.
usage(Fun) ->
    U0 = cpu_snapshot(),
    Result = Fun(),
    U1 = cpu_snapshot(),
    {Result, maps:map(fun(K, V) -> V - maps:get(K, U0) end, U1)}.

-spec cpu_snapshot() -> usage().
cpu_snapshot() ->
    Threads = thread_cpu(),
    Vm = stat_cpu("/proc/self/stat"),
    PoolPrefix = <<(atom_to_binary(?POOL))/binary, ":">>,
    #{
        wall => erlang:monotonic_time(nanosecond),
        schedulers => lists:sum([T || {Name, T} <- Threads, is_scheduler(Name)]),
        pool => lists:sum([T || {Name, T} <- Threads, is_prefix(PoolPrefix, Name)]),
        vm => Vm,
        others => machine_busy() - Vm
    }.

%% Every thread of the VM: {Name, CPU ns}. A thread that ends between two
%% snapshots takes its time with it; the pool's threads live as long as
%% the pool.
-spec thread_cpu() -> [{binary(), non_neg_integer()}].
thread_cpu() ->
    case file:list_dir("/proc/self/task") of
        {ok, Tids} ->
            [T || Tid <- Tids, T <- [thread(Tid)], T =/= gone];
        {error, _} ->
            []
    end.

-spec thread(string()) -> {binary(), non_neg_integer()} | gone.
thread(Tid) ->
    case file:read_file(["/proc/self/task/", Tid, "/comm"]) of
        {ok, Comm} ->
            case catch stat_cpu(["/proc/self/task/", Tid, "/stat"]) of
                Ns when is_integer(Ns) -> {string:trim(Comm), Ns};
                _ -> gone
            end;
        {error, _} ->
            gone
    end.

%% The normal schedulers' threads are named 1_scheduler, 2_scheduler, ...
-spec is_scheduler(binary()) -> boolean().
is_scheduler(Name) ->
    case string:split(Name, "_") of
        [N, <<"scheduler">>] ->
            case string:to_integer(N) of
                {I, <<>>} when is_integer(I) -> true;
                _ -> false
            end;
        _ -> false
    end.

-spec is_prefix(binary(), binary()) -> boolean().
is_prefix(Prefix, Name) ->
    string:prefix(Name, Prefix) =/= nomatch.

%% utime + stime of a /proc stat file (a process's or a thread's), in ns.
-spec stat_cpu(iodata()) -> non_neg_integer().
stat_cpu(Path) ->
    {ok, Stat} = file:read_file(Path),
    % The command name may hold spaces; the fields after it do not.
    [_, After] = string:split(Stat, <<")">>, trailing),
    Fields = binary:split(After, <<" ">>, [global, trim_all]),
    % utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    ticks_ns(binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields))).

%% The machine's busy CPU time in ns, all CPUs, from /proc/stat.
-spec machine_busy() -> non_neg_integer().
machine_busy() ->
    {ok, Stat} = file:read_file("/proc/stat"),
    [Cpu | _] = binary:split(Stat, <<"\n">>),
    [<<"cpu">>, User, Nice, System, _Idle, _IoWait, Irq, SoftIrq, Steal | _] =
        binary:split(Cpu, <<" ">>, [global, trim_all]),
    ticks_ns(lists:sum([binary_to_integer(F) || F <- [User, Nice, System, Irq, SoftIrq, Steal]])).

%% /proc counts CPU time in Linux's USER_HZ, 100 ticks a second wherever
%% this runs.
-spec ticks_ns(non_neg_integer()) -> non_neg_integer().
ticks_ns(Ticks) ->
    Ticks * 10000000.

%% Spins for Us microseconds on the monotonic clock, as `spin' does.
-spec busy_wait(non_neg_integer()) -> ok.
busy_wait(Us) ->
    spin_until(erlang:monotonic_time(nanosecond) + Us * 1000).

-spec spin_until(integer()) -> ok.
spin_until(End) ->
    case erlang:monotonic_time(nanosecond) < End of
        true -> spin_until(End);
        false -> ok
    end.

%%%===================================================================
%%% The peer
%%%===================================================================

%% Elixir if it can be loaded, from the code path or from where Debian
%% installs it, else the Erlang stand-in.
-spec peer() -> peer().
peer() ->
    case elixir_loaded() of
        true ->
            elixir_peer();
        false ->
            case code:add_patha(?ELIXIR_EBIN) of
                true ->
                    case elixir_loaded() of
                        true ->
                            elixir_peer();
                        false ->
                            _ = code:del_path(?ELIXIR_EBIN),
                            erlang
                    end;
                {error, _} ->
                    erlang
            end
    end.

-spec elixir_loaded() -> boolean().
elixir_loaded() ->
    lists:all(
        fun(M) -> element(1, code:ensure_loaded(M)) =:= module end,
        ['Elixir.Task', 'Elixir.Enum', 'Elixir.System']
    ).

-spec elixir_peer() -> peer().
elixir_peer() ->
    Version =
        try 'Elixir.System':version() of
            V when is_binary(V) -> binary_to_list(V)
        catch
            _:_ -> "?"
        end,
    {elixir, Version}.

%% The peer as the inputs line describes it.
-spec peer_text(peer(), string(), pos_integer()) -> iolist().
peer_text({elixir, _}, Fun, Max) ->
    io_lib:format(
        "Task.async_stream of ~s, max_concurrency ~b, unordered, then Enum.to_list",
        [Fun, Max]
    );
peer_text(erlang, Fun, Max) ->
    io_lib:format(
        "Elixir not loadable: at most ~b spawn_monitor'ed workers at a time, each "
        "running ~s and replying once",
        [Max, Fun]
    ).

-spec peer_label(peer()) -> string().
peer_label({elixir, _}) -> "Task.async_stream";
peer_label(erlang) -> "Erlang workers (no Elixir)".

%%%===================================================================
%%% The peers of rows 5 and 6
%%%===================================================================

%% @private The Erlang counter (a gen_server whose state is the count), or
%% the OTP supervisor that restarts it under ?PEER_SERVER, each init
%% adding one to `Starts'.
-spec init({counter, atomics:atomics_ref() | undefined} | {peer_sup, atomics:atomics_ref()}) ->
    {ok, term()}.
init({counter, undefined}) ->
    {ok, 0};
init({counter, Starts}) ->
    atomics:add(Starts, 1, 1),
    {ok, 0};
init({peer_sup, Starts}) ->
    Flags = #{strategy => one_for_one, intensity => ?INTENSITY, period => ?PERIOD},
    Child = #{
        id => counter,
        start => {gen_server, start_link, [{local, ?PEER_SERVER}, ?MODULE, {counter, Starts}, []]}
    },
    {ok, {Flags, [Child]}}.

%% @private `get' replies the count; `{stop, Reason}' ends the counter
%% with `Reason' before it replies, as moat_demo's counter does.
-spec handle_call(get | {stop, term()}, gen_server:from(), integer()) ->
    {reply, integer(), integer()} | {stop, term(), integer()}.
handle_call(get, _From, N) ->
    {reply, N, N};
handle_call({stop, Reason}, _From, N) ->
    {stop, Reason, N}.

%% @private
-spec handle_cast(term(), integer()) -> {noreply, integer()}.
handle_cast(_, N) ->
    {noreply, N}.

%%%===================================================================
%%% Printing
%%%===================================================================

-spec header(boolean(), pos_integer(), peer()) -> iolist().
header(Quick, Size, Peer) ->
    PeerText =
        case Peer of
            {elixir, V} ->
                io_lib:format("Elixir ~s Task.async_stream, one worker per scheduler", [V]);
            erlang ->
                "Elixir not found: spawn_monitor workers, one per scheduler"
        end,
    [
        "moat Erlang benchmark (bench/moat_bench.erl)\n",
        io_lib:format(
            "  machine: ~b online CPUs, ~b schedulers online, OTP ~s; load average at start: ~s\n",
            [
                erlang:system_info(logical_processors_available),
                erlang:system_info(schedulers_online),
                erlang:system_info(otp_release),
                loadavg()
            ]
        ),
        io_lib:format(
            "  pool:    ~s with ~b threads (schedulers online), native servers c and "
            "crasher (moat_demo counter [0]), restart intensity ~b in ~b s\n",
            [?POOL, Size, ?INTENSITY, ?PERIOD]
        ),
        io_lib:format("  peer:    ~s\n", [PeerText]),
        io_lib:format(
            "  repeat:  make bench   or, from erl or make shell,  "
            "moat_bench:run(#{quick => ~s}).   (~s run; figures drift 20-40% between "
            "runs: compare within one run)\n\n",
            [Quick, pick(Quick, "quick", "full")]
        )
    ].

-spec loadavg() -> string().
loadavg() ->
    case file:read_file("/proc/loadavg") of
        {ok, L} -> string:trim(binary_to_list(L));
        {error, _} -> "?"
    end.

-spec print(iolist(), [row()], float()) -> ok.
print(Header, Rows, Seconds) ->
    Lines = [
        header_line(),
        [row_lines(R) || R <- Rows],
        io_lib:format("moat_bench: ~.1f s in all\n", [Seconds])
    ],
    io:put_chars([Header | Lines]).

-spec header_line() -> iolist().
header_line() ->
    columns(["row", "figure", "moat", "target", "verdict", "peer", "moat vs peer"]).

-spec row_lines(row()) -> iolist().
row_lines(#{row := N, figure := Figure, target := Target, met := Met} = R) ->
    Verdict =
        case Met of
            true -> "ok";
            false -> "MISSED"
        end,
    Peer =
        case R of
            #{peer := undefined, peer_label := Label} ->
                Label;
            #{peer_error := PeerError, peer_label := Label} when PeerError =/= undefined ->
                io_lib:format("ERROR (~s)", [Label]);
            #{peer := P, peer_label := Label} ->
                io_lib:format("~s (~s)", [value(R, P), Label])
        end,
    Moat =
        case R of
            #{moat_error := MoatError} when MoatError =/= undefined -> "ERROR";
            #{moat := M} -> value(R, M)
        end,
    [
        columns([
            integer_to_list(N),
            Figure,
            Moat,
            Target,
            Verdict,
            Peer,
            ratio_text(R)
        ]),
        io_lib:format("    inputs: ~s\n", [maps:get(inputs, R)]),
        io_lib:format("    ~s\n", [maps:get(detail, R)]),
        errors(R)
    ].

%% ERROR lines for tasks that did not succeed, moat's or the peer's, and
%% for figures that cannot be trusted (`moat_error', `peer_error').
-spec errors(map()) -> iolist().
errors(#{row := N, failed := F} = R) ->
    PeerFailed = maps:get(peer_failed, R, 0),
    [
        [
            io_lib:format("ERROR ~b  ~s: ~s\n", [N, Who, E])
         || {Who, Key} <- [{moat, moat_error}, {peer, peer_error}],
            E <- [maps:get(Key, R, undefined)],
            E =/= undefined
        ],
        [io_lib:format("ERROR ~b  moat: ~b tasks did not succeed\n", [N, F]) || F > 0],
        [
            io_lib:format("ERROR ~b  peer: ~b tasks did not succeed\n", [N, PeerFailed])
         || PeerFailed > 0
        ]
    ].

-spec columns([iolist()]) -> iolist().
columns(Cells) ->
    Padded = lists:zipwith(
        fun
            (Cell, 0) -> Cell;
            (Cell, W) -> [string:pad(Cell, W), " "]
        end,
        Cells,
        ?COLUMNS
    ),
    [string:trim(Padded, trailing), "\n"].

%% A figure in its row's unit.
-spec value(map(), number()) -> iolist().
value(#{unit := "tasks/s"}, R) when R >= 1.0e6 -> io_lib:format("~.2f M tasks/s", [R / 1.0e6]);
value(#{unit := "tasks/s"}, R) -> io_lib:format("~b k tasks/s", [round(R / 1000)]);
value(#{unit := "us"}, Us) -> io_lib:format("~.2f us", [Us]);
value(#{unit := "restarts/s"}, R) when R >= 1.0e6 ->
    io_lib:format("~.2f M restarts/s", [R / 1.0e6]);
value(#{unit := "restarts/s"}, R) -> io_lib:format("~.1f k restarts/s", [R / 1000]);
value(#{unit := "%"}, P) -> io_lib:format("~.1f%", [P]);
value(#{row := 4, vm_growth := Vm, rss_growth := Rss}, _) ->
    io_lib:format("RSS ~s, VM ~s", [signed_mib(Rss), signed_mib(Vm)]).

-spec ratio_text(map()) -> string().
ratio_text(#{ratio := undefined}) ->
    "-";
ratio_text(#{ratio := X}) when X > 0.95, X < 1.05 ->
    "about equal";
ratio_text(#{ratio := X, unit := Unit}) ->
    {Better, Worse} =
        case Unit of
            "us" -> {"faster", "slower"};
            _ -> {"more", "less"}
        end,
    case X >= 1 of
        true -> lists:flatten(io_lib:format("moat ~.1fx ~s", [X, Better]));
        false -> lists:flatten(io_lib:format("moat ~.1fx ~s", [1 / X, Worse]))
    end.

%% CPU time over wall time, in cores, of moat's trials and the peer's
%% (none when Peer is []).
-spec cpu_text([usage()], [usage()]) -> iolist().
cpu_text(Moat, Peer) ->
    M = sum_usage(Moat),
    [
        io_lib:format(
            "CPU/wall (cores): moat schedulers ~.2f + pool threads ~.2f (VM ~.2f)",
            [cores(M, schedulers), cores(M, pool), cores(M, vm)]
        ),
        case Peer of
            [] ->
                io_lib:format("; other processes ~.2f", [cores(M, others)]);
            _ ->
                P = sum_usage(Peer),
                io_lib:format(
                    ", peer schedulers ~.2f (VM ~.2f); other processes ~.2f / ~.2f",
                    [cores(P, schedulers), cores(P, vm), cores(M, others), cores(P, others)]
                )
        end
    ].

-spec sum_usage([usage()]) -> usage().
sum_usage(Us) ->
    Zero = #{wall => 0, schedulers => 0, pool => 0, vm => 0, others => 0},
    lists:foldl(fun(U, Acc) -> maps:map(fun(K, V) -> V + maps:get(K, U) end, Acc) end, Zero, Us).

-spec cores(usage(), atom()) -> float().
cores(#{wall := Wall} = U, Key) ->
    max(0, maps:get(Key, U)) / max(1, Wall).

%% The range of memory samples and their trend: {Tasks, Bytes} pairs.
-spec spread([{pos_integer(), integer()}]) -> iolist().
spread(Samples) ->
    Ys = [B / ?MIB || {_, B} <- Samples],
    io_lib:format(
        "~.1f to ~.1f MiB over the ~b samples, trend ~s per M tasks",
        [lists:min(Ys), lists:max(Ys), length(Ys), signed_mib(slope(Samples) * 1.0e6 / ?MIB)]
    ).

%% The least-squares slope of Bytes over Tasks.
-spec slope([{pos_integer(), integer()}]) -> float().
slope(Samples) ->
    N = length(Samples),
    Mx = lists:sum([X || {X, _} <- Samples]) / N,
    My = lists:sum([Y || {_, Y} <- Samples]) / N,
    Sxx = lists:sum([(X - Mx) * (X - Mx) || {X, _} <- Samples]),
    Sxy = lists:sum([(X - Mx) * (Y - My) || {X, Y} <- Samples]),
    case Sxx > 0 of
        true -> Sxy / Sxx;
        false -> 0.0
    end.

-spec signed_mib(float()) -> iolist().
signed_mib(M) when M >= 0 -> io_lib:format("+~.1f MiB", [M]);
signed_mib(M) -> io_lib:format("~.1f MiB", [M]).

%% Rewrites the one status line in place.
-spec status(iolist()) -> ok.
status(Text) ->
    io:put_chars(["\r", string:pad(Text, 79), "\r"]).

%%%===================================================================
%%% Small helpers
%%%===================================================================

-spec trials([fanout_result()]) -> iolist().
trials(Runs) ->
    lists:join(" / ", [integer_to_list(round(R / 1000)) || #{per_second := R} <- Runs]).

-spec failed([moat:outcome()]) -> non_neg_integer().
failed(Elems) ->
    length([E || E <- Elems, element(1, E) =/= ok]).

-spec rate(non_neg_integer(), float()) -> float().
rate(0, _) -> 0.0;
rate(N, Seconds) -> N / max(Seconds, 1.0e-9).

-spec ratio(number() | false) -> float() | undefined.
ratio(false) -> undefined;
ratio(X) -> float(X).

-spec median([number()]) -> number().
median(Xs) ->
    Sorted = lists:sort(Xs),
    lists:nth((length(Sorted) + 1) div 2, Sorted).

-spec percentile([number()], non_neg_integer(), float()) -> number().
percentile(_, 0, _) -> 0;
percentile(Sorted, N, P) -> lists:nth(min(N, 1 + trunc(N * P)), Sorted).

-spec no_growth(integer(), integer()) -> boolean().
no_growth(Before, After) ->
    After - Before < ?GROWTH_MIB * ?MIB orelse After - Before < ?GROWTH_SHARE * Before.

-spec pick(boolean(), T, T) -> T.
pick(true, Quick, _Full) -> Quick;
pick(false, _Quick, Full) -> Full.
