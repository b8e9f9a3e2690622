"""The README's commands, as a newcomer runs them (issue 18): every ``lora-kernels`` line parses, the ones that take
seconds run as written in a copy of the repository, and nothing they write dirties it (outputs go to ``runs/``,
which git ignores)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            cmd = line.split("  #", 1)[0].strip()
            if cmd and not cmd.startswith("#"):
                lines.append(cmd)
    return lines


def _cli_commands(sub: str) -> list[list[str]]:
    out = []
    for line in _bash_lines():
        for part in line.split("&&"):
            argv = shlex.split(part.strip())
            if argv[:2] == ["lora-kernels", sub]:
                out.append(argv[2:])
    return out


def test_readme_has_the_commands_this_file_checks():
    sft = _cli_commands("sft")
    assert [] in sft, "the main job `lora-kernels sft` is not in the README"
    assert ["--config", "configs/sft_jsonl_example.yaml"] in sft
    assert any(line.startswith("pip install torch==2.13.0") for line in _bash_lines())


@pytest.mark.parametrize("argv", _cli_commands("sft"), ids=lambda a: " ".join(a) or "<default>")
def test_every_sft_command_parses(argv, monkeypatch):
    """Each README ``lora-kernels sft`` line is a valid configuration (run from the repository root)."""
    from lora_kernels.training.sft.config import config_from_argv

    monkeypatch.chdir(ROOT)
    cfg = config_from_argv(argv)
    cfg.validate()
    if cfg.dataset.endswith(".jsonl"):
        assert (ROOT / cfg.dataset).is_file(), cfg.dataset


def _copy_repo(dest: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files, committed in a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.slow
def test_fast_readme_commands_run_and_leave_the_repository_clean(tmp_path):
    """The JSONL example (with the tiny random model, so it takes seconds; the README's line uses SmolLM2) runs
    as written from a fresh copy, then resumes from its step-5 checkpoint, and writes only under ``runs/``."""
    repo = _copy_repo(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    fast = ["--model", "tiny-random", "--max_steps", "6", "--eval_every", "0", "--sample_prompts", "[]",
            "--progress", "false"]  # fmt: skip
    exe = [sys.executable, "-m", "lora_kernels"]
    for argv in (["sft", "--config", "configs/sft_jsonl_example.yaml", *fast],
                 ["sft", "--config", "configs/sft_jsonl_example.yaml", *fast, "--resume"]):  # fmt: skip
        out = subprocess.run(exe + argv, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert (repo / "runs" / "my-data" / "adapter" / "adapter_config.json").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert status == "", f"README commands dirtied the repository:\n{status}"
