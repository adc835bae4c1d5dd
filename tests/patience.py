"""How long tests wait. Both are guards against hangs, not speed requirements: CI runs on a 2-core machine that
is often busy (a bench command took 6 min 17 s at load 6), so a test waits for progress or readiness and
fails early only when the awaited process has exited."""

# Something that happens on its own: replication between replicas, a reload, a server's start.
PATIENCE_S = 120.0
# A whole subprocess (a bench, a training run, a CLI command) run to completion.
HANG_GUARD_S = 1800.0
