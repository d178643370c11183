%%% EUnit tests of moat_bench's shell API (fanout/3,4 and compare/1): how
%%% they take their arguments and the shape of what they return, never
%%% how fast anything ran; and of the table, CSV and SVG that the suite
%%% writes (moat_bench_report), on rows made up here.
-module(moat_bench_tests).

-include_lib("eunit/include/eunit.hrl").
-include_lib("xmerl/include/xmerl.hrl").

-define(POOL, moat_bench_tests).

%%%===================================================================
%%% fanout/3,4
%%%===================================================================

fanout_test_() ->
    {setup, fun start_pool/0, fun stop_pool/1, [
        {"fanout/3 takes the defaults and returns every figure",
            fun fanout_defaults/0},
        {"fanout/4 takes a map or a proplist (a keyword list from Elixir)",
            fun fanout_options/0},
        {"several streams (progress on) still count every task once",
            fun fanout_streams/0},
        {"failed tasks are counted, in one stream and in several",
            fun fanout_failed/0},
        {"no tasks, and a pool that is not running, are values",
            fun fanout_edges/0},
        {"bad arguments raise badarg", fun fanout_badarg/0}
    ]}.

start_pool() ->
    {ok, _} = application:ensure_all_started(moat),
    _ = moat:stop_pool(?POOL),
    {ok, _} = moat:start_pool(?POOL, #{size => 2}),
    ok.

stop_pool(_) ->
    moat:stop_pool(?POOL).

fanout_defaults() ->
    R = moat_bench:fanout(?POOL, echo, 100),
    ?assertEqual(
        [arg, concurrency, failed, per_second, pool, seconds, task, tasks],
        lists:sort(maps:keys(R))
    ),
    ?assertMatch(
        #{pool := ?POOL, task := echo, arg := 1, tasks := 100, concurrency := 1024, failed := 0},
        R
    ),
    #{seconds := S, per_second := PS} = R,
    ?assert(is_float(S) andalso S > 0),
    ?assert(is_float(PS) andalso PS > 0).

fanout_options() ->
    ?assertMatch(
        #{arg := 3, concurrency := 8, tasks := 50, failed := 0},
        moat_bench:fanout(?POOL, spin, 50, #{arg => 3, concurrency => 8})
    ),
    ?assertMatch(
        #{arg := 3, concurrency := 8, tasks := 50, failed := 0},
        moat_bench:fanout(?POOL, spin, 50, [{arg, 3}, {concurrency, 8}, {progress, false}])
    ),
    % A bare atom in a proplist means true.
    ?assertMatch(#{tasks := 10}, moat_bench:fanout(?POOL, echo, 10, [progress])).

fanout_streams() ->
    % More tasks than the first stream takes (max(C, 1000)).
    ?assertMatch(
        #{tasks := 5000, failed := 0},
        moat_bench:fanout(?POOL, echo, 5000, #{concurrency => 4, progress => true})
    ),
    ?assertMatch(
        #{tasks := 5000, failed := 0},
        moat_bench:fanout(?POOL, echo, 5000, #{concurrency => 4, progress => false})
    ).

fanout_failed() ->
    Opts = #{arg => <<"no">>, concurrency => 4},
    ?assertMatch(#{tasks := 30, failed := 30}, moat_bench:fanout(?POOL, fail, 30, Opts)),
    ?assertMatch(
        #{tasks := 1500, failed := 1500},
        moat_bench:fanout(?POOL, fail, 1500, Opts#{progress => true})
    ),
    % spin's argument must be an integer: badarg from the task is a failure.
    ?assertMatch(#{failed := 5}, moat_bench:fanout(?POOL, spin, 5, #{arg => x})).

fanout_edges() ->
    ?assertMatch(#{tasks := 0, failed := 0, per_second := 0.0}, moat_bench:fanout(?POOL, echo, 0)),
    ?assertMatch(#{tasks := 3, failed := 3}, moat_bench:fanout(moat_bench_no_such_pool, echo, 3)).

fanout_badarg() ->
    Bad = [
        {"pool", 1, echo, 1, #{}},
        {"task", ?POOL, "echo", 1, #{}},
        {"negative count", ?POOL, echo, -1, #{}},
        {"count not an integer", ?POOL, echo, 1.0, #{}},
        {"options not a map or a list", ?POOL, echo, 1, concurrency},
        {"unknown key in a map", ?POOL, echo, 1, #{speed => fast}},
        {"unknown key in a list", ?POOL, echo, 1, [{speed, fast}]},
        {"not a proplist", ?POOL, echo, 1, ["concurrency"]},
        {"concurrency 0", ?POOL, echo, 1, #{concurrency => 0}},
        {"concurrency not an integer", ?POOL, echo, 1, #{concurrency => 2.0}},
        {"progress not a boolean", ?POOL, echo, 1, #{progress => yes}}
    ],
    [
        ?assertError(badarg, moat_bench:fanout(Pool, Task, N, Opts), What)
     || {What, Pool, Task, N, Opts} <- Bad
    ],
    ?assertError(badarg, moat_bench:fanout(?POOL, echo, -5)).

%%%===================================================================
%%% compare/1
%%%===================================================================

compare_test_() ->
    {setup, fun() -> {ok, _} = application:ensure_all_started(moat) end, fun(_) -> ok end, [
        {timeout, 60, {"a median for each backend and peer asked for",
            fun compare_rows/0}},
        {timeout, 60, {"spin jobs, with their microseconds",
            fun compare_spin/0}},
        {timeout, 60, {"a peer that is not built is undefined, not a crash",
            fun compare_unavailable/0}},
        {"bad options raise badarg", fun compare_badarg/0}
    ]}.

compare_rows() ->
    Figures = moat_bench:compare([
        {task, echo}, {tasks, 300}, {trials, 2}, {backends, [nif]}, {peers, [task_async_stream]}
    ]),
    ?assertMatch(#{nif := N, task_async_stream := P} when is_float(N) andalso is_float(P), Figures),
    ?assertEqual(2, map_size(Figures)),
    % compare/1 stops the pools it started.
    ?assertEqual({error, not_found}, moat:stop_pool(moat_bench)).

compare_spin() ->
    ?assertMatch(
        #{nif := N} when is_float(N),
        moat_bench:compare(#{task => spin, arg => 100, tasks => 40, trials => 1, backends => [nif], peers => []})
    ).

compare_unavailable() ->
    Saved = os:getenv("MOAT_BENCH_PEERS"),
    os:putenv("MOAT_BENCH_PEERS", "/nonexistent/moat_bench_peers"),
    try
        ?assertMatch(
            #{nif := N, port := undefined} when is_float(N),
            moat_bench:compare(#{tasks => 100, trials => 1, backends => [nif], peers => [port]})
        )
    after
        case Saved of
            false -> os:unsetenv("MOAT_BENCH_PEERS");
            _ -> os:putenv("MOAT_BENCH_PEERS", Saved)
        end
    end.

compare_badarg() ->
    Bad = [
        not_options,
        #{task => fib},
        #{task => spin, arg => -1},
        #{task => spin, arg => ten},
        #{tasks => 0},
        #{seconds => 0},
        #{trials => 0},
        #{concurrency => 0},
        #{backends => [gpu]},
        #{backends => nif},
        #{peers => [rust]},
        #{verbose => 1},
        #{colour => blue},
        [{task, echo}, 42]
    ],
    [?assertError(badarg, moat_bench:compare(Opts), Opts) || Opts <- Bad].

%%%===================================================================
%%% The table, the CSV and the SVG
%%%===================================================================

meta() ->
    #{
        quick => true,
        size => 2,
        elixir => erlang,
        seconds => 1.5,
        date => {{2026, 1, 2}, {3, 4, 5}},
        otp => "25",
        cpus => 2,
        loadavg => "0.00"
    }.

row(Id, G, Kind, Unit, Values, Extra) ->
    {Med, Min, Max} =
        case Values of
            [] -> {undefined, undefined, undefined};
            _ -> {lists:nth((length(Values) + 1) div 2, lists:sort(Values)), lists:min(Values), lists:max(Values)}
        end,
    maps:merge(
        #{
            id => Id, group => G, subject => "subject " ++ Id, kind => Kind, unit => Unit,
            median => Med, min => Min, max => Max, trials => Values, target => "-",
            met => undefined, peer_label => "", peer => undefined, ratio => undefined,
            failed => 0, note => "", detail => "a detail, with \"quotes\""
        },
        Extra
    ).

groups() ->
    Pcts = [{0.5, 1.5}, {0.9, 3.0}, {0.99, 40.0}, {0.999, 300.0}],
    [
        #{
            group => 1, title => "fan-out, trivial tasks (echo)", job => echo, ideal => undefined,
            inputs => "inputs, with a comma",
            rows => [
                row("1a", 1, moat, "tasks/s", [9.0e5, 1.1e6, 1.0e6], #{
                    target => ">= 1 M/s", met => true, peer => 1.0e5, peer_label => "peer",
                    peer_id => "1b", ratio => 10.0
                }),
                row("1b", 1, peer, "tasks/s", [1.0e5], #{}),
                row("1c", 1, peer, "tasks/s", [], #{note => "not built: make bench-peers"})
            ]
        },
        #{
            group => 2, title => "fan-out, 10 us", job => {spin, 10}, ideal => 2.0e5,
            inputs => "i",
            rows => [row("2a", 2, moat, "tasks/s", [1.5e5], #{failed => 3, met => false})]
        },
        #{
            group => 4, title => "round trip", inputs => "i",
            rows => [
                row("4a", 4, moat, "us", [1.5], #{
                    p99 => 40.0, p999 => 300.0, percentiles => Pcts, peer => 3.0,
                    peer_p99 => 9.0, peer_p999 => 20.0, peer_percentiles => Pcts,
                    peer_label => "dirty NIF call", ratio => 2.0, met => true
                })
            ]
        },
        #{
            group => 6, title => "restarts", inputs => "i",
            rows => [row("6a", 6, moat, "restarts/s", [5.0e4], #{error => "counts do not add up"})]
        },
        #{
            group => 7, title => "recovery", inputs => "i",
            rows => [row("7a", 7, moat, "ms", [3.0, 5.0], #{})]
        },
        #{
            group => 8, title => "memory", inputs => "i",
            rows => [row("8a", 8, moat, "MiB", [1.0], #{vm_growth => -0.5})]
        }
    ].

table_test() ->
    Text = lists:flatten(io_lib:format("~s", [moat_bench_report:table(meta(), groups(), true)])),
    [?assertNotEqual(nomatch, string:find(Text, S), S) || S <- [
        "1a ", "1.00 M/s [900 k-1.10 M]", "moat 10.0x more", "MISSED", "ERROR 2a",
        "ERROR 6a  counts do not add up", "(not built: make bench-peers)",
        "1.50 / 40.0 / 300 us", "RSS +1.0 MiB, VM -0.5 MiB", "a detail"
    ]].

value_test() ->
    ?assertEqual("1.50 M/s", lists:flatten(moat_bench_report:value("tasks/s", 1.5e6))),
    ?assertEqual("250 k/s", lists:flatten(moat_bench_report:value("tasks/s", 2.5e5))),
    ?assertEqual("2.50 ms", lists:flatten(moat_bench_report:value("ms", 2.5))).

csv_test() ->
    Csv = iolist_to_binary(moat_bench_report:csv(meta(), groups())),
    [Header | Lines] = csv_lines(binary_to_list(Csv)),
    ?assertEqual(["date", "run", "row"], lists:sublist(Header, 3)),
    % One line per row, every line as wide as the header.
    ?assertEqual(8, length(Lines)),
    [?assertEqual(length(Header), length(L)) || L <- Lines],
    [First | _] = Lines,
    ?assertEqual(["2026-01-02T03:04:05", "quick", "1a", "1"], lists:sublist(First, 4)),
    ?assertEqual("inputs, with a comma", lists:nth(24, First)),
    ?assertEqual("a detail, with \"quotes\"", lists:nth(25, First)).

svg_test() ->
    Svg = binary_to_list(iolist_to_binary(moat_bench_report:svg(meta(), groups()))),
    {Doc, _} = xmerl_scan:string(Svg),
    ?assertEqual(svg, Doc#xmlElement.name),
    % A polyline per latency curve (moat's and its peer's).
    ?assertEqual(2, length(xmerl_xpath:string("//polyline", Doc))).

write_test() ->
    Dir = filename:join(["/tmp", "moat_bench_tests_" ++ os:getpid()]),
    try
        [Csv1, Svg1] = moat_bench_report:write(Dir, meta(), groups()),
        ?assertEqual("2026-01-02.csv", filename:basename(Csv1)),
        ?assertEqual("2026-01-02.svg", filename:basename(Svg1)),
        % The same date again: the time goes after it, nothing is overwritten.
        [Csv2, _] = moat_bench_report:write(Dir, meta(), groups()),
        ?assertEqual("2026-01-02-030405.csv", filename:basename(Csv2)),
        [?assert(filelib:is_regular(F)) || F <- [Csv1, Svg1, Csv2]]
    after
        file:del_dir_r(Dir)
    end.

labelled_run_test() ->
    Meta = (meta())#{label => "vm-defaults"},
    Text = lists:flatten(io_lib:format("~s", [moat_bench_report:table(Meta, groups(), false)])),
    ?assertNotEqual(nomatch, string:find(Text, "quick run (vm-defaults)")),
    [_Header, First | _] = csv_lines(binary_to_list(iolist_to_binary(moat_bench_report:csv(Meta, groups())))),
    ?assertEqual("quick vm-defaults", lists:nth(2, First)),
    Dir = filename:join(["/tmp", "moat_bench_tests_label_" ++ os:getpid()]),
    try
        [Csv, Svg] = moat_bench_report:write(Dir, Meta, groups()),
        ?assertEqual("2026-01-02-vm-defaults.csv", filename:basename(Csv)),
        ?assertEqual("2026-01-02-vm-defaults.svg", filename:basename(Svg)),
        % An unlabelled run of the same day keeps its own name.
        [Plain, _] = moat_bench_report:write(Dir, meta(), groups()),
        ?assertEqual("2026-01-02.csv", filename:basename(Plain))
    after
        file:del_dir_r(Dir)
    end.

%% Checked before any pool starts.
run_badarg_test() ->
    [?assertError(badarg, moat_bench:run(Opts)) || Opts <- [
        #{groups => [9]}, #{groups => []}, #{groups => [0]}, #{groups => four},
        #{label => ""}, #{label => vm}, #{bogus => 1}
    ]].

%%%===================================================================
%%% The bare ei echo (row 4d's peer)
%%%===================================================================

ei_echo_test_() ->
    {timeout, 60, fun ei_echo/0}.

ei_echo() ->
    % Not a distributed node yet: a value, nothing started.
    false = erlang:is_alive(),
    ?assertEqual({unavailable, "this node is not distributed"}, moat_bench_peers:ei_echo_start()),
    _ = os:cmd("epmd -daemon"),
    {ok, _} = net_kernel:start([list_to_atom("moat_bench_tests_" ++ os:getpid()), shortnames]),
    try
        Started = moat_bench_peers:ei_echo_start(),
        {ok, {Port, Node}} = Started,
        {os_pid, OsPid} = erlang:port_info(Port, os_pid),
        ?assertEqual([Node], nodes(hidden)),
        ?assertEqual(lists:duplicate(3, true), [moat_bench_peers:round_trip({ei_echo, Node}) || _ <- [1, 2, 3]]),
        ok = moat_bench_peers:ei_echo_stop(Started),
        ?assertEqual([], nodes(hidden)),
        ?assert(gone(OsPid, 50)),
        % A peer that is not built is a value.
        Saved = os:getenv("MOAT_BENCH_PEERS"),
        os:putenv("MOAT_BENCH_PEERS", "/nonexistent/moat_bench_peers"),
        try
            ?assertEqual({unavailable, "not built: make bench-peers"}, moat_bench_peers:ei_echo_start())
        after
            case Saved of
                false -> os:unsetenv("MOAT_BENCH_PEERS");
                _ -> os:putenv("MOAT_BENCH_PEERS", Saved)
            end
        end
    after
        net_kernel:stop()
    end.

%% Whether the OS process is gone within Tries x 20 ms.
gone(_, 0) ->
    false;
gone(OsPid, Tries) ->
    case file:read_file_info("/proc/" ++ integer_to_list(OsPid)) of
        {error, enoent} -> true;
        _ -> timer:sleep(20), gone(OsPid, Tries - 1)
    end.

%% A small CSV reader: fields, quoted or not, of each line.
csv_lines(Text) ->
    csv_lines(Text, [], [], []).

csv_lines([], [], [], Lines) ->
    lists:reverse(Lines);
csv_lines([$" | Rest], [], Fields, Lines) ->
    {Field, After} = quoted(Rest, []),
    csv_lines(After, Field, Fields, Lines);
csv_lines([$, | Rest], Field, Fields, Lines) ->
    csv_lines(Rest, [], [lists:reverse(Field) | Fields], Lines);
csv_lines([$\n | Rest], Field, Fields, Lines) ->
    csv_lines(Rest, [], [], [lists:reverse([lists:reverse(Field) | Fields]) | Lines]);
csv_lines([C | Rest], Field, Fields, Lines) ->
    csv_lines(Rest, [C | Field], Fields, Lines).

% The field comes back reversed, as csv_lines keeps fields being read.
quoted([$", $" | Rest], Acc) -> quoted(Rest, [$" | Acc]);
quoted([$" | Rest], Acc) -> {Acc, Rest};
quoted([C | Rest], Acc) -> quoted(Rest, [C | Acc]).
