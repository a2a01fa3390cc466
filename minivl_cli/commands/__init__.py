"""Subcommands of the `minivl` console command: one module each, exposing `register(subparsers)`."""
