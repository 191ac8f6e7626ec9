"""Stand-in for the residual adapters' ``config_task`` module: module-level settings the
network reads at construction and in its forward (mode, which convs get adapters, width
factor, active task)."""
task = 0
mode = "normal"  # or "series_adapters" / "parallel_adapters"
proj = "11"
factor = 1.0
isdropout1 = False
isdropout2 = False
