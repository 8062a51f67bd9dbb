"""The `submoe` command: one entry point over the compressor (`offline`) and the load tester
(`serving`). It sits above both and imports each only when its subcommand runs."""
