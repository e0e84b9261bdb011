"""The README is the front door: its commands must exist as written, its Python examples must run
as written, and the defaults it points to (configs/default.yaml) must be what `charrnn train`
really uses with no arguments."""
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


def python_blocks(section: str | None = None) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block, in order; only those under the `## section`
    heading when one is named."""
    blocks = []
    for m in re.finditer(r"```python\n(.*?)```", README, flags=re.S):
        line = README.count("\n", 0, m.start(1))
        headings = re.findall(r"^## (.+)$", README[: m.start()], flags=re.M)
        if section is None or (headings and headings[-1] == section):
            blocks.append((line, m.group(1)))
    return blocks


def run_blocks(blocks: list[tuple[int, str]], namespace: dict) -> None:
    """Run code blocks verbatim, in one namespace as a reader pasting them into one session would;
    a failure's traceback points at the README's own line."""
    for line, code in blocks:
        exec(compile("\n" * line + code, str(ROOT / "README.md"), "exec"), namespace)


def test_readme_has_python_examples_of_the_whole_api():
    code = "".join(code for _, code in python_blocks("Use from Python"))
    for name in ("charrnn.train(", "charrnn.load(", ".sample(", ".stream(", ".score(", ".infill(", "CharRNNError"):
        assert name in code, name


def test_readme_python_examples_run_verbatim(tmp_path, monkeypatch, capsys, cli_invoke):
    """The "Use from Python" examples, in an empty directory: they write their own corpus and runs.
    What they claim about the command line holds for the values they make."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    run_blocks(python_blocks("Use from Python"), namespace)
    out = capsys.readouterr().out
    assert ("UsageError: run directory runs/fox already exists; continue it with "
            "charrnn.train(config, run_dir='runs/fox', resume=True)") in out
    model = namespace["model"]
    r = cli_invoke("sample", "runs/fox", "--length", "200", "--prime", "the ", "--temperature", "0.8", "--seed", "7")
    assert r.stdout == namespace["text"] + "\n"
    assert "".join(model.stream(100, seed=1)) == model.sample(100, seed=1)
    assert len(namespace["batch"]) == 3 and namespace["summary"].steps == 150


def test_readme_numpy_example_reads_a_checkpoint(tmp_path, monkeypatch, tiny):
    """The plain-numpy example under "Checkpoint format", on a run made where it looks (runs/demo)."""
    import charrnn

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(tiny.PHRASE, encoding="utf-8")
    charrnn.train(None, "runs/demo", sets=tiny.sets(tmp_path / "corpus.txt"))
    namespace: dict = {}
    run_blocks(python_blocks("Runs, resume and checkpoints"), namespace)
    assert namespace["meta"]["vocab"] == charrnn.load("runs/demo").vocab and namespace["W_hh"].shape == (16, 16)


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
