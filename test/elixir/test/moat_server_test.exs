defmodule MoatServerTest do
  # Native servers as an Elixir project declares and calls them: the
  # servers in the pool's keyword options inside the project's own tree,
  # :moat.call/4 and :moat.cast/3 with Elixir terms, and the native
  # supervisor giving up handing the decision to the OTP supervisor above.
  use ExUnit.Case, async: false

  @pool :ex_server_pool

  defp start_tree(opts) do
    children = [{:moat, [name: @pool, size: 2] ++ opts}]

    start_supervised!(%{
      id: :ex_server_sup,
      start: {Supervisor, :start_link, [children, [strategy: :one_for_one]]},
      type: :supervisor
    })
  end

  defp counters(ids) do
    for {id, initial} <- ids, do: %{id: id, start: {:moat_demo, :counter, [initial]}}
  end

  test "a counter keeps its state across calls and casts" do
    start_tree(servers: counters(a: 10))

    assert {:ok, 10} = :moat.call(@pool, :a, :get, 1000)
    assert {:ok, 15} = :moat.call(@pool, :a, {:add, 5}, 1000)
    :ok = :moat.cast(@pool, :a, {:add, 1})
    assert {:ok, 16} = :moat.call(@pool, :a, :get)
    assert {:ok, {:error, :badarg}} = :moat.call(@pool, :a, :reset, 1000)
    assert [{:a, :running, :worker}] = :moat.which_children(@pool)
    assert %{specs: 1, active: 1, workers: 1, supervisors: 0} = :moat.count_children(@pool)
    refute_receive _, 100
  end

  test "a crash restarts only that counter under one_for_one; failures are values" do
    start_tree(servers: counters(a: 1, b: 2), max_restarts: 10)

    {:ok, 3} = :moat.call(@pool, :b, {:add, 1}, 1000)
    assert {:exit, {:native_error, "crash"}} = :moat.call(@pool, :a, :crash, 1000)
    assert {:ok, 1} = wait_call(:a, :get)
    assert {:ok, 3} = :moat.call(@pool, :b, :get, 1000)

    assert {:exit, :noproc} = :moat.call(@pool, :nobody, :get, 1000)
    assert {:exit, :noproc} = :moat.call(:no_such_pool, :a, :get, 1000)
    assert {:exit, :timeout} = :moat.call(@pool, :a, {:sleep, 300}, 50)
    assert_raise ArgumentError, fn -> :moat.call(@pool, :a, :get, -1) end
    # The late reply of the timed-out call never arrives.
    refute_receive _, 400
  end

  test "rest_for_one restarts the crashed counter and those after it, in order" do
    start_tree(servers: counters(a: 0, b: 0, c: 0), strategy: :rest_for_one, max_restarts: 10)

    for id <- [:a, :b, :c], do: {:ok, 5} = :moat.call(@pool, id, {:add, 5}, 1000)
    {:ok, seq_b} = :moat.call(@pool, :b, :start_seq, 1000)
    {:ok, seq_c} = :moat.call(@pool, :c, :start_seq, 1000)
    {:exit, {:native_error, "crash"}} = :moat.call(@pool, :b, :crash, 1000)

    # A call right after the crash may still reach the old c, before the
    # supervisor has stopped it: wait for the new one.
    new_c = wait_restarted(:c, seq_c)
    assert {:ok, 0} = :moat.call(@pool, :c, :get, 1000)
    assert {:ok, 5} = :moat.call(@pool, :a, :get, 1000)
    assert {:ok, 0} = :moat.call(@pool, :b, :get, 1000)
    {:ok, new_b} = :moat.call(@pool, :b, :start_seq, 1000)
    assert seq_b < new_b and new_b < new_c
  end

  test "the native supervisor giving up restarts the pool through the OTP tree" do
    start_tree(servers: counters(a: 7), max_restarts: 0, max_seconds: 5)

    owner = :moat_nif.pool_owner(@pool)
    ref = Process.monitor(owner)
    {:ok, 8} = :moat.call(@pool, :a, {:add, 1}, 1000)
    {:exit, {:native_error, "crash"}} = :moat.call(@pool, :a, :crash, 1000)

    assert_receive {:DOWN, ^ref, :process, ^owner, :shutdown}, 5000
    assert {:ok, 7} = wait_call(:a, :get)
    assert :moat_nif.pool_owner(@pool) != owner
  end

  # The start_seq of the server's instance after the one that answered
  # `old`, once it answers.
  defp wait_restarted(id, old, tries \\ 500) do
    case :moat.call(@pool, id, :start_seq, 1000) do
      {:ok, new} when new != old ->
        new

      _ when tries > 0 ->
        Process.sleep(10)
        wait_restarted(id, old, tries - 1)
    end
  end

  # Calls until the server answers (it may be restarting: noproc).
  defp wait_call(id, request, tries \\ 500) do
    case :moat.call(@pool, id, request, 1000) do
      {:exit, :noproc} when tries > 0 ->
        Process.sleep(10)
        wait_call(id, request, tries - 1)

      other ->
        other
    end
  end
end
