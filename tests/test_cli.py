import pytest
from click.testing import CliRunner

from sfumato.bench import BENCHMARKS
from sfumato.cli import COMMANDS, cli


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_and_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_resolves_and_has_help(name):
    result = CliRunner().invoke(cli, ["bench", name, "--help"])
    assert result.exit_code == 0, result.output


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert all(name in result.output for name in COMMANDS)
