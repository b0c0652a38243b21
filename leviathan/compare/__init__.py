"""`leviathan compare`: configs x seeds under one budget on one dataset, one report.

`plan` holds the rules (data, budget, reuse, resume, failures), `runner` trains the runs,
`results` reads what they left and `report` writes results.md, results.json and the
val-BPC plots.
"""

from leviathan.compare.plan import Budget, CompareError, parse_budget
from leviathan.compare.results import Comparison, ConfigResult, RunResult
from leviathan.compare.runner import compare

__all__ = [
    "Budget",
    "CompareError",
    "Comparison",
    "ConfigResult",
    "RunResult",
    "compare",
    "parse_budget",
]
