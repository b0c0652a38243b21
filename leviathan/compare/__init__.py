"""`leviathan compare`: configs x seeds under one budget on one dataset, one report.

See `runner` for the rules (data, budget, reuse, resume, failures) and `report` for the
outputs (results.md, results.json, val-BPC plots).
"""

from leviathan.compare.runner import (
    Budget,
    CompareError,
    Comparison,
    ConfigResult,
    RunResult,
    compare,
    parse_budget,
)

__all__ = [
    "Budget",
    "CompareError",
    "Comparison",
    "ConfigResult",
    "RunResult",
    "compare",
    "parse_budget",
]
