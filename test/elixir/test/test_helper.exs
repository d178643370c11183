ExUnit.start()

defmodule MoatTest.Wait do
  @moduledoc false

  # Polls fun until it returns true, for at most ms milliseconds; returns
  # whether it did.
  def until(fun, ms \\ 5000) do
    cond do
      fun.() -> true
      ms <= 0 -> false
      true -> Process.sleep(10) && until(fun, ms - 10)
    end
  end
end
