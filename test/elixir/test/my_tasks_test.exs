defmodule MyTasksTest do
  # A task library of one's own, from Elixir: the my_tasks compiler in
  # mix.exs built the C tasks of examples/my_tasks into this project's
  # priv/my_tasks.so, and a pool in the test's own tree names it the way
  # an application would, {:priv, app, file}, or by path.
  use ExUnit.Case, async: false
  import Bitwise

  @pool :ex_my_tasks

  # Trial division up to 2^40 takes hours: only cancellation ends it.
  @forever 1 <<< 40

  setup do
    pool = {:moat, name: @pool, size: 2, libraries: [{:priv, :moat_elixir_test, "my_tasks.so"}]}

    start_supervised!(%{
      id: :ex_my_tasks_sup,
      start: {Supervisor, :start_link, [[pool], [strategy: :one_for_one]]},
      type: :supervisor
    })

    :ok
  end

  test "the library's tasks return values, through run, async/await and stream" do
    assert {:ok, 2.5} = :moat.run(@pool, :mean, [[1, 2, 3.5, 3.5]])

    assert :moat.await(:moat.async(@pool, :adler32, ["Wikipedia"])) ==
             :erlang.adler32("Wikipedia")

    counts =
      :moat.stream(@pool, :count_primes, [10, 100, 1000, 10_000], max_concurrency: 2)
      |> Enum.map(fn {:ok, n} -> n end)

    assert counts == [4, 25, 168, 1229]
    refute_receive _, 100
  end

  test "errors are values: {:native_error, message} and the exit reason :badarg" do
    message = "mean of an empty list"
    assert {:exit, {:native_error, ^message}} = :moat.run(@pool, :mean, [[]])

    task = :moat.async(@pool, :mean, [[]])

    assert catch_exit(:moat.await(task)) ==
             {{:native_error, message}, {:moat, :await, [task, 5000]}}

    assert {:exit, :badarg} = :moat.run(@pool, :mean, [[1, :two]])
    assert {:exit, :badarg} = :moat.run(@pool, :adler32, [~c"a charlist"])
    assert {:exit, {:unknown_task, :median}} = :moat.run(@pool, :median, [[1]])
    assert {:ok, 2.0} = :moat.run(@pool, :mean, [[2]])
    refute_receive _, 100
  end

  test "count_primes heeds cancellation: a timeout or a shutdown stops its body" do
    assert {:exit, :timeout} = :moat.run(@pool, :count_primes, [@forever], 100)
    # Abandoned (outcome given, body still running) until the body returns.
    assert MoatTest.Wait.until(fn -> :moat.stats(@pool).abandoned == 0 end, 10_000)

    task = :moat.async(@pool, :count_primes, [@forever])
    assert MoatTest.Wait.until(fn -> :moat.stats(@pool).running == 1 end, 10_000)
    # nil: the body returned once asked to stop; one that ignored
    # moat_should_stop() would have been abandoned, {:exit, :killed}.
    assert :moat.shutdown(task, 10_000) == nil
    assert %{running: 0, abandoned: 0} = :moat.stats(@pool)
    refute_receive _, 100
  end

  test "the same .so by path, in the C-node backend" do
    path = Application.app_dir(:moat_elixir_test, "priv/my_tasks.so")
    children = [{:moat, name: :ex_my_tasks_cnode, backend: :cnode, size: 1, libraries: [path]}]
    {:ok, sup} = Supervisor.start_link(children, strategy: :one_for_one)

    assert {:ok, 2.5} = :moat.run(:ex_my_tasks_cnode, :mean, [[1, 2, 3.5, 3.5]])

    assert {:exit, {:native_error, "mean of an empty list"}} =
             :moat.run(:ex_my_tasks_cnode, :mean, [[]])

    assert {:exit, :timeout} = :moat.run(:ex_my_tasks_cnode, :count_primes, [@forever], 100)
    assert {:ok, 1229} = :moat.run(:ex_my_tasks_cnode, :count_primes, [10_000], 10_000)
    :ok = Supervisor.stop(sup)
    refute_receive _, 100
  end
end
