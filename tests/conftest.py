import os

# Tests run on the CPU; keep XLA from grabbing every core for one small op.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
