defmodule MoatCnodeTest do
  # The C-node backend as an Elixir project uses it: a pool in the
  # project's own tree with backend: :cnode, Elixir terms through the
  # port, a stream, and a segfault that costs the C-node, not the VM.
  use ExUnit.Case, async: false

  @pool :ex_cnode_pool

  setup do
    :logger.set_application_level(:moat, :critical)
    on_exit(fn -> :logger.unset_application_level(:moat) end)

    start_supervised!(%{
      id: :ex_cnode_sup,
      start:
        {Supervisor, :start_link,
         [[{:moat, name: @pool, backend: :cnode, size: 2}], [strategy: :one_for_one]]},
      type: :supervisor
    })

    :ok
  end

  test "tasks run in the C-node with the NIF backend's shapes" do
    term = %{list: [1, 2.5, "three"], tuple: {:a, <<0, 255>>}}
    assert :moat.await(:moat.async(@pool, :echo, [term])) == term
    assert {:exit, {:native_error, "bad"}} = :moat.run(@pool, :fail, ["bad"])

    assert [2, 4, 6] =
             :moat.stream(@pool, :echo, 1..100, max_concurrency: 4)
             |> Stream.map(fn {:ok, x} -> x * 2 end)
             |> Enum.take(3)

    refute_receive _, 100
  end

  test "a segfault costs the C-node and its tasks, then the pool serves again" do
    sleeper = :moat.async(@pool, :sleep, [60_000])
    assert {:exit, {:native_crash, :cnode_down}} = :moat.run(@pool, :segfault, [])
    assert {:exit, {:native_crash, :cnode_down}} = :moat.yield(sleeper, 1000)
    assert MoatTest.Wait.until(fn -> :moat.run(@pool, :echo, [:back]) == {:ok, :back} end)
    refute_receive _, 100
  end
end
