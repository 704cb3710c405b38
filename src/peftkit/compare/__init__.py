"""``peftkit compare``: several methods on the same model, data, budget and seed, reported side by side.

- :mod:`~peftkit.compare.plan`: the compare file, presets, the rank sweep (:func:`load_plan`);
- :mod:`~peftkit.compare.dry_run`: checking every method on a meta-device model, rough costs;
- :mod:`~peftkit.compare.runner`: the base model once, then each method, resumably (:func:`run_compare`);
- :mod:`~peftkit.compare.report`: report.md, report.json, charts;
- :mod:`~peftkit.cli.compare`: the subcommand.
"""

from peftkit.compare.plan import DEFAULT_METHODS, PRESETS, ComparePlan, PlannedRun, load_plan, make_plan
from peftkit.compare.runner import run_compare

__all__ = ["DEFAULT_METHODS", "PRESETS", "ComparePlan", "PlannedRun", "load_plan", "make_plan", "run_compare"]
