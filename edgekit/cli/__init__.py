"""The Typer command line; ``edgekit --help`` imports no torch."""
