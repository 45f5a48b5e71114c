"""Tools on top of the compiler: the CLI, TOML specs, numerics checks, pictures and HTML reports."""
