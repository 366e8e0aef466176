#!/usr/bin/env python3
"""The architecture figures of issue 14, read from the sources (no build needed).

    python3 scripts/arch-figures.py          # the figures, then each offending import / file / fn
    python3 scripts/arch-figures.py --brief  # the four figures only

- Imports against the flow: a file of room A that uses a module of room B (one count per
  file and module, however many paths name it), where B stands on a higher floor than A (FLOORS below: the ground floor depends on nothing of ours,
  each floor only on the floors beneath it; rooms on one floor may use each other).
- Import circles: files that reach each other through `crate::…` paths (strongly connected
  components of the file graph, `mod` declarations and `super::` paths aside).
- Files over 500 lines, `#[cfg(test)] mod tests { … }` blocks not counted.
- Functions over 80 lines, from the `fn` line to its closing brace (tests not counted).

A path is resolved to the longest module file it names: `crate::claims::model::Claim` in
src/api/devices.rs is an edge to src/claims/model.rs. Rooms are top-level modules, except
where ROOMS names a deeper one (a module that lives inside another's folder but is its own
room).
"""
import os
import re
import sys
from collections import defaultdict

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# The intended floors, lowest first. A room may import rooms on its own floor or below.
FLOORS = [
    # Ground: the nouns, configuration, the MQTT protocol, small utilities.
    {"device", "model", "config", "pem", "mqtt", "metrics", "ratelimit", "qr"},
    # Persistence and fleet coordination.
    {"store"},
    # Where the device path and the control plane meet; the pure routing decision.
    {"waiting", "route"},
    # The control plane's core: claims, then provisioning driven by them.
    {"claims"},
    {"provision"},
    # The device path (reads the claims map, reports activity through `waiting`).
    {"edge", "session", "bridge", "presence"},
    # The control plane's outside.
    {"api"},
    # Assembly, and the tools the binary offers (the dev PKI).
    {"server", "pki", "main", "lib"},
]

# Modules that are rooms of their own inside another room's folder (none: a room is a
# top-level module, and its folder holds its parts).
ROOMS = {}


def floor_of(room):
    for i, f in enumerate(FLOORS):
        if room in f:
            return i
    return None


def module_files():
    """Module path (`claims/model`) → file."""
    mods = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)[:-3]
            if "/tests/" in "/" + rel + "/" and not rel.startswith("mqtt/codec/tests"):
                continue
            if rel in ("lib", "main"):
                mods[rel] = path
            elif rel.endswith("/mod"):
                mods[rel[:-4]] = path
            else:
                mods[rel] = path
    return mods


def room_of(mod):
    for prefix, room in ROOMS.items():
        if mod == prefix or mod.startswith(prefix + "/"):
            return room
    return mod.split("/")[0]


def strip_tests(text):
    """The text without `#[cfg(test)] mod … { … }` blocks (their lines blanked)."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(
            r"\s*(pub(\(\w+\))? )?mod \w+\s*\{", lines[i + 1]
        ):
            depth, j = 0, i + 1
            while j < len(lines):
                depth += lines[j].count("{") - lines[j].count("}")
                if depth <= 0 and j > i + 1 or (depth == 0 and "{" in lines[j] and "}" in lines[j]):
                    break
                j += 1
            out.extend([""] * (j - i + 1))
            i = j + 1
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def code_only(text):
    """Comments, string and char literals blanked (line breaks kept), so that paths in docs
    do not count and braces in literals do not end a function. One pass, left to right."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^'\\\n])'", text[i:]):
            m = re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^'\\\n])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def crate_paths(text, mod):
    """Every `crate::a::b::…` (or `super::…`) path as a path from the crate root, including
    those inside `use crate::{a::x, b::y}` groups."""
    paths = []
    for m in re.finditer(r"\b(crate|super(?:::super)*)::((?:\w+::)*\w+|\{)", text):
        if m.group(1) == "crate":
            base = ""
        else:
            up = m.group(1).count("super")
            parts = mod.split("/")
            if up > len(parts) - (0 if mod in ("lib", "main") else 0):
                continue
            base = "::".join(parts[: len(parts) - up])
        prefix = base + "::" if base else ""
        start = len(paths)
        paths.extend(prefix + p for p in _one_path(m, text))
    return paths


def _one_path(m, text):
    paths = []
    if True:
        if m.group(2) == "{":
            depth, j = 1, m.end()
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            group = text[m.end() : j - 1]
            for part in re.split(r",(?![^{]*\})", group):
                part = re.sub(r"\s+", "", part)
                name = re.match(r"(\w+(?:::\w+)*)", part)
                if name:
                    paths.append(name.group(1))
        else:
            paths.append(m.group(2))
    return paths


def resolve(path, mods):
    parts = path.split("::")
    for n in range(len(parts), 0, -1):
        cand = "/".join(parts[:n])
        if cand in mods:
            return cand
    return None


def functions_over(text, limit):
    lines = text.split("\n")
    found = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*(pub(\([\w:]+\))? )?(const )?(async )?(unsafe )?fn (\w+)", line)
        if not m:
            continue
        depth, opened, j = 0, False, i
        while j < len(lines):
            depth += lines[j].count("{") - lines[j].count("}")
            if "{" in lines[j]:
                opened = True
            if opened and depth <= 0:
                break
            if not opened and lines[j].rstrip().endswith(";"):
                break
            j += 1
        if opened and j - i + 1 > limit:
            found.append((m.group(6), i + 1, j - i + 1))
    return found


def main():
    brief = "--brief" in sys.argv
    mods = module_files()
    edges = defaultdict(set)
    against = []
    long_files, long_fns = [], []
    for mod, path in sorted(mods.items()):
        text = open(path, encoding="utf-8").read()
        body = strip_tests(text)
        blanked = sum(1 for a, b in zip(text.split("\n"), body.split("\n")) if a != b)
        length = len(text.split("\n")) - blanked
        if length > 500:
            long_files.append((os.path.relpath(path, SRC), length))
        for name, line, size in functions_over(code_only(body), 80):
            long_fns.append((os.path.relpath(path, SRC), name, line, size))
        code = code_only(body)
        here = room_of(mod)
        for p in crate_paths(code, mod):
            target = resolve(p, mods)
            if target is None or target == mod:
                continue
            edges[mod].add(target)
            there = room_of(target)
            fa, fb = floor_of(here), floor_of(there)
            if here != there and fa is not None and fb is not None and fb > fa:
                against.append((os.path.relpath(path, SRC), target, here, there))
    against = sorted(set(against))
    circles = [c for c in tarjan(mods.keys(), edges) if len(c) > 1]
    print(f"imports against the flow: {len(against)}")
    print(f"import circles: {len(circles)}")
    print(f"files over 500 lines: {len(long_files)}")
    print(f"functions over 80 lines: {len(long_fns)}")
    unplaced = sorted({room_of(m) for m in mods} - set().union(*FLOORS))
    if unplaced:
        print(f"rooms on no floor: {', '.join(unplaced)}")
    if brief:
        return
    print("\n# against the flow (file → the module it uses, room → higher room)")
    for f, t, a, b in against:
        print(f"{f} → {t}.rs  ({a} → {b})")
    print("\n# circles")
    for c in circles:
        print(" ↔ ".join(sorted(c)))
    print("\n# files over 500 lines (tests aside)")
    for f, n in sorted(long_files, key=lambda x: -x[1]):
        print(f"{f}: {n}")
    print("\n# functions over 80 lines")
    for f, name, line, size in sorted(long_fns, key=lambda x: -x[3]):
        print(f"{f}:{line} {name}: {size}")


def tarjan(nodes, edges):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main()
