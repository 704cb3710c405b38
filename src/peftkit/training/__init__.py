"""Training runs: what ``peftkit train`` / ``eval`` / ``generate`` / ``merge`` / ``inspect`` do.

Modules, bottom to top:

- :mod:`~peftkit.training.train_config`: ``TrainConfig`` (YAML keys = command-line flags), validation;
- :mod:`~peftkit.training.method_choice`: ``--method NAME`` + options → a method config object;
- :mod:`~peftkit.training.tasks`: tasks shipped with the package (``person-json``);
- :mod:`~peftkit.training.data`: data files → chats → prompt-masked token rows (a package);
- :mod:`~peftkit.training.evaluation`: perplexity, exact match, ROUGE, generation;
- :mod:`~peftkit.training.reports`: the trainable-parameter table, metrics files, ``loss.png``;
- :mod:`~peftkit.training.checkpoints`: atomic checkpoints with optimizer, scheduler and RNG states;
- :mod:`~peftkit.training.run_directory`: ``train_config.yaml``, the base-model loader, output-dir policy;
- :mod:`~peftkit.training.optimization`: ``--optimizer`` and ``--lr-scheduler``;
- :mod:`~peftkit.training.loop`: ``train(config)``, the accelerate loop, in parts (a package);
- :mod:`~peftkit.training.runs`: opening a finished run directory (eval, generate, merge);
- :mod:`~peftkit.training.inspection`: ``peftkit inspect``'s tables.

The training loss itself is :mod:`peftkit.objectives` (shared with :mod:`peftkit.integrations`).

Nothing is imported here, so that importing one module (the config, for ``--help``) stays cheap.
"""
