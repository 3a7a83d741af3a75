"""The `lorakit` command line. `main.py` builds the parser; each subcommand imports its heavy
dependencies only inside its `run` function."""
