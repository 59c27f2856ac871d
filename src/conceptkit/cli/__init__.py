"""The `conceptkit` command line: one thin module per command; the only place that exits."""

import os

# OpenMP threads that spin while they wait make a CPU run 5-12x slower as soon as another process
# wants a core (measured: toy slider training at 0.16 steps/s with 2 spinning threads on a busy
# 2-core machine, 1.53 with passive waiting; docs/benchmarks.md). Set before torch starts; a value
# the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from conceptkit.cli.common import app  # noqa: E402  after OMP_WAIT_POLICY

# Importing a command module registers its command on `app`. Add new commands here.
from conceptkit.cli import cache, cluster, evaluate, generate, harvest, implant, models, sliders  # noqa: E402,F401  isort: skip

__all__ = ["app"]
