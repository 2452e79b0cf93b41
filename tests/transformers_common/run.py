"""Runs transformers' common model tests (`ModelTesterMixin`) against GPT-MoE: `common_gpt_moe.py`.

    python tests/transformers_common/run.py [pytest arguments, e.g. -k router -x]

The tests ship in the source distribution of transformers (`tests/test_modeling_common.py` and the files it imports);
this script fetches the sdist of the installed transformers version with `pip download` (once, into
`$HF_HOME/hf_moe_offload/transformers-tests/<version>`; it needs the package index, so it is no part of `make test`),
copies its `tests/*.py` into a package `transformers_tests`, and runs pytest on `common_gpt_moe.py` with that package
importable. `ConfigTester` is not run: `test_configuration_common.py` imports `tests/utils/`, which the sdist lacks
(GPT-MoE's config is tested in `tests/test_config.py`). The sdist also lacks two of the modules
`test_modeling_common.py` imports, `tests/exporters/test_export.py` and `tests/generation/test_utils.py`: they are
replaced by empty mixins, so the export (`torch.export`) and generation (`GenerationTesterMixin`) suites are not run
here (nor `test_generation_tester_mixin_inheritance`, which checks for that mixin); GPT-MoE's generation is tested in
the suite itself (`tests/test_modeling.py`). The test dependency `parameterized` is installed if missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TESTS = (HERE / "common_gpt_moe.py").relative_to(REPO)  # pytest node ids are relative to the repository
STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:  # not in the sdist: the export suite is not run\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:  # not in the sdist: the generation suite is not run\n"
    "    pass\n",
}


def tests_package(version: str) -> Path:
    """A folder holding `transformers_tests/`, the sdist's `tests/*.py` of transformers `version` plus the stubs."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    root = home / "hf_moe_offload" / "transformers-tests" / version
    package = root / "transformers_tests"
    if (package / "test_modeling_common.py").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"transformers-{version}.tar.gz"
    if not sdist.exists():
        download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*download, f"transformers=={version}", "-d", str(root)], check=True)
    staging = root / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            relative = member.name[len(prefix) :] if member.name.startswith(prefix) else None
            if member.isfile() and relative and "/" not in relative and relative.endswith(".py"):
                target = staging / relative
                target.write_bytes(archive.extractfile(member).read())  # plain files only: no link is followed
    if not (staging / "test_modeling_common.py").exists():
        raise RuntimeError(f"the transformers {version} sdist holds no tests/test_modeling_common.py")
    (staging / "__init__.py").touch()
    for relative, text in STUBS.items():
        target = staging / relative
        target.parent.mkdir(exist_ok=True)
        (target.parent / "__init__.py").touch()
        target.write_text(text)
    shutil.rmtree(package, ignore_errors=True)
    staging.rename(package)
    return root


def main(argv: list[str]) -> int:
    if importlib.util.find_spec("parameterized") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "parameterized"], check=True)
    root = tests_package(transformers.__version__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    # transformers marks its tests with markers of its own (`accelerate_tests`, ...): no --strict-markers here.
    command = [sys.executable, "-m", "pytest", str(TESTS), "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    # This test checks that the test class inherits `GenerationTesterMixin`, which the sdist lacks (see above).
    for test_class in ("GPTMoEEveryOtherLayerTest", "GPTMoEEveryLayerTest", "GPTMoERotaryEveryLayerTest"):
        command += ["--deselect", f"{TESTS}::{test_class}::test_generation_tester_mixin_inheritance"]
    command += argv
    return subprocess.run(command, env=env, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
