"""Install the recipe-compatible ``sparseml`` package from ``src/``."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="cap-sparse-suite",
    version="0.1.0",
    description="Recipe-compatible sparsification (CAP, FastCAP, OBS, M-FAC, magnitude) for timm models",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=read_requirements(),
)
