"""Read the Python API names a TensorRT bindings wheel defines, without importing it.

    python tools/tensorrt_api_names.py WHEEL [--out tests/data/tensorrt_api/tensorrt-11.4.0.106.json]

The compiled module (``tensorrt_bindings/tensorrt.so``) cannot be imported without libnvinfer and a
GPU driver, and the wheels ship no ``.pyi`` stubs. Its names can still be read, because pybind11
keeps every Python name as a C string and the module keeps its symbol table:

- every ``lea reg, [rip+disp32]`` in ``.text`` that points at an identifier string in ``.rodata`` is
  a name being loaded (the address points at the name itself even where the linker stored it as the
  tail of a longer string, e.g. ``INT8`` inside ``UINT8``);
- the first pybind11 call after it (a ``class_<T>`` / ``enum_<T>`` / ``module_`` symbol, read from the
  symbol table) gives the name its role: a constructor's (``enum_<T>::enum_``,
  ``class_<T>::init_instance``, ``dealloc``...) is a class name, ``module_::def``'s a module
  function, any other a member; names folded into a pybind11 clone count where it is called;
- membership comes from order, not from the call's type: the registration functions
  (``tensorrt::bindCore`` and friends) register a class's members right after its class_/enum_, and
  identical code folding merges ``class_<A>::def_property`` with ``class_<B>::def_property``.

The wheel's pure-Python ``__init__.py`` adds module functions (``nptype``), ``__version__`` and a few
members (``Logger.WARNING`` is copied there from ``ILogger.Severity``); those are read with ``ast``.

How close it is: against a parse of the ``.def``/``.value`` chains of pyCore.cpp, pyGraph.cpp,
pyOnnx.cpp, pyPlugin.cpp and pyFoundationalTypes.cpp at the matching NVIDIA/TensorRT tags it finds
927 of 934 members for 10.3.0, 1088 of 1110 for 10.16 and 1054 of 1073 for 11.0. What it misses are
names the compiler loaded once and reused for a second class (``set_input`` of several layers);
what it adds are mostly ``py::arg`` keyword names of the class's own methods (``Builder.network``).
So neither direction is certain: check a name by hand before relying on its absence, and do not
rely on a keyword-like member name (``config``, ``index``) as proof of an attribute.

x86-64 ELF wheels with a symbol table only (the manylinux x86_64 ones). Nothing is downloaded or
built; only the named wheel is read. The stored data keeps the members of the classes the TensorRT
backend uses (``engines.tensorrt.api_contract.used_classes``) unless ``--all-classes`` is given; the
list of every module-level name is always stored.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import hashlib
import io
import json
import re
import struct
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

COMPILED = re.compile(r"^tensorrt[a-z_]*/tensorrt[^/]*\.so$")
INIT = re.compile(r"^tensorrt[a-z_]*/__init__\.py$")
IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")
PYBIND_INTERNAL = re.compile(r"_?pybind11_")  # pybind11's own attributes, not TensorRT's API
# REX.W (or REX.WR) lea with a RIP-relative operand: 48/4c 8d, ModRM mod=00 rm=101.
LEA_RIP = re.compile(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", re.S)
CALL_OR_JMP = re.compile(rb"[\xe8\xe9]", re.S)
# pybind11 methods whose name argument is the Python name of the class itself.
CONSTRUCTORS = frozenset({
    "C1", "C2", "C4", "init_instance", "init_holder", "dealloc", "dealloc_without_manipulating_gil",
    "dealloc_release_gil_before_calling_cpp_dtor",
})  # fmt: skip
# How far after loading a name the registering call is looked for: the arguments of a def are
# set up in a few dozen instructions; an inlined class_ constructor fills a type record first.
SEARCH_BYTES = 400


# ----------------------------------------------------------------------------- ELF


class Elf:
    """Just enough of an ELF64 little-endian shared object: sections, function symbols, C strings."""

    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise SystemExit("not an ELF64 little-endian object (only x86-64 wheels are supported)")
        if struct.unpack_from("<H", data, 0x12)[0] != 62:
            raise SystemExit("not an x86-64 object; use the manylinux x86_64 wheel of the same version")
        self.data = data
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
        raw = [struct.unpack_from("<IIQQQQII", data, shoff + i * entsize) for i in range(count)]
        names_offset = raw[names_index][4]
        self.sections = {self.cstring_at(names_offset + r[0]).decode(): r for r in raw}
        if ".symtab" not in self.sections:
            raise SystemExit("the module has no symbol table (stripped); its names cannot be attributed")

    def cstring_at(self, offset: int) -> bytes:
        return self.data[offset : self.data.index(b"\0", offset)]

    def section(self, name: str) -> tuple[int, int, int]:
        """(address, file offset, size)."""
        _, _, _, addr, offset, size, _, _ = self.sections[name]
        return addr, offset, size

    def functions(self) -> tuple[list[int], list[tuple[int, int, str]]]:
        """Function symbols sorted by address: (starts, [(start, end, mangled name)])."""
        _, sym_off, sym_size = self.section(".symtab")
        _, str_off, _ = self.section(".strtab")
        found = []
        for i in range(sym_size // 24):
            name, info, _, _, value, size = struct.unpack_from("<IBBHQQ", self.data, sym_off + 24 * i)
            if info & 0xF == 2 and value:  # STT_FUNC
                found.append((value, value + max(size, 1), self.cstring_at(str_off + name).decode(errors="replace")))
        found.sort()
        return [f[0] for f in found], found


# ----------------------------------------------------------------------------- mangled names


def _source_name(s: str, i: int) -> tuple[str, int]:
    match = re.match(r"\d+", s[i:])
    if not match:
        raise ValueError
    length = int(match.group())
    start = i + len(match.group())
    return s[start : start + length], start + length


def _template_args_end(s: str, i: int) -> int:
    """Index just past the `E` closing the template argument list that starts at s[i] == 'I'.

    Only as much of the Itanium grammar as skipping an argument list needs: what opens a level
    (I N J F X Z, a lambda's Ul, an external literal L_Z), what is one token (substitutions S_ S0_ St,
    template parameters T_ T0_, vector types Dv4_, builtins), what is skipped whole (literals Li0E).
    """
    openers: list[str] = []
    while i < len(s):
        c, nxt = s[i], s[i + 1 : i + 2]
        if c.isdigit():
            _, i = _source_name(s, i)
            continue
        if c == "S" and nxt.islower():
            i += 2
        elif c in "ST":
            i = s.index("_", i) + 1
        elif c == "D" and nxt == "v":
            i = s.index("_", i) + 1
        elif c == "D":
            i += 2
        elif c == "L" and nxt == "_":
            openers.append("L")
            i += 3  # L_Z <encoding> E
        elif c == "L":
            i = s.index("E", i) + 1
        elif c == "U" and nxt == "l":
            openers.append("U")
            i += 2
        elif c in "INJFXZ":
            openers.append(c)
            i += 1
        elif c == "E":
            closed = openers.pop()
            i += 1
            if not openers:
                return i
            if closed == "U":  # a lambda's signature ends with E, then its discriminator and '_'
                i = s.index("_", i) + 1
        else:
            i += 1
    raise ValueError


def pybind_owner(mangled: str) -> tuple[str, str, str] | None:
    """('class_' | 'enum_' | 'module_', C++ type or '', method) of a pybind11 symbol, else None.

    ``_ZN8pybind116class_IN8nvinfer18IBuilderEJEE3defI...`` -> ('class_', 'nvinfer1::IBuilder', 'def').
    """
    name = mangled.split(".")[0]
    match = re.match(r"_ZZ?NK?8pybind11(6class_|5enum_|7module_)", name)
    if not match:
        return None
    kind = match.group(1).lstrip("0123456789")
    i = match.end()
    try:
        cxx_type = ""
        if kind != "module_":
            if name[i] != "I":
                return None
            cxx_type = _first_type(name, i + 1)
            i = _template_args_end(name, i)
        if name[i : i + 1] == "C":
            return kind, cxx_type, name[i : i + 2]
        method, _ = _source_name(name, i)
    except (ValueError, IndexError):
        return None
    return kind, cxx_type, method


def _first_type(s: str, i: int) -> str:
    """The first template argument when it is a (nested) class name; raises ValueError otherwise."""
    if s[i] == "N":
        parts, i = [], i + 1
        while s[i] != "E":
            if s[i] == "I":  # a template's arguments: not a plain class
                raise ValueError
            part, i = _source_name(s, i)
            parts.append(part)
        return "::".join(parts)
    if s[i].isdigit():
        return _source_name(s, i)[0]
    if s[i] == "Z":  # a class local to a function: Z <function> E <name>
        end = _template_args_end(s, i)
        return "(local)::" + _source_name(s, end)[0]
    raise ValueError


# ----------------------------------------------------------------------------- the compiled module


def compiled_names(so: bytes) -> tuple[dict[str, set[str]], set[str]]:
    """(members per Python class name, module functions) of a pybind11 module.

    Registration functions (``tensorrt::bindCore`` and friends) are read in address order, which is
    their source order: a class name opens a class, and every name after it belongs to it until the
    next class name. Names folded into a pybind11 clone (a ``class_<T>::def`` specialised for one
    name) count where the clone is called. Which class a call target names is used for the role of
    a name (class, member, module function), never for membership: identical code folding makes
    ``class_<ICudaEngine>::def_property_readonly`` and ``class_<IErrorRecorder>::...`` one function
    under one of the two names.
    """
    elf = Elf(so)
    text_addr, text_off, text_size = elf.section(".text")
    ro_addr, ro_off, ro_size = elf.section(".rodata")
    starts, functions = elf.functions()
    text = so[text_off : text_off + text_size]

    def function_at(pos: int):
        addr = text_addr + pos
        k = bisect.bisect_right(starts, addr) - 1
        return functions[k] if k >= 0 and functions[k][0] <= addr < functions[k][1] else None

    def pybind_at(addr: int):
        k = bisect.bisect_left(starts, addr)
        return pybind_owner(functions[k][2]) if k < len(starts) and starts[k] == addr else None

    strings: list[tuple[int, str]] = []  # (text position, identifier) of each lea of one
    calls: list[tuple[int, int, tuple[str, str, str]]] = []  # (text position, target, owner) into pybind11
    for match in LEA_RIP.finditer(text):
        pos = match.start()
        target = text_addr + pos + 7 + struct.unpack_from("<i", text, pos + 3)[0]
        if ro_addr <= target < ro_addr + ro_size:
            value = elf.cstring_at(ro_off + target - ro_addr)
            if IDENTIFIER.match(value):
                strings.append((pos, value.decode()))
        elif owner := pybind_at(target):
            calls.append((pos, target, owner))
    for match in CALL_OR_JMP.finditer(text):
        pos = match.start()
        if pos + 5 <= len(text):
            target = text_addr + pos + 5 + struct.unpack_from("<i", text, pos + 1)[0]
            if owner := pybind_at(target):
                calls.append((pos, target, owner))
    calls.sort()

    in_clones: dict[int, list[str]] = {}  # clone start -> the names folded into it
    direct: list[tuple[int, str, int]] = []  # (position, name, registration function start)
    for pos, value in strings:
        holder = function_at(pos)
        if holder is None:
            continue
        if pybind_owner(holder[2]):
            in_clones.setdefault(holder[0], []).append(value)
        else:
            direct.append((pos, value, holder[0]))

    events: list[tuple[int, int, str, str]] = []  # (position, registration function, role, name)
    for pos, target, owner in calls:
        holder = function_at(pos)
        if holder and not pybind_owner(holder[2]):
            events += [(pos, holder[0], _role(owner, value), value) for value in in_clones.get(target, ())]
    call_positions = [c[0] for c in calls]
    for pos, value, function in direct:
        k = bisect.bisect_right(call_positions, pos)
        near = k < len(calls) and calls[k][0] - pos <= SEARCH_BYTES
        events.append((pos, function, _role(calls[k][2], value) if near else "member", value))
    events.sort()

    classes: dict[str, set[str]] = {}
    module: set[str] = set()
    current: dict[int, str] = {}  # registration function -> the class it is registering at this point
    for _, function, role, value in events:
        if role == "class":
            current[function] = value
            classes.setdefault(value, set())
        elif role == "module":
            module.add(value)
        elif role == "member" and function in current and not PYBIND_INTERNAL.match(value):
            classes[current[function]].add(value)
    return classes, module


def _role(owner: tuple[str, str, str], value: str) -> str:
    """'class' (the name a class or enum is registered under), 'module' (a module function's name),
    'member', or 'argument' (a lower-case name handed to a class constructor)."""
    kind, _, method = owner
    if kind == "module_":
        return "module" if method == "def" else "member"
    if method in CONSTRUCTORS or method == kind:
        return "class" if value[:1].isupper() else "argument"
    return "member"


# ----------------------------------------------------------------------------- the Python half


def init_names(source: str, classes: dict[str, set[str]]) -> tuple[set[str], str]:
    """Module names ``__init__.py`` defines (functions, assignments) and its ``__version__``; adds the
    members it assigns (``X.attr = ...``) and copies (``for a, v in A.B.__members__.items(): setattr(C, a, v)``)."""
    tree = ast.parse(source)
    names: set[str] = set()
    version = ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node in tree.body:
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and node in tree.body:
                    names.add(target.id)
                    if target.id == "__version__" and isinstance(node.value, ast.Constant):
                        version = str(node.value.value)
                elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    classes.setdefault(target.value.id, set()).add(target.attr)
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Call):
            source_enum = _members_items_of(node.iter)
            for inner in ast.walk(node):
                if (
                    source_enum
                    and isinstance(inner, ast.Call)
                    and isinstance(inner.func, ast.Name)
                    and inner.func.id == "setattr"
                    and isinstance(inner.args[0], ast.Name)
                ):
                    copied = classes.get(source_enum) or classes.get(source_enum.rpartition(".")[2], set())
                    classes.setdefault(inner.args[0].id, set()).update(copied)
    return names, version


def _members_items_of(call: ast.Call) -> str:
    """'ILogger.Severity' for ``ILogger.Severity.__members__.items()``, else ''."""
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr == "items" and isinstance(func.value, ast.Attribute)):
        return ""
    if func.value.attr != "__members__":
        return ""
    return ast.unparse(func.value.value)


# ----------------------------------------------------------------------------- the wheel


def read_wheel(path: Path, keep: Iterable[str] | None = None) -> dict:
    """The API names of one bindings wheel, as stored in tests/data/tensorrt_api/."""
    raw = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(raw)) as wheel:
        files = wheel.namelist()
        so_name = next((f for f in files if COMPILED.match(f)), None)
        init_name = next((f for f in files if INIT.match(f)), None)
        if so_name is None or init_name is None:
            raise SystemExit(f"{path.name}: no tensorrt*/tensorrt*.so and __init__.py; is it a tensorrt bindings wheel?")
        classes, module = compiled_names(wheel.read(so_name))
        init_source = wheel.read(init_name).decode()
    extra_module, version = init_names(init_source, classes)
    module |= extra_module | set(classes)
    stored = classes if keep is None else {name: m for name, m in classes.items() if name in set(keep)}
    return {
        "tensorrt_version": version,
        "wheel": path.name,
        "wheel_sha256": hashlib.sha256(raw).hexdigest(),
        "read_by": "tools/tensorrt_api_names.py",
        "module": sorted(module),
        "classes": {name: sorted(m) for name, m in sorted(stored.items())},
    }


def compact_json(names: dict) -> str:
    """The stored form: one line per field and per class, so a new release's diff reads by class."""
    lines = ["{"]
    fields = [(key, value) for key, value in sorted(names.items()) if key != "classes"]
    for key, value in fields:
        lines.append(f" {json.dumps(key)}: {json.dumps(value)},")
    lines.append(' "classes": {')
    classes = sorted(names["classes"].items())
    for i, (name, members) in enumerate(classes):
        lines.append(f"  {json.dumps(name)}: {json.dumps(members)}{',' if i < len(classes) - 1 else ''}")
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="a tensorrt-cu12-bindings / tensorrt-cu13-bindings x86_64 wheel")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: print)")
    parser.add_argument("--all-classes", action="store_true", help="store the members of every class")
    args = parser.parse_args(argv)
    keep = None
    if not args.all_classes:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from engines.tensorrt.api_contract import used_classes

        keep = used_classes()
    text = compact_json(read_wheel(args.wheel, keep))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
