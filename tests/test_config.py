import json

import pytest
import yaml

from selector.config import REDACTED, dump_yaml, load_config, parse_config
from selector.errors import ConfigError


def base(**over):
    cfg = {
        "method": "random",
        "tokenizer": "/models/tok",
        "corpus": {"uri": "s3://bucket/corpus", "storage_options": {
            "key": "AKIAEXAMPLE", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                                                       "aws_session_token": "tok"}}},
        "work": {"root": "s3://bucket/work", "storage_options": {"secret": "other"}},
        "budget": {"tokens": 1000},
    }
    cfg.update(over)
    return cfg


def test_unknown_key_is_rejected_with_its_path():
    data = base()
    data["corpus"]["text_colum"] = "body"
    with pytest.raises(ConfigError) as err:
        parse_config(data, "job.yaml")
    assert "corpus.text_colum: unknown key" in str(err.value)
    assert "job.yaml" in str(err.value)


def test_unknown_top_level_key_and_missing_required_key():
    data = base(budgett={"tokens": 3})
    del data["tokenizer"]
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "budgett: unknown key" in str(err.value)
    assert "tokenizer: required key missing" in str(err.value)


def test_unknown_method_named():
    with pytest.raises(ConfigError, match="method"):
        parse_config(base(method="magic"))


def test_budget_needs_exactly_one_of_tokens_or_fraction():
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config(base(budget={"tokens": 5, "fraction": 0.5}))
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config(base(budget={}))
    assert parse_config(base(budget={"fraction": 0.25})).budget.resolve(400) == 100


def test_secrets_are_redacted_when_printed_or_dumped():
    cfg = parse_config(base())
    for text in (dump_yaml(cfg), json.dumps(cfg.redacted())):
        assert "AKIAEXAMPLE" not in text and "s3cr3t" not in text and "other" not in text and '"tok"' not in text
        assert REDACTED in text
        assert "http://127.0.0.1:9000" in text  # endpoints are not secrets
    # The live config still has the secret (it is needed to connect).
    assert cfg.corpus.storage_options["secret"] == "s3cr3t"


def test_config_hash_ignores_secrets_and_execution_settings():
    a = parse_config(base())
    b_data = base(ray={"num_cpus": 8, "shard_readers": 5}, run_id="other-name")
    b_data["corpus"]["storage_options"]["secret"] = "rotated"
    b = parse_config(b_data)
    assert a.config_hash() == b.config_hash()
    c = parse_config(base(seed=7))
    assert c.config_hash() != a.config_hash()
    assert a.resolved_run_id() == f"random-{a.config_hash()[:12]}"


def test_load_config_from_yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base()))
    assert load_config(path).budget.tokens == 1000
    assert load_config(path, overrides={"budget.tokens": 5}).budget.tokens == 5
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
