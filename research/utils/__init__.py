"""timm glue for the research scripts: data, models, CLI, checkpoints and logging.

Import ``utils.compat`` and call ``ensure_torchvision()`` before any module that imports timm
(``data``, ``models``, ``training``, ``engine``, ``cli``); this package imports none on its own.
"""
