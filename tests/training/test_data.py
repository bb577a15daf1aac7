from __future__ import annotations

import json

import pytest

from service.adapters.manifest import AdapterManifest
from tests.factories import make_tokenizer
from training.data import DataError, read_jsonl, split, tokenize_example
from training.recipes import DOLLY, SCHEMA, TASKS


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def manifest_for(task) -> AdapterManifest:
    return AdapterManifest(
        name=task.name,
        base_model={"id": "b", "fingerprint": "hsfp1:0123456789"},
        prompt_template=task.prompt_template,
        input_fields=task.input_fields,
        output=task.output,
    )


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_file_malformed_line_and_missing_fields(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl", ("a",))
    good = json.dumps({"instruction": "i", "response": "r"})
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON"):
        read_jsonl(write(tmp_path, [good, "", "{bad"]), DOLLY.required_record_fields)
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field\(s\) \['response'\]"):
        read_jsonl(write(tmp_path, [good, json.dumps({"instruction": "i"})]), DOLLY.required_record_fields)
    with pytest.raises(DataError, match="expected a JSON object"):
        read_jsonl(write(tmp_path, ["[1, 2]"]), ("a",))


def test_split_is_seeded_disjoint_and_complete():
    records = list(range(100))
    train, held = split(records, 10, seed=3)
    assert split(records, 10, seed=3) == (train, held)
    assert split(records, 10, seed=4)[1] != held
    assert sorted(train + held) == records and len(held) == 10
    with pytest.raises(DataError):
        split(records, 100, seed=0)


def test_labels_cover_response_and_eos_even_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this guards against
    manifest = manifest_for(DOLLY)
    inputs, target = DOLLY.to_example({"instruction": "Name a capital", "context": "", "response": "Paris"})
    ex = tokenize_example(tokenizer, manifest, inputs, target, max_length=256)
    prompt_len = len(tokenizer(manifest.render_prompt(inputs)).input_ids)
    assert ex.labels[:prompt_len] == [-100] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id and ex.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[:prompt_len]) == "### Instruction:\nName a capital\n\n### Response:\n"


def test_context_section_only_with_context():
    manifest = manifest_for(DOLLY)
    with_ctx = manifest.render_prompt({"instruction": "Q", "context": "C"})
    assert "### Context:\nC" in with_ctx
    assert "Context" not in manifest.render_prompt({"instruction": "Q"})


def test_long_prompts_are_dropped_and_responses_truncated(tokenizer):
    manifest = manifest_for(DOLLY)
    long_ctx = {"instruction": "Q", "context": "word " * 400}
    assert tokenize_example(tokenizer, manifest, long_ctx, "A", max_length=64) is None
    ex = tokenize_example(tokenizer, manifest, {"instruction": "Q"}, "answer " * 200, max_length=64)
    assert len(ex.input_ids) == len(ex.labels) == 64


def test_schema_target_is_the_json_object_in_key_order():
    record = {
        "product": "Lamp",
        "description": "d",
        "output": {"call_to_action": "Buy", "subject": "Lamp!", "body": "b"},
    }
    inputs, target = SCHEMA.to_example(record)
    assert inputs == {"product": "Lamp", "description": "d"}
    assert list(json.loads(target)) == ["subject", "body", "call_to_action"]


def test_shipped_marketmail_dataset_is_valid_and_varied():
    from pathlib import Path

    import jsonschema

    path = Path(__file__).resolve().parents[2] / "data" / "schema" / "marketmail.jsonl"
    records = read_jsonl(path, SCHEMA.required_record_fields)
    assert len(records) >= 60
    assert len({r["product"] for r in records}) == len(records)
    for r in records:
        jsonschema.validate(r["output"], SCHEMA.output["json_schema"])
        text = (r["output"]["subject"] + " " + r["output"]["body"]).lower()
        assert r["product"].lower() in text, r["product"]
    assert set(TASKS) == {"dolly", "schema"}
