"""Stand-in of the webui's `modules` package (tests only). See ../README.md."""
