"""One configuration source: defaults < config file < VERISPEC_* env < flags."""

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from verispec.config import SamplingParams, Settings, SpeculationSettings, load_settings
from verispec.errors import UserError


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "verispec.toml"
    config.write_text('depth = 5\ntemperature = 0.5\nmax-new-tokens = 64\nproposer = "ngram"\n')
    monkeypatch.setenv("VERISPEC_TEMPERATURE", "0.7")
    monkeypatch.setenv("VERISPEC_TOP_P", "0.9")
    settings = load_settings({"top_p": "0.8"}, config)
    assert settings.depth == 5  # file
    assert settings.max_new_tokens == 64  # file
    assert settings.temperature == 0.7  # env beats file
    assert settings.top_p == 0.8  # flag beats env
    assert settings.proposer == "ngram"
    assert settings.top_k == 0  # default
    assert settings.part(SamplingParams).temperature == 0.7
    assert settings.part(SpeculationSettings).depth == 5


def test_json_config_and_auto_depth(tmp_path):
    config = tmp_path / "verispec.json"
    config.write_text(json.dumps({"depth": "auto", "stop": ["\n\n"]}))
    settings = load_settings({}, config)
    assert settings.depth == "auto" and settings.stop == ("\n\n",)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"depth": "-2"}, "--depth"),
        ({"depth": "deep"}, "--depth"),
        ({"top_p": "0"}, "--top-p"),
        ({"temperature": "-1"}, "--temperature"),
        ({"proposer": "oracle"}, "--proposer"),
        ({"max_new_tokens": "0"}, "--max-tokens"),  # its OpenAI name, the one --help shows first
    ],
)
def test_bad_values_name_the_flag(flags, message):
    with pytest.raises(UserError, match=message):
        load_settings(flags)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_settings({}, tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("depth = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_settings({}, broken)


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.depth = 3  # type: ignore[misc]


def test_yaml_server_config_with_a_secret_from_env(tmp_path, monkeypatch):
    from verispec.config import ServerSettings
    from verispec.server.serve import describe

    config = tmp_path / "serve.yaml"
    config.write_text("port: 9000\nmax-running: 2\nrate-limit-rpm: 60\nbreaker-min-acceptance: 0.25\n")
    monkeypatch.setenv("VERISPEC_API_KEYS", "ops:sk-very-secret")
    settings = load_settings({"max_waiting": "3"}, config)
    server = settings.part(ServerSettings)
    assert (server.port, server.max_running, server.max_waiting, server.rate_limit_rpm) == (9000, 2, 3, 60)
    assert server.api_keys.get_secret_value() == "ops:sk-very-secret"
    printed = "\n".join(describe(settings))
    assert "sk-very-secret" not in printed and "api_keys = **********" in printed
    broken = tmp_path / "broken.yml"
    broken.write_text("port: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_settings({}, broken)


def test_proposer_names_and_builders_are_one_table():
    """Settings check proposer names against the registry (`names.py`) without loading a proposer;
    each name's row says where its builder is, and `register` refuses a name once settings have
    read them."""
    from verispec.config import ModelSettings, RoutingSettings
    from verispec.proposers import builder, register
    from verispec.proposers.names import PROPOSER_NAMES

    for name in PROPOSER_NAMES:
        assert callable(builder(name))
        assert ModelSettings(proposer=name).proposer == name
        assert RoutingSettings(proposers=name).proposers == (name,)
        assert name in ModelSettings.model_fields["proposer"].description
    with pytest.raises(RuntimeError, match="before verispec.config is imported"):
        register("oracle", "an oracle", "oracle_plugin:build")
    with pytest.raises(UserError, match="draft, ngram, suffix, head, none"):
        load_settings({"proposers": "oracle"})


# Runs in a fresh interpreter: a plug-in registers before settings are read, and the test process
# has long since imported verispec.config.
PLUG_IN = """
import json, sys
from verispec.proposers import ProposerInputs, build_proposer, register

register("oracle", "an oracle", "oracle_plugin:build")
refused = []
for bad in (("draft", "a draft", "m:f"), ("none", "x", "m:f"), ("a,b", "x", "m:f"), ("solo", "x", "no_function")):
    try:
        register(*bad)
    except ValueError:
        refused.append(bad[0])
from verispec.config import ModelSettings, RoutingSettings, SpeculationSettings

built = build_proposer("oracle", ProposerInputs(target=None, draft=None, speculation=SpeculationSettings()))
print(json.dumps({
    "proposer": ModelSettings(proposer="oracle").proposer,
    "proposers": RoutingSettings(proposers="oracle,ngram").proposers,
    "described": "oracle (an oracle)" in ModelSettings.model_fields["proposer"].description,
    "built": built,
    "refused": refused,
    "heavy": sorted({"torch", "verispec.proposers.draft", "verispec.proposers.ngram"} & set(sys.modules)),
}))
"""


def test_a_plug_in_registers_a_proposer(tmp_path):
    """`register` adds a row to the same table: settings accept the name, `build_proposer` imports
    its builder, and nothing else (no proposer, no torch) is imported on the way."""
    plug_in = "def build(inputs):\n    return ['oracle', inputs.speculation.ngram_max]\n"
    (tmp_path / "oracle_plugin.py").write_text(plug_in)
    result = subprocess.run(
        [sys.executable, "-c", PLUG_IN], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {
        "proposer": "oracle",
        "proposers": ["oracle", "ngram"],
        "described": True,
        "built": ["oracle", SpeculationSettings().ngram_max],
        "refused": ["draft", "none", "a,b", "solo"],
        "heavy": [],
    }


def test_repeatable_settings_from_the_environment(monkeypatch):
    """One value per variable, or several as a JSON list; never a traceback for a plain value."""
    monkeypatch.setenv("VERISPEC_STOP", "abc")
    monkeypatch.setenv("VERISPEC_REDACT_PATTERNS", r"\bsecret\b")
    monkeypatch.setenv("VERISPEC_PROPOSERS", "draft,ngram")
    settings = load_settings({})
    assert (settings.stop, settings.redact_patterns, settings.proposers) == (("abc",), (r"\bsecret\b",), ("draft", "ngram"))
    monkeypatch.setenv("VERISPEC_STOP", '["\\n\\n", "a,b"]')
    monkeypatch.setenv("VERISPEC_PROPOSERS", '["none", "ngram"]')
    settings = load_settings({})
    assert (settings.stop, settings.proposers) == (("\n\n", "a,b"), ("none", "ngram"))
    assert load_settings({"stop": ["x"]}).stop == ("x",)  # flags override
    monkeypatch.setenv("VERISPEC_PROPOSERS", "draft,oracle")
    with pytest.raises(UserError, match="--proposers: unknown proposer 'oracle'"):
        load_settings({})
