"""Command-line tools around the engine and the server: `verispec check`, `bench`, `loadtest`, and their report tables."""
