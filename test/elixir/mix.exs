# Uses moat from Elixir, the way an Elixir project would: as a rebar3
# dependency by path, compiled by Mix (which runs moat's `make c` hook).
# Offline: Mix 1.14 needs MIX_REBAR3 (the Makefile exports it) and never
# fetches anything, since moat has no dependencies of its own. The
# my_tasks compiler below builds the task library of examples/my_tasks.
defmodule Mix.Tasks.Compile.MyTasks do
  # A Mix compiler that builds a task library, as an Elixir project with C
  # tasks of its own would: here the example's (examples/my_tasks/c_src),
  # with that example's Makefile, into this project's priv/, so that a
  # pool can name it {:priv, :moat_elixir_test, "my_tasks.so"}. It runs
  # after the dependencies are compiled, so moat's include/ is in place.
  @moduledoc false
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    moat = Mix.Project.deps_paths() |> Map.fetch!(:moat) |> Path.expand()
    so = Path.join(Mix.Project.app_path(), "priv/my_tasks.so")

    args = [
      "-C",
      Path.join(moat, "examples/my_tasks/c_src"),
      "SO=" <> so,
      "MOAT_INCLUDE=" <> Path.join(moat, "include")
    ]

    case System.cmd("make", args, stderr_to_stdout: true) do
      {_, 0} ->
        {:ok, []}

      {output, status} ->
        Mix.shell().error(output)
        Mix.raise("make #{Enum.join(args, " ")} failed (exit #{status})")
    end
  end
end

defmodule MoatElixirTest.MixProject do
  use Mix.Project

  def project do
    [
      app: :moat_elixir_test,
      version: "0.1.0",
      elixir: "~> 1.14",
      compilers: Mix.compilers() ++ [:my_tasks],
      deps: [{:moat, path: "../..", manager: :rebar3}]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end
end
