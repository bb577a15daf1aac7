from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.adapters.manifest import AdapterManifest, parse_adapter_name
from service.errors import InputFieldError

DOC = {
    "name": "dolly",
    "base_model": {"id": "base", "fingerprint": "hsfp1:abcdef0123"},
    "prompt_template": "I: {{ instruction }}\n{% if context %}C: {{ context }}\n{% endif %}R:",
    "input_fields": [{"name": "instruction"}, {"name": "context", "required": False}],
}


def manifest(**kw) -> AdapterManifest:
    return AdapterManifest.model_validate({**DOC, **kw})


@pytest.mark.parametrize("name", ["../etc", "a/b", "UPPER", "", ".hidden", "a..b", "base", "__base__", "x" * 65])
def test_bad_adapter_names_are_refused(name):
    with pytest.raises(ValueError):
        parse_adapter_name(name)


@pytest.mark.parametrize("name", ["dolly", "schema", "a.b-c_1", "0x"])
def test_good_adapter_names(name):
    assert parse_adapter_name(name) == name


def test_render_with_and_without_optional_field():
    m = manifest()
    assert m.render_prompt({"instruction": "Say hi"}) == "I: Say hi\nR:"
    assert m.render_prompt({"instruction": "Say hi", "context": "ctx"}) == "I: Say hi\nC: ctx\nR:"


@pytest.mark.parametrize(
    ("inputs", "param"),
    [
        ({"instruction": "x", "colour": "red"}, "input.colour"),
        ({"context": "only"}, "input.instruction"),
        ({"instruction": 3}, "input.instruction"),
        ({"instruction": "   "}, "input.instruction"),
    ],
)
def test_bad_inputs_name_the_field(inputs, param):
    with pytest.raises(InputFieldError) as info:
        manifest().render_prompt(inputs)
    assert info.value.param == param


def test_template_may_only_use_declared_fields():
    with pytest.raises(ValidationError, match="undeclared input fields"):
        manifest(prompt_template="{{ instruction }} {{ secret }}")


def test_template_must_be_valid_jinja():
    with pytest.raises(ValidationError, match="not valid Jinja2"):
        manifest(prompt_template="{% if %}")


def test_sandbox_blocks_attribute_escapes():
    m = manifest(prompt_template="{{ instruction.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        m.render_prompt({"instruction": "x"})


def test_json_output_needs_schema_and_bare_field_names_are_required_fields():
    with pytest.raises(ValidationError, match="json_schema"):
        manifest(output={"format": "json"})
    m = manifest(input_fields=["instruction", "context"])
    assert all(f.required for f in m.input_fields)


def test_unknown_manifest_keys_are_refused():
    with pytest.raises(ValidationError):
        manifest(surprise=1)


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 4000000000 }}{{ instruction }}",
        "{{ 10 ** 100000000 }}{{ instruction }}",
        "{{ [1] * 10**9 }}{{ instruction }}",
    ],
)
def test_template_arithmetic_is_bounded(template):
    """Security review M7: the sandbox limited `range` but not `*` or `**`."""
    with pytest.raises(InputFieldError, match="template"):
        manifest(prompt_template=template).render_prompt({"instruction": "hi"})
    assert manifest(prompt_template="{{ '-' * 3 }}{{ instruction }}").render_prompt({"instruction": "x"}) == "---x"
