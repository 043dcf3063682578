"""docs/ops.md's reference tables, generated from the op definitions in code (``opset.OPERATORS``).

Every ``## <op>`` section of docs/ops.md holds one generated block, between the markers below, with
the op's signature, inputs, outputs, type constraints and attributes; the prose around the blocks
is written by hand. ``python -m onnx_perforate.op_docs docs/ops.md`` rewrites the blocks (``--check``:
exit 1 when they are stale, changing nothing); a test checks that docs/ops.md is current.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .ops import FLOAT32_MAX
from .opset import OPERATORS, Attribute, OperatorDefinition, Parameter

BEGIN = "<!-- generated from onnx_perforate/opset.py by `python -m onnx_perforate.op_docs`: do not edit -->"
END = "<!-- end of generated -->"
_BLOCK = re.compile(r"^## (?P<op>\w+)\n(?P<before>.*?)" + re.escape(BEGIN) + r"\n.*?" + re.escape(END),
                    re.DOTALL | re.MULTILINE)


def _type(p: Parameter, op: OperatorDefinition) -> str:
    allowed = {name: types for name, types, _ in op.type_constraints}
    kind = p.type if p.type not in allowed else f"{p.type}: " + " or ".join(t[7:-1] for t in allowed[p.type])
    return kind.replace("tensor(", "").replace(")", "") + (", optional" if p.optional else "")


def _default(a: Attribute) -> str:
    if a.default is None:
        return "required" if a.required else "from the inputs"
    if isinstance(a.default, float) and abs(a.default) == FLOAT32_MAX:
        return ("-" if a.default < 0 else "") + "FLT_MAX"
    if isinstance(a.default, str):
        return f'"{a.default}"'
    return str(a.default)


def render(op: OperatorDefinition) -> str:
    """The generated block of one op (markers included)."""
    optional = {p.name for p in op.inputs if p.optional}
    arguments = ", ".join(p.name + ("?" if p.name in optional else "") for p in op.inputs)
    lines = [BEGIN, "", f"`{op.name}({arguments}) -> {', '.join(p.name for p in op.outputs)}` "
             f"(domain version {op.since_version})", "", op.doc, ""]
    for title, parameters in (("input", op.inputs), ("output", op.outputs)):
        lines += [f"| {title} | type | meaning |", "|---|---|---|"]
        lines += [f"| {p.name} | {_type(p, op)} | {p.doc} |" for p in parameters]
        lines.append("")
    if op.attributes:
        lines += ["| attribute | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| {a.name} | {a.type} | {_default(a)} | {a.doc} |" for a in op.attributes]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def update(text: str) -> str:
    """``text`` (docs/ops.md) with every op's generated block rewritten; an op of the code without a
    section is an error (the page must document every op)."""
    operators = {op.name: op for op in OPERATORS}
    documented = set()

    def replace(match):
        op = operators.get(match["op"])
        if op is None:
            raise ValueError(f"docs/ops.md has a generated block for {match['op']}, which opset.py does not define")
        documented.add(op.name)
        return f"## {op.name}\n{match['before']}{render(op)}"

    result = _BLOCK.sub(replace, text)
    missing = sorted(set(operators) - documented)
    if missing:
        raise ValueError(f"docs/ops.md has no generated block for {missing}: add `## <op>` and the two markers")
    return result


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"] or ["docs/ops.md"]
    stale = []
    for path in map(Path, paths):
        text = path.read_text()
        new = update(text)
        if new != text:
            stale.append(str(path))
            if not check:
                path.write_text(new)
    if stale:
        print(("stale: " if check else "rewrote: ") + ", ".join(stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
