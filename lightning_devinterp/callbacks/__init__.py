"""The thin Lightning layer: callbacks that decide when to estimate, gather the data, and report."""
