"""Lightning-free core: everything one LLC estimate needs, from sampling settings to the summarized result."""
