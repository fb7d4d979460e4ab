"""The GPU check (scripts/gpu_check.sh): one module per check, run by __main__ in child processes."""
