%%% @private
%%% @doc Internal to moat_bench: the table it prints, and the CSV file and
%%% SVG chart it writes. Groups and rows are {@link moat_bench:group()}
%%% and {@link moat_bench:row()}.
-module(moat_bench_report).

-export([print/3, write/3, table/3, csv/2, svg/2, value/2]).

% Column widths: row, subject, figure, target, verdict, peer, moat vs peer.
-define(COLUMNS, [5, 38, 34, 28, 8, 46, 0]).
% Other processes above this many cores in a trial make its figures
% doubtful: a note under the table says so.
-define(BUSY_CORES, 0.5).

%%%===================================================================
%%% The table
%%%===================================================================

%% @doc Prints the table of these groups.
-spec print(map(), [moat_bench:group()], boolean()) -> ok.
print(Meta, Groups, Verbose) ->
    io:put_chars(table(Meta, Groups, Verbose)).

%% @doc The table of these groups, with its header and notes.
-spec table(map(), [moat_bench:group()], boolean()) -> iolist().
table(Meta, Groups, Verbose) ->
    Rows = lists:append([Rs || #{rows := Rs} <- Groups]),
    [
        header(Meta),
        columns(["row", "subject", "figure [min-max]", "target", "verdict", "peer, same run", "moat vs peer"]),
        [group_lines(G, Verbose) || G <- Groups],
        notes(Rows),
        [errors(R) || R <- Rows],
        io_lib:format("moat_bench: ~.1f s in all~s~n", [
            maps:get(seconds, Meta),
            case maps:get(files, Meta, []) of
                [] -> "";
                Files -> ["; wrote ", lists:join(" and ", Files)]
            end
        ])
    ].

header(#{quick := Quick, size := Size, elixir := Elixir, otp := Otp, cpus := Cpus} = Meta) ->
    [
        case maps:get(compare, Meta, false) of
            true -> "moat_bench:compare/1";
            false -> io_lib:format("moat benchmark suite (bench/moat_bench.erl), ~s run~s", [
                        case Quick of true -> "quick"; false -> "full" end,
                        case maps:get(label, Meta, none) of
                            none -> "";
                            Label -> [" (", Label, ")"]
                        end])
        end,
        io_lib:format(
            ": ~b schedulers on ~b CPUs, OTP ~s, ~s; load average at start ~s~n",
            [Size, Cpus, Otp,
             case Elixir of
                 {elixir, V} -> "Elixir " ++ V;
                 erlang -> "no Elixir"
             end,
             maps:get(loadavg, Meta)]
        ),
        "  figures: the median of the trials, [min-max] beside it; latency: p50 / p99 / p99.9\n"
        "  over every call. Figures drift 20-40% between runs on a shared machine: compare\n"
        "  moat with the peer of the same run. Repeat: make bench, or moat_bench:run(#{quick => true}).\n\n"
    ].

group_lines(#{group := G, title := Title, inputs := Inputs, rows := Rows}, Verbose) ->
    [
        io_lib:format("~b    ~s~n", [G, Title]),
        [row_lines(R, Verbose) || R <- Rows],
        io_lib:format("     inputs: ~s~n", [Inputs])
    ].

row_lines(#{id := Id, subject := Subject} = R, Verbose) ->
    [
        columns([Id, Subject, figure(R), maps:get(target, R), verdict(R), peer(R), ratio_text(R)]),
        [io_lib:format("     ~s: ~s~n", [Id, maps:get(detail, R)]) || Verbose, maps:get(detail, R) =/= ""]
    ].

figure(#{median := undefined, note := Note}) ->
    ["(", Note, ")"];
figure(#{unit := "us", median := P50, min := Min, max := Max} = R) ->
    [us(P50), " / ", us(maps:get(p99, R)), " / ", us(maps:get(p999, R)), " us [", us(Min), "-", us(Max), "]"];
figure(#{unit := "MiB", median := Rss} = R) ->
    io_lib:format("RSS ~s, VM ~s", [mib(Rss), mib(maps:get(vm_growth, R, 0.0))]);
figure(#{unit := Unit, median := Med, min := Min, max := Max}) ->
    [value(Unit, Med), " [", bare(Unit, Min), "-", bare(Unit, Max), "]"].

verdict(#{error := E}) when E =/= undefined -> "ERROR";
verdict(#{met := true}) -> "ok";
verdict(#{met := false}) -> "MISSED";
verdict(#{kind := peer}) -> "peer";
verdict(_) -> "-".

peer(#{kind := peer}) ->
    "-";
peer(#{unit := "us", peer := P} = R) when is_number(P) ->
    [us(P), " / ", us(maps:get(peer_p99, R)), " / ", us(maps:get(peer_p999, R)), " us ",
     maps:get(peer_label, R)];
peer(#{peer := P, unit := Unit} = R) when is_number(P) ->
    [value(Unit, P), " (", peer_name(R), ")"];
peer(#{peer_label := ""}) ->
    "-";
peer(#{peer_id := _} = R) ->
    [peer_name(R), ": not measured"];
peer(#{peer_label := L}) ->
    L.

peer_name(#{peer_label := L} = R) ->
    case maps:get(peer_id, R, "") of
        "" -> L;
        Id -> [Id, " ", L]
    end.

ratio_text(#{ratio := undefined}) ->
    "-";
ratio_text(#{ratio := X}) when X > 0.95, X < 1.05 ->
    "about equal";
ratio_text(#{ratio := X, unit := Unit}) ->
    {Better, Worse} =
        case Unit of
            "us" -> {"faster", "slower"};
            "ms" -> {"faster", "slower"};
            _ -> {"more", "less"}
        end,
    case X >= 1 of
        true -> io_lib:format("moat ~.1fx ~s", [X, Better]);
        false -> io_lib:format("moat ~.1fx ~s", [1 / X, Worse])
    end.

%% Rows whose trials ran while other processes kept the CPUs busy.
notes(Rows) ->
    Busy = [
        {Id, Others}
     || #{id := Id, usage := #{wall := Wall, others := O}} <- Rows,
        Others <- [max(0, O) / max(1, Wall)],
        Others > ?BUSY_CORES
    ],
    case Busy of
        [] ->
            "";
        _ ->
            io_lib:format(
                "~nnote: other processes on the machine kept ~s cores busy on average during "
                "rows ~s: those figures are unreliable; repeat on a quiet machine~n",
                [
                    io_lib:format("~.1f", [lists:max([O || {_, O} <- Busy])]) ++ " or fewer",
                    lists:join(", ", [Id || {Id, _} <- Busy])
                ]
            )
    end.

%% ERROR lines for tasks that did not succeed and for figures that cannot
%% be trusted.
errors(#{id := Id, failed := F} = R) ->
    PeerFailed = maps:get(peer_failed, R, 0),
    [
        [io_lib:format("ERROR ~s  ~s~n", [Id, E]) || E <- [maps:get(error, R, undefined)], E =/= undefined],
        [io_lib:format("ERROR ~s  ~s: ~b tasks did not succeed~n", [Id, maps:get(subject, R), F]) || F > 0],
        [io_lib:format("ERROR ~s  peer: ~b tasks did not succeed~n", [Id, PeerFailed]) || PeerFailed > 0]
    ].

columns(Cells) ->
    Padded = lists:zipwith(
        fun
            (Cell, 0) -> Cell;
            (Cell, W) -> [string:pad(Cell, W - 1), " "]
        end,
        Cells,
        ?COLUMNS
    ),
    [string:trim(Padded, trailing), "\n"].

%% @doc A figure in its unit, as the table prints it.
-spec value(string(), number()) -> iolist().
value(Unit, X) when Unit =:= "tasks/s"; Unit =:= "restarts/s" -> [bare(Unit, X), "/s"];
value("us", X) -> [us(X), " us"];
value("ms", X) -> io_lib:format("~.2f ms", [X]);
value("MiB", X) -> mib(X);
value(_, X) -> io_lib:format("~p", [X]).

bare(Unit, R) when Unit =:= "tasks/s"; Unit =:= "restarts/s" ->
    if
        R >= 1.0e6 -> io_lib:format("~.2f M", [R / 1.0e6]);
        R >= 1.0e4 -> io_lib:format("~b k", [round(R / 1000)]);
        R >= 1.0e3 -> io_lib:format("~.1f k", [R / 1000]);
        true -> integer_to_list(round(R))
    end;
bare("us", X) -> us(X);
bare("ms", X) -> io_lib:format("~.2f", [X]);
bare(_, X) -> io_lib:format("~.1f", [X]).

us(undefined) -> "-";
us(X) when X < 10 -> io_lib:format("~.2f", [X]);
us(X) when X < 100 -> io_lib:format("~.1f", [X]);
us(X) -> integer_to_list(round(X)).

mib(M) when M >= 0 -> io_lib:format("+~.1f MiB", [M]);
mib(M) -> io_lib:format("~.1f MiB", [M]).

%%%===================================================================
%%% Files
%%%===================================================================

%% @doc Writes `<date>.csv' and `<date>.svg' into `Dir' (created if
%% needed), with the run's label after the date if it has one, and the
%% time after those when such files exist; returns the paths.
-spec write(file:filename(), map(), [moat_bench:group()]) -> [file:filename()].
write(Dir, #{date := {{Y, Mo, D}, {H, Mi, S}}} = Meta, Groups) ->
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    Day = [
        io_lib:format("~4..0b-~2..0b-~2..0b", [Y, Mo, D]),
        case maps:get(label, Meta, none) of
            none -> "";
            Label -> ["-", Label]
        end
    ],
    Base =
        case filelib:is_file(filename:join(Dir, [Day, ".csv"])) of
            false -> lists:flatten(Day);
            true -> lists:flatten(io_lib:format("~s-~2..0b~2..0b~2..0b", [Day, H, Mi, S]))
        end,
    Csv = filename:join(Dir, Base ++ ".csv"),
    Svg = filename:join(Dir, Base ++ ".svg"),
    ok = file:write_file(Csv, csv(Meta, Groups)),
    ok = file:write_file(Svg, svg(Meta, Groups)),
    [Csv, Svg].

%% @doc The CSV: a header line, then one line per row.
-spec csv(map(), [moat_bench:group()]) -> iolist().
csv(#{date := {{Y, Mo, D}, {H, Mi, S}}} = Meta, Groups) ->
    Date = io_lib:format("~4..0b-~2..0b-~2..0bT~2..0b:~2..0b:~2..0b", [Y, Mo, D, H, Mi, S]),
    Run = [
        case maps:get(quick, Meta) of
            true -> "quick";
            false -> "full"
        end,
        case maps:get(label, Meta, none) of
            none -> "";
            Label -> [" ", Label]
        end
    ],
    Header = [
        "date", "run", "row", "group", "title", "subject", "kind", "unit", "median", "min", "max",
        "trials", "p99", "p999", "target", "met", "peer_row", "peer", "peer_median", "ratio",
        "failed", "error", "note", "inputs", "detail"
    ],
    Lines = [
        [
            Date, Run, Id, integer_to_list(G), Title, maps:get(subject, R), atom_to_list(maps:get(kind, R)),
            maps:get(unit, R), num(maps:get(median, R)), num(maps:get(min, R)), num(maps:get(max, R)),
            lists:join(" ", [num(T) || T <- maps:get(trials, R)]),
            num(maps:get(p99, R, undefined)), num(maps:get(p999, R, undefined)),
            maps:get(target, R),
            case maps:get(met, R) of
                undefined -> "";
                B -> atom_to_list(B)
            end,
            maps:get(peer_id, R, ""), maps:get(peer_label, R), num(maps:get(peer, R)),
            num(maps:get(ratio, R)), integer_to_list(maps:get(failed, R)),
            case maps:get(error, R, undefined) of
                undefined -> "";
                E -> E
            end,
            maps:get(note, R), Inputs, maps:get(detail, R)
        ]
     || #{group := G, title := Title, inputs := Inputs, rows := Rows} <- Groups,
        #{id := Id} = R <- Rows
    ],
    [[lists:join(",", [field(F) || F <- L]), "\n"] || L <- [Header | Lines]].

num(undefined) -> "";
num(X) when is_integer(X) -> integer_to_list(X);
num(X) when is_float(X) -> float_to_list(X, [{decimals, 3}, compact]).

%% A CSV field, quoted when it holds a comma, a quote or a line break.
field(F) ->
    S = unicode:characters_to_list(F),
    case lists:any(fun(C) -> lists:member(C, ",\"\n\r") end, S) of
        true -> [$", string:replace(S, "\"", "\"\"", all), $"];
        false -> S
    end.

%%%===================================================================
%%% The chart
%%%===================================================================

-define(W, 1000).
-define(LABEL, 300).
-define(BAR_W, 560).
-define(BAR_H, 18).
-define(PAD, 8).
-define(COLORS, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]).

%% @doc The SVG chart: a bar panel per fan-out group (throughput of each
%% backend and peer, the median with a min-max whisker), the latency
%% percentiles of group 4 on a log scale, and bar panels of restarts and
%% crash recovery.
-spec svg(map(), [moat_bench:group()]) -> iolist().
svg(Meta, Groups) ->
    Panels = lists:append([
        case G of
            #{group := 4} -> [fun(Y) -> latency_panel(G, Y) end];
            #{group := N} when N =:= 6; N =:= 7 -> [fun(Y) -> bar_panel(G, log, Y) end];
            #{group := N} when N =< 3 -> [fun(Y) -> bar_panel(G, linear, Y) end];
            _ -> []
        end
     || G <- Groups
    ]),
    {Parts, Height} = lists:foldl(
        fun(Panel, {Acc, Y}) ->
            {Part, H} = Panel(Y),
            {[Part | Acc], Y + H}
        end,
        {[], 0},
        [fun(Y) -> title(Meta, Y) end | Panels]
    ),
    [
        io_lib:format(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"~b\" height=\"~b\" "
            "viewBox=\"0 0 ~b ~b\" font-family=\"sans-serif\" font-size=\"12\">~n",
            [?W, Height + 10, ?W, Height + 10]
        ),
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        lists:reverse(Parts),
        "</svg>\n"
    ].

title(#{date := {{Y, Mo, D}, {H, Mi, _}}, size := Size, quick := Quick} = Meta, Y0) ->
    Text = io_lib:format(
        "moat_bench ~s run, ~4..0b-~2..0b-~2..0b ~2..0b:~2..0b, ~b schedulers on ~b CPUs, OTP ~s; "
        "medians of the trials, whiskers min to max",
        [
            case Quick of
                true -> "quick";
                false -> "full"
            end,
            Y, Mo, D, H, Mi, Size, maps:get(cpus, Meta), maps:get(otp, Meta)
        ]
    ),
    {text(?PAD, Y0 + 20, Text, "font-size=\"14\" font-weight=\"bold\""), 34}.

%% One horizontal bar per row that has a figure; moat's bars in blue, the
%% peers' in grey.
bar_panel(#{group := G, title := Title, rows := Rows} = Group, Scale, Y0) ->
    Measured = [R || #{median := M} = R <- Rows, is_number(M), M > 0],
    Ideal = maps:get(ideal, Group, undefined),
    Unit =
        case Rows of
            [#{unit := U} | _] -> U;
            [] -> ""
        end,
    Top = lists:max([1.0 | [maps:get(max, R) || R <- Measured] ++ [I || I <- [Ideal], is_number(I)]]),
    Low = lists:min([Top / 10 | [maps:get(min, R) || R <- Measured]]),
    X = fun(V) -> ?LABEL + bar_x(Scale, V, Low, Top) end,
    Head = text(?PAD, Y0 + 16, io_lib:format("~b  ~s (~s, ~s scale)", [G, Title, Unit, Scale]), "font-weight=\"bold\""),
    Bars = [
        begin
            Y = Y0 + 26 + I * (?BAR_H + 4),
            Fill =
                case maps:get(kind, R) of
                    moat -> "#1f77b4";
                    peer -> "#999999"
                end,
            Label = text(?PAD, Y + 13, [maps:get(id, R), "  ", maps:get(subject, R)], ""),
            case maps:get(median, R) of
                M when is_number(M), M > 0 ->
                    Mn = maps:get(min, R),
                    Mx = maps:get(max, R),
                    [
                        Label,
                        io_lib:format(
                            "<rect x=\"~b\" y=\"~b\" width=\"~b\" height=\"~b\" fill=\"~s\"/>~n",
                            [?LABEL, Y, max(1, round(X(M)) - ?LABEL), ?BAR_H, Fill]
                        ),
                        io_lib:format(
                            "<line x1=\"~b\" y1=\"~b\" x2=\"~b\" y2=\"~b\" stroke=\"black\"/>~n",
                            [round(X(Mn)), Y + ?BAR_H div 2, round(X(Mx)), Y + ?BAR_H div 2]
                        ),
                        text(round(X(Mx)) + 6, Y + 13, value(Unit, M), "")
                    ];
                _ ->
                    [Label, text(?LABEL + 4, Y + 13, ["(", maps:get(note, R, ""), ")"], "fill=\"#666\"")]
            end
        end
     || {I, R} <- lists:zip(lists:seq(0, length(Rows) - 1), Rows)
    ],
    Bottom = Y0 + 26 + length(Rows) * (?BAR_H + 4),
    IdealLine =
        case Ideal of
            undefined ->
                "";
            _ ->
                [
                    io_lib:format(
                        "<line x1=\"~b\" y1=\"~b\" x2=\"~b\" y2=\"~b\" stroke=\"#2ca02c\" "
                        "stroke-dasharray=\"4 3\"/>~n",
                        [round(X(Ideal)), Y0 + 22, round(X(Ideal)), Bottom]
                    ),
                    text(round(X(Ideal)) - 30, Y0 + 20, ["ideal ", value(Unit, Ideal)], "fill=\"#2ca02c\"")
                ]
        end,
    {[Head, Bars, IdealLine], Bottom - Y0 + 14}.

bar_x(linear, V, _Low, Top) ->
    ?BAR_W * V / Top;
bar_x(log, V, Low, Top) ->
    L0 = math:log10(Low) - 0.2,
    ?BAR_W * (math:log10(max(V, Low)) - L0) / max(1.0e-9, math:log10(Top) - L0).

%% Group 4's percentile curves: quantile on a log scale of 1 / (1 - q),
%% microseconds on a log scale; moat's solid, each peer's dashed in the
%% same colour.
latency_panel(#{group := G, title := Title, rows := Rows}, Y0) ->
    Left = 90,
    Width = 620,
    Height = 300,
    Top = Y0 + 30,
    Series = lists:append([
        [
            {Color, [maps:get(id, R), " ", maps:get(subject, R)], "", maps:get(percentiles, R, [])},
            {Color, [maps:get(id, R), " peer: ", maps:get(peer_label, R)], "stroke-dasharray=\"5 4\"",
                maps:get(peer_percentiles, R, [])}
        ]
     || {Color, R} <- lists:zip(lists:sublist(?COLORS, length(Rows)), Rows)
    ]),
    Us = [V || {_, _, _, Ps} <- Series, {_, V} <- Ps, V > 0],
    {Lo, Hi} =
        case Us of
            [] -> {0, 1};
            _ -> {floor(math:log10(lists:min(Us))), ceil(math:log10(lists:max(Us)))}
        end,
    Hi1 = max(Hi, Lo + 1),
    Qx = fun(Q) -> Left + Width * (-math:log10(1 - Q) - 0.3) / 2.7 end,
    Vy = fun(V) -> Top + Height - Height * (math:log10(max(V, 1.0e-3)) - Lo) / (Hi1 - Lo) end,
    Grid = [
        [
            io_lib:format(
                "<line x1=\"~b\" y1=\"~b\" x2=\"~b\" y2=\"~b\" stroke=\"#ddd\"/>~n",
                [Left, round(Vy(math:pow(10, E))), Left + Width, round(Vy(math:pow(10, E)))]
            ),
            text(Left - 8, round(Vy(math:pow(10, E))) + 4, us_tick(E), "text-anchor=\"end\"")
        ]
     || E <- lists:seq(Lo, Hi1)
    ] ++ [
        [
            io_lib:format(
                "<line x1=\"~b\" y1=\"~b\" x2=\"~b\" y2=\"~b\" stroke=\"#ddd\"/>~n",
                [round(Qx(Q)), Top, round(Qx(Q)), Top + Height]
            ),
            text(round(Qx(Q)), Top + Height + 16, Label, "text-anchor=\"middle\"")
        ]
     || {Q, Label} <- [{0.5, "p50"}, {0.9, "p90"}, {0.99, "p99"}, {0.999, "p99.9"}]
    ],
    Lines = [
        io_lib:format(
            "<polyline fill=\"none\" stroke=\"~s\" stroke-width=\"2\" ~s points=\"~s\"/>~n",
            [Color, Dash, lists:join(" ", [io_lib:format("~.1f,~.1f", [Qx(Q), Vy(V)]) || {Q, V} <- Ps])]
        )
     || {Color, _, Dash, Ps} <- Series,
        Ps =/= []
    ],
    Legend = [
        [
            io_lib:format(
                "<line x1=\"~b\" y1=\"~b\" x2=\"~b\" y2=\"~b\" stroke=\"~s\" stroke-width=\"2\" ~s/>~n",
                [Left + Width + 20, Top + 10 + I * 18, Left + Width + 44, Top + 10 + I * 18, Color, Dash]
            ),
            text(Left + Width + 50, Top + 14 + I * 18, Name, "")
        ]
     || {I, {Color, Name, Dash, _}} <- lists:zip(lists:seq(0, length(Series) - 1), Series)
    ],
    Head = text(?PAD, Y0 + 16, io_lib:format("~b  ~s: latency distribution (us, log scale; peers dashed)", [G, Title]),
                "font-weight=\"bold\""),
    {[Head, Grid, Lines, Legend], Height + 60}.

us_tick(E) when E >= 6 -> io_lib:format("~b s", [round(math:pow(10, E - 6))]);
us_tick(E) when E >= 3 -> io_lib:format("~b ms", [round(math:pow(10, E - 3))]);
us_tick(E) when E >= 0 -> io_lib:format("~b us", [round(math:pow(10, E))]);
us_tick(E) -> io_lib:format("~s us", [float_to_list(math:pow(10, E), [{decimals, 3}, compact])]).

text(X, Y, Text, Attrs) ->
    io_lib:format("<text x=\"~b\" y=\"~b\" ~s>~s</text>~n", [round(X), round(Y), Attrs, escape(Text)]).

escape(Text) ->
    lists:flatmap(
        fun
            ($<) -> "&lt;";
            ($>) -> "&gt;";
            ($&) -> "&amp;";
            ($") -> "&quot;";
            (C) -> [C]
        end,
        unicode:characters_to_list(Text)
    ).
