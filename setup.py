"""Packaging for codetr: every field comes from settings.ini (the nbdev 2 layout)."""
import shutil
from configparser import ConfigParser
from pathlib import Path

import setuptools

assert Path("settings.ini").exists(), "run setup.py from the repository root, next to settings.ini"
config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

requirements = cfg.get("requirements", "").split()
extras = {
    "cuda": cfg.get("cuda_requirements", "").split(),
    "dev": cfg.get("dev_requirements", "").split(),
}
readme = Path("README.md")
# The CUDA sources live in kernels/ (next to the package in a checkout); the wheel ships a copy as codetr/kernels/
# (git-ignored), which is where codetr.ops.cuda.kernel_dir looks in an installed package.
if Path("kernels").is_dir():
    shutil.copytree("kernels", Path(cfg["lib_path"]) / "kernels", dirs_exist_ok=True)

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    keywords=cfg["keywords"],
    python_requires=">=" + cfg["min_python"],
    # codetr/kernels holds data only (the CUDA sources, shipped in the wheel so an installed codetr finds them, see
    # codetr.ops.cuda.kernel_dir); it is listed as a package so setuptools includes it without a warning.
    packages=setuptools.find_packages(include=["codetr", "codetr.*"]) + ["codetr.kernels"],
    package_data={"codetr.kernels": ["*.cu", "*.h"]},
    include_package_data=True,
    install_requires=requirements,
    extras_require=extras,
    zip_safe=False,
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
