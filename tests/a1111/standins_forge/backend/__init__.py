"""Stand-in of Forge's `backend` package (tests only; a1111.md "Training from a tab")."""
