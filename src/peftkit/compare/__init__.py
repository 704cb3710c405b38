"""``peftkit compare``: several methods on the same model, data, budget and seed, reported side by side.

- :mod:`~peftkit.compare.plan`: the compare file, presets, the rank sweep (``load_plan``);
- :mod:`~peftkit.compare.dry_run`: checking every method on a meta-device model, rough costs;
- :mod:`~peftkit.compare.runner`: the base model once, then each method, resumably (``run_compare``);
- :mod:`~peftkit.compare.report`: report.md, report.json, charts.

The subcommand is :mod:`peftkit.cli.compare`. Nothing is imported here, so that reading the plan (and
``peftkit compare --help``) does not load torch.
"""
