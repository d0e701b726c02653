"""The leaderboard: ``excise leaderboard tune | run | write | coverage | check`` (excise/bench/leaderboard_cli.py,
with the logic in excise/bench/leaderboard.py). Run from the repository's root; results go to benchmarks/results/.

    python benchmarks/leaderboard.py ARGS      # the same as: excise leaderboard ARGS
"""

import sys

from excise.bench.leaderboard_cli import main

if __name__ == "__main__":
    sys.exit(main())
