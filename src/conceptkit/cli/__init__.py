"""The `conceptkit` command line: one thin module per command; the only place that exits."""

from conceptkit.cli.common import app

# Importing a command module registers its command on `app`. Add new commands here.
from conceptkit.cli import cache, cluster, evaluate, generate, harvest, models, sliders  # noqa: E402,F401  isort: skip

__all__ = ["app"]
