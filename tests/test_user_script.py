"""A user's own script imports the package, then timm and torchvision, with nothing else.

Where the torchvision wheel cannot load its native ops (a CUDA build next to CPU torch) a bare
``import timm`` fails with "operator torchvision::nms does not exist"; ``import sparseml``
must fix that by itself, without the research scripts' shim on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = """
import sparseml
import timm
import torchvision
import torch

model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
print("logits", tuple(model(torch.randn(1, 3, 32, 32)).shape))
print("transforms", torchvision.transforms.ToTensor.__name__)
"""


def run_user_file(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    script = tmp_path / "my_script.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_import_sparseml_then_timm_and_torchvision(tmp_path: Path) -> None:
    done = run_user_file(tmp_path, USER_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logits (1, 3)" in done.stdout


def test_import_sparseml_stays_light(tmp_path: Path) -> None:
    """No timm (the package never imports it) and not even torch: the scripts import the
    package's errors before answering --help, which must not wait for torch."""
    code = (
        "import sys\n"
        "import sparseml\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'timm', 'torch', 'torchvision'}\n"
        "print(sorted(heavy))\n"
    )
    done = run_user_file(tmp_path, code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
