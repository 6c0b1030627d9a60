"""Every command reads one settings source: defaults < --config file < VERISPEC_* environment < flags.

For each command converted to a settings class (check, bench, edge, loadtest, audit): a config
file sets an option, the environment beats the file, a flag beats both, and a bad value, from a
flag or from the environment, is one line naming the flag and exit 2. In process: the parser and
`settings_from` are what `main` runs, without a model or a server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from verispec.audit.query import AuditQuerySettings
from verispec.cli import build_parser, main, settings_from
from verispec.config import Settings
from verispec.edge.command import EdgeSettings
from verispec.offline.command import BatchCommandSettings
from verispec.tools.loadtest import LoadtestSettings
from verispec.tools.settings import BenchSettings, CheckSettings
from verispec.training.distill.command import DistillSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("VERISPEC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # main() must not touch the test's logging


def read(argv: list[str], cls):
    return settings_from(build_parser().parse_args(argv), cls)


def config(tmp_path: Path, text: str, name: str = "settings.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (command line before the options, settings class, option, config file line, its value,
#  environment value, its value, flag value, its value)
CASES = {
    "check": (["check"], CheckSettings, "depths", 'depths = [2, "auto"]', (2, "auto"), "3,4", (3, 4), "5", (5,)),
    "bench": (["bench"], BenchSettings, "repeats", "repeats = 2", 2, "3", 3, "4", 4),
    "edge": (["edge", "x"], EdgeSettings, "depth", 'depth = "server"', "server", "auto", "auto", "3", 3),
    "loadtest": (["loadtest"], LoadtestSettings, "proposers", 'proposers = "ngram"', ("ngram",), "none,draft",
                 ("none", "draft"), "draft,ngram", ("draft", "ngram")),
    "audit": (["audit"], AuditQuerySettings, "limit", "limit = 5", 5, "6", 6, "7", 7),
}  # fmt: skip


@pytest.mark.parametrize("command", CASES)
def test_file_then_environment_then_flag(command, tmp_path, monkeypatch):
    argv, cls, option, line, from_file, env, from_env, flag, from_flag = CASES[command]
    flag_name = "--depth" if command == "check" else "--" + option.replace("_", "-")  # check's --depth is --depths
    path = config(tmp_path, line + "\n")
    assert getattr(read([*argv, "--config", path], cls), option) == from_file
    monkeypatch.setenv(ENV_PREFIX[command] + option.upper(), env)
    assert getattr(read([*argv, "--config", path], cls), option) == from_env
    assert getattr(read([*argv, "--config", path, flag_name, flag], cls), option) == from_flag
    assert read(argv, cls).model_config["frozen"]


# A command whose options are its own reads VERISPEC_<COMMAND>_*; check and bench share the engine's.
ENV_PREFIX = {"check": "VERISPEC_", "bench": "VERISPEC_", "edge": "VERISPEC_EDGE_", "loadtest": "VERISPEC_LOADTEST_",
              "audit": "VERISPEC_AUDIT_"}  # fmt: skip


def test_a_variable_for_one_command_leaves_the_others_alone(monkeypatch):
    monkeypatch.setenv("VERISPEC_DEPTH", "0")  # the engine's depth, for generate and serve
    monkeypatch.setenv("VERISPEC_LIMIT", "3")  # check's and bench's prompt count
    assert read(["edge", "x"], EdgeSettings).depth == "auto"
    assert read(["audit"], AuditQuerySettings).limit is None  # a screenful in the table, all as JSON lines
    assert read(["check"], CheckSettings).limit == 3
    monkeypatch.setenv("VERISPEC_AUDIT_LIMIT", "4")
    monkeypatch.setenv("VERISPEC_AUDIT_URL", "sqlite:///shared.sqlite3")  # the server's own variable, shared
    audit = read(["audit"], AuditQuerySettings)
    assert (audit.limit, audit.audit_url) == (4, "sqlite:///shared.sqlite3")


BAD = {
    "check": (["check", "--depth", "x"], "--depths"),
    "bench": (["bench", "--repeats", "0"], "--repeats"),
    "edge": (["edge", "x", "--depth", "0"], "--depth"),
    "loadtest": (["loadtest", "--proposers", "none,oracle"], "--proposers"),
    "audit": (["audit", "--since", "yesterday"], "--since"),
}


@pytest.mark.parametrize("command", BAD)
def test_a_bad_value_is_one_line_and_exit_2(command, capsys):
    argv, flag = BAD[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"verispec: error: {flag}: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command, env, value, flag",
    [
        ("check", "VERISPEC_DEPTHS", ",", "--depths"),
        ("bench", "VERISPEC_REPEATS", "0", "--repeats"),
        ("edge", "VERISPEC_EDGE_DEPTH", "many", "--depth"),
        ("loadtest", "VERISPEC_LOADTEST_LEVELS", "0,1", "--levels"),
        ("audit", "VERISPEC_AUDIT_OUTCOME", "meh", "--outcome"),
    ],
)
def test_a_bad_value_from_the_environment_names_its_flag(command, env, value, flag, monkeypatch, capsys):
    monkeypatch.setenv(env, value)
    argv = [*CASES[command][0]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"verispec: error: {flag}: ") and len(err.strip().splitlines()) == 1, err


def test_secrets_and_lists_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VERISPEC_API_KEY", "sk-edge")
    edge = read(["edge", "x"], EdgeSettings)
    assert edge.api_key.get_secret_value() == "sk-edge" and "sk-edge" not in repr(edge)
    assert read(["loadtest"], LoadtestSettings).api_key.get_secret_value() == "sk-edge"
    assert read(["loadtest", "--api-key", "sk-flag"], LoadtestSettings).api_key.get_secret_value() == "sk-flag"
    monkeypatch.setenv("VERISPEC_AUDIT_REQUEST_ID", "a, b")
    assert read(["audit"], AuditQuerySettings).request_id == ("a", "b")
    assert read(["audit", "--request-id", "c", "--request-id", "d"], AuditQuerySettings).request_id == ("c", "d")
    path = config(tmp_path, "levels: [1, 3]\nscenarios: none\ntable: true\n", "loadtest.yaml")
    loadtest = read(["loadtest", "--config", path], LoadtestSettings)
    assert loadtest.levels == (1, 3) and loadtest.scenarios == () and loadtest.table


def test_defaults_and_switches_keep_their_meaning():
    loadtest = read(["loadtest"], LoadtestSettings)
    assert (loadtest.concurrency, loadtest.requests, loadtest.max_tokens, loadtest.wait_s) == (4, None, None, None)
    assert loadtest.levels == (1, 2, 4, 8) and loadtest.proposers == ("none", "draft", "ngram")
    bench = read(["bench", "--no-peers"], BenchSettings)
    assert not bench.peers and bench.depths == (1, 2, 4, 6, 8, "auto") and bench.out == Path("bench-out")
    assert read(["check"], CheckSettings).depths == ()  # none given: the depth setting's one depth
    check = read(["check", "--depth", "2", "--depth", "auto"], CheckSettings)
    assert check.depths == (2, "auto") and check.depth == "auto"  # the engine's own depth is another setting
    edge = read(["edge", "x"], EdgeSettings)
    assert (edge.url, edge.depth, edge.temperature, edge.api_key) == ("http://127.0.0.1:8000", "auto", 0.0, None)


def test_a_config_file_for_another_command_is_refused_by_name(tmp_path, capsys):
    path = config(tmp_path, "port = 9000\n")
    assert main(["loadtest", "--config", path]) == 2
    assert "--port" in capsys.readouterr().err


# -- max_tokens: the OpenAI name of max_new_tokens, wherever it is a setting --------------------------

MAX_TOKENS_COMMANDS = {
    "generate": (["generate", "x"], Settings),
    "check": (["check"], CheckSettings),
    "bench": (["bench"], BenchSettings),
    "serve": (["serve"], Settings),
    "batch": (["batch", "in.jsonl", "--output", "out.jsonl"], BatchCommandSettings),
    "distill": (["distill", "--target", "t", "--draft", "d", "--out", "o", "--stdlib-prompts", "8"], DistillSettings),
}


@pytest.mark.parametrize("command", MAX_TOKENS_COMMANDS)
def test_max_tokens_is_max_new_tokens_by_its_openai_name(command, tmp_path, monkeypatch):
    argv, cls = MAX_TOKENS_COMMANDS[command]
    prefix = cls.model_config["env_prefix"]
    assert read([*argv, "--max-tokens", "5"], cls).max_new_tokens == 5
    assert read([*argv, "--max-new-tokens", "6"], cls).max_new_tokens == 6  # the old name still works
    path = config(tmp_path, "max_tokens = 7\n")
    assert read([*argv, "--config", path], cls).max_new_tokens == 7
    monkeypatch.setenv(prefix + "MAX_TOKENS", "8")
    assert read([*argv, "--config", path], cls).max_new_tokens == 8  # the environment beats the file
    assert read([*argv, "--config", path, "--max-tokens", "9"], cls).max_new_tokens == 9


def test_max_tokens_named_twice_or_bad_is_one_line_naming_max_tokens(tmp_path, monkeypatch, capsys):
    assert main(["generate", "x", "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("verispec: error: --max-tokens: ")
    path = config(tmp_path, "max_tokens = 7\nmax_new_tokens = 8\n")
    assert main(["generate", "x", "--config", path]) == 2
    assert "max_tokens and max_new_tokens name the same setting" in capsys.readouterr().err
    monkeypatch.setenv("VERISPEC_MAX_TOKENS", "8")
    monkeypatch.setenv("VERISPEC_MAX_NEW_TOKENS", "9")
    assert main(["generate", "x"]) == 2
    assert "VERISPEC_MAX_TOKENS and VERISPEC_MAX_NEW_TOKENS" in capsys.readouterr().err
