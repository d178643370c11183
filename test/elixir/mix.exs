# Uses moat from Elixir, the way an Elixir project would: as a rebar3
# dependency by path, compiled by Mix (which runs moat's `make c` hook).
# Offline: Mix 1.14 needs MIX_REBAR3 (the Makefile exports it) and never
# fetches anything, since moat has no dependencies of its own.
defmodule MoatElixirTest.MixProject do
  use Mix.Project

  def project do
    [
      app: :moat_elixir_test,
      version: "0.1.0",
      elixir: "~> 1.14",
      deps: [{:moat, path: "../..", manager: :rebar3}]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end
end
