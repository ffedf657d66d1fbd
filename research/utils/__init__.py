"""timm glue for the research scripts: data, models, CLI, checkpoints and logging.

Import ``utils.compat`` and call ``ensure_torchvision()`` before any module that imports timm
(``data``, ``models``, ``training``, ``engine``); ``cli`` and ``options`` (the command lines)
import neither torch nor timm, so the scripts answer ``--help`` before loading them.
"""
