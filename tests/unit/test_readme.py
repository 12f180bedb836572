"""README stays true: every setting is documented under its environment variable and flag."""

from __future__ import annotations

from pathlib import Path

from rerank_server.settings import ServerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    for name, field in ServerSettings.model_fields.items():
        row = next(
            (line for line in README.splitlines() if line.startswith(f"| `RERANK_{name.upper()}` |")), None
        )
        assert row is not None, f"RERANK_{name.upper()} missing from README"
        assert f"`--{name.replace('_', '-')}`" in row
        default = ",".join(field.default) if isinstance(field.default, list) else field.default
        if default != "":
            assert f"`{default}`" in row, f"README shows another default for {name}"


def test_the_readme_names_the_commands_ci_runs() -> None:
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in README and "./scripts/test.sh" in ci
    assert "./scripts/serve.sh" in README
