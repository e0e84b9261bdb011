"""The README is the front door: its commands must exist as written, and the defaults it points
to (configs/default.yaml) must be what `charrnn train` really uses with no arguments."""
import re
import shlex
from pathlib import Path

import click
import pytest

from charrnn import config
from charrnn.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    """Every `charrnn ...` line inside a ```bash block, comments stripped."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("charrnn ")]


def test_readme_has_commands_for_every_subcommand():
    used = {shlex.split(c)[1] for c in readme_commands()}
    assert {"train", "sample", "eval"} <= used


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    """Options, choices and value types of the command are accepted by the real CLI."""
    args = shlex.split(command)[1:]
    with cli.make_context("charrnn", list(args), resilient_parsing=False) as ctx:
        sub = cli.get_command(ctx, args[0])
        assert sub is not None, f"no such command: {args[0]}"
        try:
            sub.make_context(args[0], args[1:], parent=ctx)
        except click.UsageError as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"README command does not parse: {command}: {e.format_message()}")


def test_default_yaml_is_the_builtin_default():
    assert config.load(ROOT / "configs" / "default.yaml") == config.Config()


def test_every_shipped_config_is_documented():
    for path in (ROOT / "configs").glob("*.yaml"):
        assert f"configs/{path.name}" in README, path.name
        config.load(path)  # and loads
