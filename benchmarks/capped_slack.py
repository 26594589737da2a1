#!/usr/bin/env python3
"""One capped ``hizli bench`` run with the memory plan's capped allocator allowance set to SLACK_MIB,
printing the allocator's flush-and-retry count: does planning right up to ``max_memory_gib`` make
the capped allocator flush its cache mid-step (a device sync each time)?

    python3 benchmarks/capped_slack.py SLACK_MIB JSON BENCH_ARGS...
"""

import sys


def main() -> int:
    slack_mib, out = float(sys.argv[1]), sys.argv[2]
    import torch

    from hizli.train import memory_plan

    memory_plan.CAPPED_SLACK_BYTES = slack_mib * 2**20
    sys.argv = ["hizli", "bench", *sys.argv[3:], "--json", out]
    from hizli.cli import main as cli_main

    try:
        cli_main()
    except SystemExit:
        pass
    stats = torch.cuda.memory_stats()
    print(f"SLACK {slack_mib} MiB: alloc retries {stats.get('num_alloc_retries')}, "
          f"device allocs {stats.get('num_device_alloc')}, frees {stats.get('num_device_free')}, "
          f"syncs {stats.get('num_sync_all_streams')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
