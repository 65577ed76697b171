"""What moelora-eval loads: an exported directory's own modeling code runs only when the user says so."""

from __future__ import annotations

import json
import shutil

import pytest

from moelora_ds.config import RunConfig
from moelora_ds.evaluation.models import load_for_eval, ships_code


def test_model_with_its_own_code_is_refused_without_trust_remote_code(tiny_model_dir, tmp_path):
    exported = tmp_path / "exported"
    shutil.copytree(tiny_model_dir, exported)
    assert not ships_code(exported)
    config = json.loads((exported / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_moelora.MoELoRALlamaForCausalLM"}
    (exported / "config.json").write_text(json.dumps(config))
    (exported / "modeling_moelora.py").write_text("raise SystemExit('this code must not run')\n")
    assert ships_code(exported)
    with pytest.raises(ValueError, match=r"ships its own modeling code .* --trust-remote-code"):
        load_for_eval(RunConfig(), exported=exported)


def test_plain_exported_model_loads_without_trust(tiny_model_dir):
    model, tokenizer, what = load_for_eval(RunConfig(), exported=tiny_model_dir)
    assert what.startswith("exported model") and tokenizer.pad_token_id is not None and not model.training
