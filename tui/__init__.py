"""edgekit.tui: the Textual app (chat, live profiling, artifacts, conversion, devices)."""
