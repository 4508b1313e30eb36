"""BTF / BTF.ext parsing, checked against bpftool's raw dump of the same data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.errors import BtfError, HybridError
from hybrid.user import btf as B
from tests.conftest import KERNEL_BTF
from tests.user.bpftool_util import btf_raw, raw_int, raw_member_offset

needs_kernel_btf = pytest.mark.skipif(not KERNEL_BTF.exists(), reason="no /sys/kernel/btf/vmlinux")

_LINKAGE = {"static": 0, "global": 1, "extern": 2}
_INT_ENC = {"(none)": 0, "SIGNED": 1, "CHAR": 2, "BOOL": 4}


def assert_same_as_bpftool(btf: B.Btf, raw) -> None:
    """Every type of ``btf`` equals what bpftool printed for it (kind, name and every field)."""
    assert len(btf) - 1 == max(raw), "type count differs from bpftool"
    for tid, r in raw.items():
        t = btf[tid]
        ctx = (tid, r.kind, r.name)
        assert t.kind.name == r.kind, ctx
        assert t.name == r.name, ctx
        a = r.attrs
        if isinstance(t, B.Int):
            assert (t.size, t.bit_offset, t.bits, t.encoding) == (
                int(a["size"]), int(a["bits_offset"]), int(a["nr_bits"]), _INT_ENC[a["encoding"]]), ctx
        elif isinstance(t, (B.Ptr, B.RefType)):
            assert t.type == int(a["type_id"]), ctx
        elif isinstance(t, B.Array):
            assert (t.type, t.index_type, t.nelems) == (
                int(a["type_id"]), int(a["index_type_id"]), int(a["nr_elems"])), ctx
        elif isinstance(t, B.Composite):
            assert t.size == int(a["size"]) and len(t.members) == int(a["vlen"]), ctx
            for m, (name, ma) in zip(t.members, r.items):
                assert (m.name, m.type, m.bit_offset, m.bitfield_size) == (
                    name, int(ma["type_id"]), int(ma["bits_offset"]), int(ma.get("bitfield_size", 0))), ctx
        elif isinstance(t, B.AnyEnum):
            assert t.size == int(a["size"]) and len(t.values) == int(a["vlen"]), ctx
            assert t.signed == (a["encoding"] == "SIGNED"), ctx
            for v, (name, va) in zip(t.values, r.items):
                assert (v.name, v.value) == (name, raw_int(va["val"])), ctx
        elif isinstance(t, B.Fwd):
            assert t.is_union == (a["fwd_kind"] == "union"), ctx
        elif isinstance(t, (B.Func, B.Var)):
            assert t.type == int(a["type_id"]) and t.linkage == _LINKAGE[a["linkage"]], ctx
        elif isinstance(t, B.FuncProto):
            assert t.ret == int(a["ret_type_id"]) and len(t.params) == int(a["vlen"]), ctx
            assert [(p.name, p.type) for p in t.params] == [(n, int(pa["type_id"])) for n, pa in r.items], ctx
        elif isinstance(t, B.Datasec):
            assert t.size == int(a["size"]), ctx
            assert [(v.type, v.offset, v.size) for v in t.vars] == [
                (int(va["type_id"]), int(va["offset"]), int(va["size"])) for _, va in r.items], ctx
        elif isinstance(t, B.Float):
            assert t.size == int(a["size"]), ctx
        elif isinstance(t, B.DeclTag):
            assert (t.type, t.component_idx) == (int(a["type_id"]), int(a["component_idx"])), ctx


# --- the kernel's BTF -------------------------------------------------------------------


@needs_kernel_btf
def test_kernel_btf_equals_bpftool_dump():
    k = B.kernel_btf()
    assert k is not None and k is B.kernel_btf()  # parsed once per process
    raw = btf_raw(str(KERNEL_BTF))
    kinds = {r.kind for r in raw.values()}
    assert_same_as_bpftool(k, raw)
    assert len(kinds) >= 15  # a modern kernel has nearly every kind


@needs_kernel_btf
@pytest.mark.parametrize("struct,path", [
    ("task_struct", "pid"), ("task_struct", "tgid"), ("task_struct", "real_parent"), ("task_struct", "comm"),
    ("pt_regs", "di"), ("pt_regs", "si"), ("pt_regs", "ax"), ("pt_regs", "sp"), ("pt_regs", "ip"),
    ("sk_buff", "len"), ("file", "f_inode"), ("task_struct", "mm"),
])
def test_kernel_member_offsets_match_bpftool(struct, path):
    k = B.kernel_btf()
    assert k.offsetof(struct, path) == raw_member_offset(btf_raw(str(KERNEL_BTF)), struct, path)


@needs_kernel_btf
def test_kernel_lookup_helpers():
    k = B.kernel_btf()
    ts = k.find("task_struct", B.Kind.STRUCT)
    assert isinstance(ts, B.Struct) and k.size_of(ts.id) == ts.size
    assert k.describe(ts.id) == "struct task_struct"
    m, bits = k.member(ts.id, "pid")
    assert m.name == "pid" and bits == m.bit_offset
    assert k.size_of(m.type) == 4 and isinstance(k.resolve(m.type), B.Int)
    assert k.ids_by_essential_name("task_struct___my_flavor") == k.ids_by_name("task_struct")
    with pytest.raises(BtfError, match="no member 'no_such_member'"):
        k.member(ts.id, "no_such_member")
    assert B.kernel_btf("/nonexistent/vmlinux") is None


def test_essential_names():
    assert B.essential_name("task_struct___old") == "task_struct"
    assert B.essential_name("task_struct___") == "task_struct___"
    assert B.essential_name("a___b___c") == "a___b"
    assert B.essential_name("____fmt") == "____fmt"
    assert B.essential_name("x") == "x"


# --- objects --------------------------------------------------------------------------


def _sections(path):
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        return {s.name: s.data() for s in elf.iter_sections() if s.name in (".BTF", ".BTF.ext")}


@pytest.mark.parametrize("prog", ["maps", "globals", "core", "subprogs", "sections", "kconfig"])
def test_object_btf_equals_bpftool_dump(bpf_build, prog):
    path = bpf_build.obj(prog)
    secs = _sections(path)
    btf = B.parse_btf(secs[".BTF"])
    assert_same_as_bpftool(btf, btf_raw(str(path)))


def test_all_kinds_from_clang(bpf_build):
    """A source that makes clang emit every kind it can: decl/type tags, float, restrict, fwd, ..."""
    path = bpf_build.source("kinds", r"""
        #define __tag __attribute__((btf_decl_tag("my_tag")))
        #define __user __attribute__((btf_type_tag("user")))
        struct fwd_only;
        typedef unsigned long long u64;
        enum color { RED, GREEN = 5, BLUE = -1 };
        union u { int i; float f; };
        struct all {
            volatile int v;
            const char c;
            int * restrict r;
            struct fwd_only *fwd;
            double d;
            union u un;
            enum color col;
            unsigned int bits : 3, more : 5;
            int __user *uptr;
            u64 arr[4][2];
            int flex[];
        } __tag;
        struct all g_all __tag;
        __attribute__((section("uprobe"))) int f(struct all *a __tag) { return a->bits + a->more; }
        char LICENSE[] __attribute__((section("license"))) = "GPL";
    """)
    btf = B.parse_btf(_sections(path)[".BTF"])
    raw = btf_raw(str(path))
    assert_same_as_bpftool(btf, raw)
    kinds = {t.kind for t in btf}
    for k in ("INT", "PTR", "ARRAY", "STRUCT", "UNION", "ENUM", "FWD", "TYPEDEF", "VOLATILE", "CONST",
              "RESTRICT", "FUNC", "FUNC_PROTO", "VAR", "DATASEC", "FLOAT", "DECL_TAG", "TYPE_TAG"):
        assert B.Kind[k] in kinds, k
    all_ = btf.find("all", B.Kind.STRUCT)
    for f in ("d", "un", "col", "uptr", "arr", "flex"):
        assert btf.offsetof("all", f) == raw_member_offset(raw, "all", f)
    assert btf.size_of(all_.id) == all_.size
    m, bits = btf.member(all_.id, "more")
    assert (m.bitfield_size, bits) == (5, m.bit_offset)
    arr, _ = btf.member(all_.id, "arr")
    assert btf.size_of(arr.type) == 64 and btf.align_of(arr.type) == 8
    col = btf.find("color", B.Kind.ENUM)
    assert [(v.name, v.value) for v in col.values] == [("RED", 0), ("GREEN", 5), ("BLUE", 0xFFFFFFFF)]


def test_btf_ext_records(bpf_build):
    path = bpf_build.obj("core")
    secs = _sections(path)
    btf = B.parse_btf(secs[".BTF"])
    ext = B.parse_btf_ext(secs[".BTF.ext"], btf)
    assert set(ext.func_info) == {"uprobe//usr/lib/x86_64-linux-gnu/libc.so.6:malloc", "kprobe/do_nanosleep"}
    fi = ext.func_info["kprobe/do_nanosleep"]
    assert [(r.insn, btf[r.type_id].name) for r in fi] == [(0, "read_task")]
    li = ext.line_info["kprobe/do_nanosleep"]
    assert li[0].insn == 0 and li[0].file_name.endswith("core.bpf.c") and li[0].line_num > 0
    assert any("BPF_CORE_READ(t, pid)" in r.line for r in li)
    relos = ext.core_relos["kprobe/do_nanosleep"]
    kinds = {r.kind_name for r in relos}
    assert {"field_byte_offset", "field_exists", "field_byte_size", "type_exists", "type_size", "enumval_exists",
            "enumval_value", "type_id_target", "field_lshift_u64", "field_rshift_u64", "field_signed"} <= kinds
    pid = [r for r in relos if btf[r.type_id].name == "task_struct" and r.kind == B.CoreReloKind.FIELD_BYTE_OFFSET]
    assert pid and all(r.insn_off % 8 == 0 for r in relos)


# --- synthetic and malformed BTF ---------------------------------------------------------


class Builder:
    """Writes raw BTF by hand, for kinds clang 14 does not emit and for malformed input."""

    def __init__(self):
        self.types = b""
        self.strings = b"\0"

    def s(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def t(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: int = 0) -> None:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name) if name else 0, info, size_or_type) + extra

    def build(self, magic=0xEB9F, version=1, hdr_len=24, type_off=0, str_off=None) -> bytes:
        str_off = len(self.types) if str_off is None else str_off
        hdr = struct.pack("<HBBIIIII", magic, version, 0, hdr_len, type_off, len(self.types), str_off,
                          len(self.strings))
        return hdr + bytes(hdr_len - 24) + self.types + self.strings


def _int(b: Builder, name="int", size=4, signed=True):
    b.t(name, 1, 0, size, struct.pack("<I", ((1 if signed else 0) << 24) | size * 8))


def test_enum64_and_float_by_hand():
    b = Builder()
    vals = struct.pack("<III", b.s("BIG"), 0xFFFFFFFF, 0x7FFFFFFF) + struct.pack("<III", b.s("NEG"), 0xFFFFFFFE,
                                                                                  0xFFFFFFFF)
    b.t("e64", 19, 2, 8, vals, kflag=1)
    b.t("float", 16, 0, 4)
    btf = B.parse_btf(b.build())
    e = btf[1]
    assert isinstance(e, B.Enum64) and e.signed
    assert [(v.name, v.value) for v in e.values] == [("BIG", 0x7FFFFFFFFFFFFFFF), ("NEG", -2)]
    assert btf.size_of(1) == 8 and btf.size_of(2) == 4 and btf.align_of(2) == 4


def test_resolve_is_bounded_on_typedef_loop():
    b = Builder()
    b.t("loop_a", 8, 0, 2)  # typedef loop_a -> 2
    b.t("loop_b", 8, 0, 1)  # typedef loop_b -> 1
    btf = B.parse_btf(b.build())
    with pytest.raises(BtfError, match="type id"):
        btf.resolve(1)
    with pytest.raises(BtfError):
        btf.size_of(2)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:10], "truncated header"),
    (lambda d: b"\xeb\x9f" + d[2:], "big-endian"),
    (lambda d: b"\x00\x00" + d[2:], "bad magic"),
    (lambda d: d[:2] + b"\x02" + d[3:], "unsupported BTF version"),
    (lambda d: d[:4] + struct.pack("<I", 12) + d[8:], "bad header length"),
    (lambda d: d[:16] + struct.pack("<I", 0x7FFFFFF0) + d[20:], "string section"),
    (lambda d: d[:-1] + b"x", "not NUL-terminated"),
])
def test_malformed_headers(mutate, message):
    b = Builder()
    _int(b)
    with pytest.raises(BtfError, match=message):
        B.parse_btf(mutate(b.build()))


def test_malformed_types_name_the_type_id_and_offset():
    b = Builder()
    _int(b)
    b.t("bad", 25, 0, 0)  # unknown kind 25
    with pytest.raises(BtfError, match=r"type id 2, offset 0x28: unknown kind 25"):
        B.parse_btf(b.build())
    b = Builder()
    _int(b)
    b.t("s", 4, 100, 8)  # a struct claiming 100 members, with none present
    with pytest.raises(BtfError, match=r"type id 2.*STRUCT record of 1212 bytes extends past"):
        B.parse_btf(b.build())
    b = Builder()
    b.t("p", 2, 0, 7)  # pointer to type id 7, which does not exist
    with pytest.raises(BtfError, match=r"type id 1.*refers to type id 7"):
        B.parse_btf(b.build())
    b = Builder()
    b.types += struct.pack("<III", 9999, 1 << 24, 4) + struct.pack("<I", 32)  # name offset outside strings
    with pytest.raises(BtfError, match=r"type id 1.*name offset 9999"):
        B.parse_btf(b.build())


def test_malformed_btf_ext():
    b = Builder()
    _int(b)
    sec = b.s("kprobe/x")
    acc = b.s("0:1")
    btf = B.parse_btf(b.build())
    core = struct.pack("<I", 16) + struct.pack("<II", sec, 1) + struct.pack("<IIII", 8, 1, acc, 0)
    hdr = struct.pack("<HBBIIIIIII", 0xEB9F, 1, 0, 32, 0, 0, 0, 0, 0, len(core))
    ext = B.parse_btf_ext(hdr + core, btf)
    assert ext.core_relos["kprobe/x"][0] == B.CoreRelo(8, 1, "0:1", 0)
    bad = hdr + struct.pack("<I", 16) + struct.pack("<II", sec, 1000000) + bytes(16)
    with pytest.raises(BtfError, match="1000000 records of 16 bytes extend past"):
        B.parse_btf_ext(bad, btf)
    hdr3 = struct.pack("<HBBIIIIIII", 0xEB9F, 1, 0, 32, 0, 0, 0, 0, 0, 16)
    with pytest.raises(BtfError, match="record size 3"):
        B.parse_btf_ext(hdr3 + struct.pack("<I", 3) + bytes(12), btf)
    with pytest.raises(BtfError, match="bad magic"):
        B.parse_btf_ext(b"\0" * 32, btf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 3))
def test_random_btf_only_raises_btf_error(body, ntypes):
    b = Builder()
    for i in range(ntypes):
        _int(b, "i%d" % i)
    data = b.build()
    data = data[:24] + body + data[24 + len(body):] if body else data
    try:
        btf = B.parse_btf(data)
        for t in btf:
            btf.describe(t.id)
            try:
                btf.size_of(t.id)
            except BtfError:
                pass
    except BtfError:
        pass
    except HybridError as e:  # pragma: no cover - any other kind is a bug
        pytest.fail("unexpected %s: %s" % (type(e).__name__, e))
