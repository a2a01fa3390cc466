"""How closely each torch_impl file mirrors its minivl twin: the measurement of issue 11.

    python tools/mirror_similarity.py                 # every twin pair under minivl/ and torch_impl/
    python tools/mirror_similarity.py models/llama.py models/mpt.py

For each pair of same-named top-level definitions (functions and classes, a class with all its
methods) in minivl/X.py and torch_impl/X.py: the lines of their bodies, stripped, without blank
lines, comments and docstrings, with `np.`, `torch.`, `F.`, `nn.` deleted and the package names
replaced by one word; then difflib's SequenceMatcher ratio of the two line lists. A file's number
is the mean over its pairs weighted by size (lines on both sides). Also listed: the public
top-level names and the public class members found on one side only.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = re.compile(r"\b(np|torch|F|nn)\.")
PACKAGES = re.compile(r"\b(minivl|torch_impl)\b")


def definitions(path: str) -> dict:
    """{name: ast node} of the top-level functions and classes of a file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return {node.name: node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def public_names(path: str) -> set:
    """Public top-level names: definitions, assignments and names imported from the twin (shared)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minivl.") \
                and "torch_impl" in path and node.module.replace("minivl.", "") == _module_of(path):
            names |= {alias.asname or alias.name for alias in node.names}
    return {name for name in names if not name.startswith("_")}


def class_members(node: ast.ClassDef) -> set:
    members = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            members.add(item.name)
        elif isinstance(item, ast.Assign):
            for target in item.targets:
                elts = target.elts if isinstance(target, ast.Tuple) else [target]
                members |= {t.id for t in elts if isinstance(t, ast.Name)}
    return {name for name in members if not name.startswith("_")}


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
    return rel.split("/", 1)[1][:-3].replace("/", ".")


def body_lines(node, source_lines: list) -> list:
    """The definition's code lines, stripped and masked, without docstrings, comments and blank lines."""
    skip = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and inner.body:
            first = inner.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                skip |= set(range(first.lineno, first.end_lineno + 1))
    lines = []
    for lineno in range(node.lineno, node.end_lineno + 1):
        line = source_lines[lineno - 1].strip()
        if lineno in skip or not line or line.startswith("#"):
            continue
        line = re.sub(r"\s+#.*$", "", line)
        lines.append(PACKAGES.sub("PKG", MASK.sub("", line)))
    return lines


def compare(rel: str) -> dict:
    """-> {similarity, pairs [(name, ratio, size)], numpy_only, torch_only} for minivl/rel vs torch_impl/rel."""
    paths = {pkg: os.path.join(ROOT, pkg, rel) for pkg in ("minivl", "torch_impl")}
    sources = {pkg: open(path).read().splitlines() for pkg, path in paths.items()}
    defs = {pkg: definitions(path) for pkg, path in paths.items()}
    pairs = []
    for name in sorted(set(defs["minivl"]) & set(defs["torch_impl"])):
        a = body_lines(defs["minivl"][name], sources["minivl"])
        b = body_lines(defs["torch_impl"][name], sources["torch_impl"])
        pairs.append((name, difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(), len(a) + len(b)))
    total = sum(size for _, _, size in pairs)
    similarity = sum(ratio * size for _, ratio, size in pairs) / total if total else float("nan")
    names = {pkg: public_names(path) for pkg, path in paths.items()}
    numpy_only, torch_only = sorted(names["minivl"] - names["torch_impl"]), sorted(names["torch_impl"] - names["minivl"])
    for name in sorted(set(defs["minivl"]) & set(defs["torch_impl"])):
        a, b = defs["minivl"][name], defs["torch_impl"][name]
        if isinstance(a, ast.ClassDef) and isinstance(b, ast.ClassDef):
            numpy_only += [f"{name}.{m}" for m in sorted(class_members(a) - class_members(b))]
            torch_only += [f"{name}.{m}" for m in sorted(class_members(b) - class_members(a))]
    return {"similarity": similarity, "pairs": pairs, "numpy_only": numpy_only, "torch_only": torch_only}


def twin_files() -> list:
    out = []
    for folder, _, files in os.walk(os.path.join(ROOT, "torch_impl")):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "torch_impl"))
            if name.endswith(".py") and name != "__init__.py" and os.path.isfile(os.path.join(ROOT, "minivl", rel)):
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="paths relative to the package roots (default: every twin)")
    parser.add_argument("--pairs", action="store_true", help="also print every definition pair's ratio")
    args = parser.parse_args(argv)
    one_sided = 0
    for rel in args.files or twin_files():
        result = compare(rel)
        one_sided += len(result["numpy_only"]) + len(result["torch_only"])
        print(f"{rel:28} {result['similarity']:.2f}  ({len(result['pairs'])} pairs)"
              + (f"  numpy-only {result['numpy_only']}" if result["numpy_only"] else "")
              + (f"  torch-only {result['torch_only']}" if result["torch_only"] else ""))
        if args.pairs:
            for name, ratio, size in result["pairs"]:
                print(f"    {name:32} {ratio:.2f}  {size} lines")
    print(f"one-sided public names: {one_sided}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
