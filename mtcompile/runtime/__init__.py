"""Runtime: load and run a bundle (entries, run_all, streams); needs no frontend, pass or tool."""
