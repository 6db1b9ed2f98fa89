"""Dataset tools (absl binaries): convert, generate, validate and inspect RLDS datasets."""
