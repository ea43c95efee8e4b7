"""What the monitor does between hooks, free of Lightning: when to estimate, how large, at which step size, and
across processes. Usable under a Trainer or under Fabric.
"""
