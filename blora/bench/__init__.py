"""``blora bench``: the throughput comparison behind the README figures, runnable by any user.

Systems, each measured in its own subprocess on the same workload and dtype: transformers ``generate``
base-only, the blora engine base-only and with N distinct adapters, PEFT's mixed batch
(``generate(adapter_names=...)``) and optionally PEFT one adapter at a time. ``workload`` holds the
prompts and adapters, ``systems`` the per-system runners (the subprocess side), ``report`` the table and
plot, ``throughput`` the plan and the command line.
"""
