"""Commands that are not pipeline stages (no DVC stage runs them): tools a user runs on stage outputs."""
