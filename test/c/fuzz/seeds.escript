#!/usr/bin/env escript
%%! -noshell
%% seeds.escript: writes the seed corpora of the fuzz targets,
%% test/c/fuzz/corpus/fuzz_frame/ (frames as the VM sends them, doc/cnode.md,
%% native servers' included, those a worker process sends its parent, and
%% the distribution transport's packets)
%% and test/c/fuzz/corpus/fuzz_term/ (one term of each kind the ETF check
%% accepts, and a few it refuses).  The seeds are committed; run this again
%% only to change them (the pid, reference and fun seeds then change too):
%%
%%     escript test/c/fuzz/seeds.escript
%%
%% Atoms come both as OTP 25's term_to_binary writes them (ATOM_EXT) and as
%% ei and OTP 26 write them (the UTF-8 tags); the old float is asked for
%% with minor_version 0, and the old pid, port and reference encodings,
%% which term_to_binary no longer writes, are made by hand, so that the
%% fuzzer starts from every tag.  No seed nests
%% as deep as the check's limit (10000): it would take 20 KB, and inputs
%% that long make the term target three times slower; test_term.c tests
%% that limit.

-mode(compile).

main(_) ->
    Dir = filename:join([filename:dirname(escript:script_name()), "corpus"]),
    write(filename:join(Dir, "fuzz_frame"), frames()),
    write(filename:join(Dir, "fuzz_term"), terms()).

write(Dir, Seeds) ->
    ok = filelib:ensure_path(Dir),
    [ok = file:write_file(filename:join(Dir, Name), Bin)
     || {Name, Bin} <- Seeds],
    Bytes = lists:sum([byte_size(B) || {_, B} <- Seeds]),
    io:format("~s: ~b seeds, ~b bytes~n", [Dir, length(Seeds), Bytes]).

etf(T) -> term_to_binary(T).
utf8(T) -> term_to_binary(T, [{minor_version, 2}]).

frames() ->
    [{"hello_full", etf({hello, #{size => 4, max_queue => 16,
                                 libraries => [<<"/usr/lib/moat/tasks.so">>,
                                               <<"priv/moat_demo.so">>],
                                 isolation => thread, name => moat_pool_1,
                                 unknown_key => {nested, [1, 2.5, <<"x">>]}}})},
     {"hello_utf8", utf8({hello, #{size => 1, isolation => process,
                                  name => 'pöol_名前', libraries => []}})},
     {"hello_empty", etf({hello, #{}})},
     {"hello_odd_keys", etf({hello, #{<<"size">> => 1, 5 => x, size => 2}})},
     {"hello_bad_library",
      etf({hello, #{libraries => [<<"a.so">>, 'b.so']}})},
     {"hello_improper_libraries",
      etf({hello, #{libraries => [<<"a.so">> | <<"b.so">>]}})},
     {"hello_bad_spares",
      etf({hello, #{isolation => process, spares => 1025}})},
     {"hello_bad_max_restarts", etf({hello, #{max_restarts => 1 bsl 32 - 1}})},
     {"hello_process", etf({hello, #{size => 2, isolation => process,
                                    max_memory => 1 bsl 32, spares => 1,
                                    max_restarts => 3, max_seconds => 5}})},
     {"run", etf({run, 1, echo, [1, 2]})},
     {"run_utf8", utf8({run, 2, 'écho', [<<"bin">>]})},
     {"run_nested", etf({run, 18446744073709551615, sum,
                         [[1, 2, 3], {a, #{k => [<<"v">>, "str"]}}, -5, 3.14,
                          1 bsl 40, [x | y], <<1:3>>]})},
     {"run_no_args", etf({run, 300, spin, []})},
     %% Arguments over 1 KiB take the decoder's heap path.
     {"run_big_args", etf({run, 5, echo, [binary:copy(<<"a">>, 1500)]})},
     {"run_string_args", etf({run, 70000, echo, "abc"})},
     {"runs", etf({runs, [{1, echo, [a]}, {2, sleep, [10]},
                          {4294967296, sum, [[1, 2 | 3]]}]})},
     {"runs_empty", etf({runs, []})},
     {"runs_bad_element", etf({runs, [{1, echo, [x]}, not_a_tuple, {2, echo},
                                      {-1, echo, []}, {3, "echo", []}]})},
     {"run_bad_tag", etf({run, -1, echo, []})},
     {"cancel_shutdown", etf({cancel, 7, shutdown})},
     {"cancel_killed", etf({cancel, 1 bsl 63, killed})},
     {"cancel_timeout", utf8({cancel, 9, timeout})},
     {"cancel_other", etf({cancel, 10, other})},
     %% Native servers (thread isolation): hello's specs, and the frames
     %% that reach them.
     {"hello_servers",
      etf({hello, #{size => 2, libraries => [<<"priv/moat_demo.so">>],
                    strategy => rest_for_one, max_restarts => 3,
                    max_seconds => 5,
                    servers => [{a, 0, counter, [0], permanent, 5000},
                                {{b, 1}, 0, counter, [10, 300], transient,
                                 brutal_kill},
                                {<<"c">>, 0, counter, [], temporary,
                                 infinity}]}})},
     {"hello_servers_bad",
      etf({hello, #{libraries => [], strategy => simple_one_for_one,
                    servers => [{a, 3, counter, [0 | 1], sometimes, -1},
                                not_a_spec]}})},
     {"call", etf({call, 11, 0, {add, 5}})},
     {"call_big", utf8({call, 1 bsl 64 - 1, 4294967295,
                        {sleep, [<<"x">>, #{k => 1.5}]}})},
     {"call_bad", etf({call, 12, -1})},
     {"cast", etf({cast, 1, {add, -3}})},
     {"which_children", etf({which_children, 13})},
     {"count_children", utf8({count_children, 14})},
     {"stop_servers", etf({stop_servers})},
     %% What a worker process sends its parent (moat__wframe_decode):
     %% a task worker's frames, and the servers' worker's reports.
     {"w_ready", etf({ready, 4242, [echo, spin]})},
     {"w_error", etf({error, {shutdown, {failed_to_start_child, a, badarg}}})},
     {"w_done", etf({done, [{1, ok, <<"x">>}, {1 bsl 64 - 1, exit, {native_error, <<"y">>}}]})},
     {"w_stopped", etf({stopped, [3, 4]})},
     {"w_log", etf({log, warning, <<"careful">>})},
     {"w_restarts", etf({restarts, 17})},
     {"w_crashed", etf({crashed, 2, {s, 1}, {native_error, <<"crash">>}})},
     {"w_gave_up", etf({gave_up, {native_crash, sigsegv}})},
     {"w_servers_stopped", etf({servers_stopped})}] ++
    dist_packets().

%% The distribution transport's packets (moat__dist_decode), as the VM
%% writes them to a C-node: the pass-through byte, the control message
%% and, for a send, the message.
dist_packets() ->
    Pid = c:pid(0, 42, 0),
    Frame = term_to_binary({run, 7, echo, [1]}),
    Token = {0, Pid, 3, 5, 0},
    [{"d_tick", <<>>},
     {"d_reg_send", dist({6, Pid, '', moat}, Frame)},
     {"d_reg_send_utf8", <<112, (utf8({6, Pid, '', moat_echo}))/binary, (utf8({ping, 1}))/binary>>},
     {"d_send", dist({2, '', Pid}, Frame)},
     {"d_send_tt", dist({12, '', Pid, Token}, Frame)},
     {"d_reg_send_tt", dist({16, Pid, '', moat, Token}, Frame)},
     {"d_exit", dist({3, Pid, Pid, normal})},
     {"d_exit2_tt", dist({18, Pid, Pid, Token, kill})},
     {"d_unlink_id", dist({35, 1 bsl 40, Pid, Pid})},
     {"d_link", dist({1, Pid, Pid})},
     {"d_monitor", dist({19, Pid, Pid, make_ref()})}].

dist(Control) -> <<112, (etf(Control))/binary>>.
dist(Control, Msg) -> <<(dist(Control))/binary, (etf(Msg))/binary>>.

terms() ->
    Node = <<119, 13, "nonode@nohost">>, % SMALL_ATOM_UTF8_EXT
    Y = 3,
    [{"small_integer", etf(42)},
     {"integer", etf(-100000)},
     {"small_big", etf(1 bsl 64)},
     {"small_big_negative", etf(-(1 bsl 70))},
     {"large_big", etf(1 bsl (8 * 300))},
     {"new_float", etf(3.14)},
     {"float_old", term_to_binary(-1.5e-7, [{minor_version, 0}])},
     {"atom_latin1", etf('héllo')},
     {"atom_small_utf8", utf8('héllo')},
     {"atom_utf8_long", utf8(list_to_atom(lists:duplicate(100, 16#4E2D)))},
     {"small_tuple", etf({a, 1, "b"})},
     {"large_tuple", etf(list_to_tuple(lists:seq(1, 300)))},
     {"map_flat", etf(#{a => 1, <<"b">> => [2], {c} => #{}})},
     {"map_large", etf(maps:from_list([{I, I} || I <- lists:seq(1, 40)]))},
     {"nil", etf([])},
     {"string", etf("hello")},
     {"list", etf([1, a, <<"b">>, [c]])},
     {"list_improper", etf([1 | 2])},
     {"binary", etf(<<"binary">>)},
     {"bit_binary", etf(<<1, 2:5>>)},
     {"pid", etf(self())},
     {"port", etf(hd(erlang:ports()))},
     {"reference", etf(make_ref())},
     {"fun", etf(fun(X) -> X + Y end)},
     {"export", etf(fun lists:map/2)},
     {"nested_deep",
      etf(lists:foldl(fun(_, A) -> [A] end, x, lists:seq(1, 100)))},
     {"reason_shutdown", etf({shutdown, because})},
     {"reason_normal", utf8(normal)},
     %% The kinds term_to_binary no longer writes.
     {"pid_old", <<131, 103, Node/binary, 0:32, 0:32, 1>>},
     {"port_old", <<131, 102, Node/binary, 5:32, 1>>},
     {"port_v4", <<131, 120, Node/binary, 1:64, 2:32>>},
     {"reference_old", <<131, 101, Node/binary, 9:32, 1>>},
     {"reference_new", <<131, 114, 2:16, Node/binary, 1, 1:32, 2:32>>},
     %% Refused: compressed, and an atom cache reference.
     {"bad_compressed", term_to_binary(lists:seq(1, 50), [compressed])},
     {"bad_atom_cache_ref", <<131, 82, 0>>}].
