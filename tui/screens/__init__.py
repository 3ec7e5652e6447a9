"""The TUI screens: chat, artifacts, convert, profile, devices, and the dialogs they open."""
