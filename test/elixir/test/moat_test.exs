defmodule MoatTest do
  # moat as an Elixir project sees it: a pool in the project's own
  # supervision tree, the API called with Elixir terms and keyword lists,
  # and the return shapes and exit reasons of Elixir's Task. Every test
  # ends with an empty mailbox: moat sends exactly one message per task,
  # and none after the task has been given up.
  use ExUnit.Case, async: false

  @pool :ex_pool

  # Long enough for a message that should never come to arrive if moat
  # sent it anyway. The tests below never assert how fast anything is.
  @settle 300

  setup do
    children = [{:moat, name: @pool, size: 2}]

    start_supervised!(%{
      id: :ex_sup,
      start: {Supervisor, :start_link, [children, [strategy: :one_for_one]]},
      type: :supervisor
    })

    :ok
  end

  defp assert_mailbox_empty(wait \\ 0) do
    refute_receive _, wait
  end

  test "the pool runs as a child of an Elixir supervisor, under the id {:moat, name}" do
    children = [{:moat, name: :ex_pool_2, size: 3}]
    {:ok, sup} = Supervisor.start_link(children, strategy: :one_for_one)

    assert [{{:moat, :ex_pool_2}, pid, :supervisor, _}] = Supervisor.which_children(sup)
    assert is_pid(pid)
    assert %{size: 3, queued: _, running: _, completed: _} = :moat.stats(:ex_pool_2)
    assert {:ok, :ok} = :moat.run(:ex_pool_2, :sleep, [1])

    :ok = Supervisor.stop(sup)
    assert {:error, :not_found} = :moat.stats(:ex_pool_2)
    assert {:exit, :noproc} = :moat.run(:ex_pool_2, :echo, [1])
    assert_mailbox_empty()
  end

  test "async/3 and await/1 return the task's result; Elixir terms round-trip" do
    assert 6765 = :moat.async(@pool, :fib, [20]) |> :moat.await()

    term = %{name: "moat", list: [1, 2.5, :three], tuple: {"ü", <<0, 255>>}, nested: %{[] => nil}}
    assert :moat.await(:moat.async(@pool, :echo, [term])) == term

    results =
      1..20
      |> Enum.map(&:moat.async(@pool, :echo, [&1]))
      |> Enum.map(&:moat.await/1)

    assert results == Enum.to_list(1..20)
    assert_mailbox_empty()
  end

  test "await/1 exits like Task.await when the task fails" do
    task = :moat.async(@pool, :fail, ["boom"])

    assert catch_exit(:moat.await(task)) ==
             {{:native_error, "boom"}, {:moat, :await, [task, 5000]}}

    task = :moat.async(@pool, :exit, [{:shutdown, :because}])

    assert catch_exit(:moat.await(task, 1000)) ==
             {{:shutdown, :because}, {:moat, :await, [task, 1000]}}

    task = :moat.async(:no_such_pool, :echo, [1])
    reason = catch_exit(:moat.await(task))
    assert reason == {:noproc, {:moat, :await, [task, 5000]}}
    assert Exception.format_exit(reason) =~ "exited in: :moat.await("
    assert_mailbox_empty()
  end

  test "an await timeout exits with {:timeout, ...}; the task's late result never arrives" do
    # spin ignores cancellation: the task is abandoned, and its body returns
    # a second later into a mailbox that must stay empty.
    task = :moat.async(@pool, :spin, [1_000_000])
    assert catch_exit(:moat.await(task, 50)) == {:timeout, {:moat, :await, [task, 50]}}
    assert %{running: 0, queued: 0, abandoned: 0} = wait_idle(@pool)
    assert_mailbox_empty(@settle)
  end

  test "yield/2 gives nil while the task runs, then {:ok, result}; shutdown/1 stops it" do
    task = :moat.async(@pool, :sleep, [60_000])
    assert :moat.yield(task, 0) == nil
    assert :moat.shutdown(task) == nil

    task = :moat.async(@pool, :echo, [:hello])
    assert :moat.yield(task, 5000) == {:ok, :hello}

    task = :moat.async(@pool, :fail, [~c"charlist"])
    assert :moat.yield(task, 5000) == {:exit, {:native_error, "charlist"}}

    [t1, t2] = [:moat.async(@pool, :echo, [1]), :moat.async(@pool, :fail, ["x"])]

    assert :moat.yield_many([t1, t2], 5000) == [
             {t1, {:ok, 1}},
             {t2, {:exit, {:native_error, "x"}}}
           ]

    assert_mailbox_empty(@settle)
  end

  test "run/3 returns {:ok, result} or {:exit, reason} and never raises for a failed task" do
    assert :moat.run(@pool, :sum, [<<1, 2, 3>>]) == {:ok, 6}

    assert :moat.run(@pool, :fail, ["native trouble"]) ==
             {:exit, {:native_error, "native trouble"}}

    assert :moat.run(:no_such_pool, :echo, [1]) == {:exit, :noproc}
    assert :moat.run(@pool, :no_such_task, []) == {:exit, {:unknown_task, :no_such_task}}
    assert :moat.run(@pool, :sleep, [60_000], 10) == {:exit, :timeout}
    assert_mailbox_empty(@settle)
  end

  test "async/4 takes keyword options: link: true turns a failure into an exit signal" do
    Process.flag(:trap_exit, true)
    task = :moat.async(@pool, :fail, ["linked"], link: true)
    assert %{pid: pid} = task
    assert is_pid(pid)
    assert :moat.yield(task, 5000) == {:exit, {:native_error, "linked"}}
    assert_receive {:EXIT, ^pid, {:native_error, "linked"}}, 5000

    task = :moat.async(@pool, :sleep, [60_000], timeout: 10)
    assert catch_exit(:moat.await(task)) == {:timeout, {:moat, :await, [task, 5000]}}
    assert_mailbox_empty(@settle)
  end

  test "async_stream/4 takes keyword options and returns Task.async_stream's elements" do
    inputs = Enum.to_list(1..20)
    expected = Enum.map(inputs, &{:ok, &1})

    assert :moat.async_stream(@pool, :echo, inputs, max_concurrency: 3) == expected
    assert Enum.sort(:moat.async_stream(@pool, :echo, inputs, ordered: false)) == expected

    assert :moat.async_stream(@pool, :fail, ["a", "b"], zip_input_on_exit: true) ==
             [exit: {"a", {:native_error, "a"}}, exit: {"b", {:native_error, "b"}}]

    assert :moat.async_stream(@pool, :sleep, [60_000, 1], timeout: 1000, on_timeout: :kill_task) ==
             [exit: :timeout, ok: :ok]

    assert catch_exit(:moat.async_stream(@pool, :sleep, [60_000], timeout: 10)) ==
             {:timeout, {:moat, :async_stream, [10]}}

    assert :moat.async_stream(@pool, :echo, [], []) == []
    assert_mailbox_empty(@settle)
  end

  test "stream/4 is an Enumerable: Enum.take/2 halts it early and leaves nothing behind" do
    stream = :moat.stream(@pool, :echo, Enum.to_list(1..100), max_concurrency: 4)

    assert Enum.take(stream, 3) == [ok: 1, ok: 2, ok: 3]
    # The same stream can be enumerated again, from the start.
    assert Enum.take(stream, 1) == [ok: 1]
    assert Enum.count(stream) == 100

    assert %{running: 0, queued: 0, abandoned: 0} = wait_idle(@pool)
    assert_mailbox_empty(@settle)
  end

  test "stream/4 composes with Stream.map/2, Stream.zip/2 and Stream.take_while/2" do
    doubled =
      :moat.stream(@pool, :fib, [10, 20, 30], ordered: true)
      |> Stream.map(fn {:ok, n} -> 2 * n end)
      |> Enum.to_list()

    assert doubled == [110, 13530, 1_664_080]

    # Zipping suspends the reduction between elements.
    zipped = Stream.zip(:moat.stream(@pool, :echo, [:a, :b, :c, :d], []), 1..2) |> Enum.to_list()
    assert zipped == [{{:ok, :a}, 1}, {{:ok, :b}, 2}]

    slow = :moat.stream(@pool, :sleep, [1, 60_000, 60_000], max_concurrency: 3)
    assert Stream.take_while(slow, fn {:ok, _} -> false end) |> Enum.to_list() == []

    assert %{running: 0, queued: 0, abandoned: 0} = wait_idle(@pool)
    assert_mailbox_empty(@settle)
  end

  test "an exception raised while reducing a stream closes it" do
    stream = :moat.stream(@pool, :sleep, [1, 60_000, 60_000], max_concurrency: 3)

    assert_raise RuntimeError, "stop here", fn ->
      stream |> Stream.map(fn _ -> raise "stop here" end) |> Stream.run()
    end

    assert %{running: 0, queued: 0, abandoned: 0} = wait_idle(@pool)
    assert_mailbox_empty(@settle)
  end

  test "streams take ranges and finite Streams as inputs" do
    assert :moat.async_stream(@pool, :echo, 1..3, []) == [ok: 1, ok: 2, ok: 3]
    doubled = Stream.map(1..4, &(&1 * 2))
    assert :moat.stream(@pool, :echo, doubled, max_concurrency: 2) |> Enum.take(2) == [ok: 2, ok: 4]
    assert_mailbox_empty()
  end

  test "bad arguments and options raise ArgumentError" do
    assert_raise ArgumentError, fn -> :moat.async(@pool, "echo", [1]) end
    assert_raise ArgumentError, fn -> :moat.async(@pool, :echo, [1], bogus: true) end
    assert_raise ArgumentError, fn -> :moat.run(@pool, :echo, {1}) end
    assert_raise ArgumentError, fn -> :moat.run(@pool, :echo, [1], -1) end
    assert_raise ArgumentError, fn -> :moat.await(:not_a_task) end
    # Inputs are a list or an Enumerable; anything else is an ArgumentError.
    assert_raise ArgumentError, fn -> :moat.async_stream(@pool, :echo, {1, 2}, []) end
    assert_raise ArgumentError, fn -> :moat.stream(@pool, :echo, 42, []) end

    assert_raise ArgumentError, fn ->
      :moat.async_stream(@pool, :echo, [1], max_concurrency: 0)
    end

    assert_raise ArgumentError, fn -> :moat.stream(@pool, :echo, [1], ordered: :maybe) end
    assert_raise ArgumentError, fn -> :moat.child_spec(size: 2) end
    assert_raise ArgumentError, fn -> :moat.child_spec(name: :p, size: 0) end
    assert_mailbox_empty()
  end

  test "only the owner may await a task; the owner still can afterwards" do
    task = :moat.async(@pool, :echo, [:mine])

    other =
      Task.async(fn ->
        try do
          :moat.await(task)
        rescue
          e -> e
        end
      end)

    assert %ArgumentError{} = Task.await(other)
    assert :moat.await(task) == :mine
    assert_mailbox_empty()
  end

  test "the API's docs are there for h/1 in iex" do
    # EDoc's chunks hold HTML as Erlang terms, which h/1 renders.
    assert {:docs_v1, _, :erlang, "application/erlang+html", %{"en" => [_ | _]}, _, docs} =
             Code.fetch_docs(:moat)

    for {name, arity} <- [async: 3, await: 2, call: 4, which_children: 1] do
      assert [%{"en" => [_ | _]}] =
               for({{:function, ^name, ^arity}, _, _, doc, _} <- docs, is_map(doc), do: doc),
             "no doc for :moat.#{name}/#{arity}"
    end
  end

  # The pool's counters once cancelled and abandoned work has left its
  # threads (a cancelled sleep returns within about a millisecond), or
  # after five seconds.
  defp wait_idle(pool, tries \\ 500) do
    stats = :moat.stats(pool)

    case stats do
      %{running: 0, queued: 0, abandoned: 0} ->
        stats

      _ when tries > 0 ->
        Process.sleep(10)
        wait_idle(pool, tries - 1)

      _ ->
        stats
    end
  end
end
