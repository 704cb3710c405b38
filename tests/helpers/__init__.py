"""What the tests share: tiny models, adapters on them, the serve fixtures, the torchrun launcher.

Importable as ``helpers.<module>`` because pytest puts ``tests/`` on ``sys.path`` (pyproject's
``pythonpath``); fixtures stay in ``tests/conftest.py``.
"""
