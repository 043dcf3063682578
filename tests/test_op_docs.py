"""docs/ops.md's reference tables are generated from the op definitions in code (op_docs), and the
page in the repository is current."""

from __future__ import annotations

import dataclasses

import pytest

from onnx_perforate import op_docs, opset

from helpers import REPO

OPS_MD = REPO / "docs" / "ops.md"


def test_docs_ops_md_matches_the_definitions():
    if not OPS_MD.is_file():
        pytest.skip(f"needs {OPS_MD} (a source checkout)")
    text = OPS_MD.read_text()
    assert op_docs.update(text) == text, "docs/ops.md is stale: run `python -m onnx_perforate.op_docs docs/ops.md`"


def test_every_input_output_and_attribute_is_rendered():
    for op in opset.OPERATORS:
        block = op_docs.render(op)
        for item in op.inputs + op.outputs + op.attributes:
            assert f"| {item.name} | " in block and item.doc in block
    conv = op_docs.render(opset.definition("PerforatedConv"))
    assert "`PerforatedConv(X, W, B?, mask, X_index?) -> Yc`" in conv
    assert "| clip_min | float | -FLT_MAX |" in conv and '| activation | string | "" |' in conv


def test_a_changed_definition_makes_the_page_stale(monkeypatch):
    text = "\n\n".join(f"## {op.name}\n\n{op_docs.render(op)}" for op in opset.OPERATORS) + "\n"
    assert op_docs.update(text) == text
    changed = dataclasses.replace(opset.OPERATORS[0], doc="something else")
    monkeypatch.setattr(op_docs, "OPERATORS", (changed,) + opset.OPERATORS[1:])
    assert "something else" in op_docs.update(text) != text


def test_a_page_missing_an_op_is_an_error():
    first = opset.OPERATORS[0]
    with pytest.raises(ValueError, match="no generated block"):
        op_docs.update(f"## {first.name}\n\n{op_docs.render(first)}\n")


def test_check_mode_reports_without_writing(tmp_path, capsys):
    page = tmp_path / "ops.md"
    stale = "\n\n".join(f"## {op.name}\n\n{op_docs.BEGIN}\nold\n{op_docs.END}" for op in opset.OPERATORS) + "\n"
    page.write_text(stale)
    assert op_docs.main(["--check", str(page)]) == 1 and page.read_text() == stale
    assert op_docs.main([str(page)]) == 0 and page.read_text() != stale
    assert op_docs.main(["--check", str(page)]) == 0
