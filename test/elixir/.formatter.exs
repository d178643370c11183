[
  inputs: ["{mix,.formatter}.exs", "test/**/*.exs"]
]
