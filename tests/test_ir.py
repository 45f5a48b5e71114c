"""The IR: printer text, verifier invariants, networkx view, constant keys, `with_nodes`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import F23, F24, WKEY, W, small_graph

from mtcompile.errors import VerifyError
from mtcompile.ir.graph import (
    GET_ITEM,
    INPUT,
    TUPLE,
    ConstRef,
    Graph,
    Node,
    OtherTy,
    Ref,
    Sym,
    TenantIO,
    TensorTy,
    TupleTy,
    const_key,
    verify_problems,
)
from mtcompile.ir.ops import LIBRARY_CALL, ConvParams, LibraryCall
from mtcompile.ir.parse import ParseError, assert_graph, graph_diff, parse_graph

# --------------------------------------------------------------------------- printer


def test_printer_text(graph):
    assert str(graph) == "\n".join(
        [
            "tenant a(x=%a.x)",
            "tenant b(y=%b.y)",
            "%a.x = input() {tenant=a} : f32[2,4]",
            f"%a.mm = matmul(%a.x, @{WKEY[:8]}) {{out_dtype=float32}} {{tenant=a}} : f32[2,3]",
            "%a.r = nn.relu(%a.mm) {tenant=a} : f32[2,3]",
            "%b.y = input() {tenant=b} : f32[2,3]",
            "%b.t = tuple(%b.y, %b.y) {tenant=b} : (f32[2,3], f32[2,3])",
            "%b.g = get_item(%b.t) {0} {tenant=b} : f32[2,3]",
            "return a: (%a.r)",
            "return b: (%b.g)",
        ]
    )


def test_printer_shared_node_ty_args_nested_args_and_const_output():
    x = Node("s.x", INPUT, (), TensorTy((1,), "int64"), ("s", "u"))
    n = Node(
        "s.c",
        "relax.concat",
        ((Ref("s.x"), Ref("s.x")),),
        TensorTy((2,), "int64"),
        ("s", "u"),
        ty_args=(OtherTy("R.Tensor((2,), dtype=int64)"),),
    )
    k = const_key(np.zeros(2, np.int64))
    assert str(n) == (
        "%s.c = concat((%s.x, %s.x)) <R.Tensor((2,), dtype=int64)> {tenant=s+u} : i64[2]"
    )
    g = Graph(
        (x, n),
        {
            "s": TenantIO((("x", "s.x"),), (Ref("s.c"),)),
            "u": TenantIO((("x", "s.x"),), (ConstRef(k),)),
        },
        {k: np.zeros(2, np.int64)},
    )
    g.verify()
    assert str(g).splitlines()[-1] == f"return u: (@{k[:8]})"


def test_tensor_type_text_and_bytes():
    assert str(TensorTy((1, 64, 56, 56), "float32")) == "f32[1,64,56,56]"
    assert str(TensorTy((), "bool")) == "bool[]"
    assert str(TensorTy((3,), "float8_e4m3fn")) == "float8_e4m3fn[3]"  # unknown dtypes as is
    assert TensorTy((2, 3), "float16").nbytes == 12
    assert TensorTy((2, 3), "int64").nbytes == 48


# --------------------------------------------------------------------------- verifier


def _nodes(g: Graph, **changes: Node) -> tuple[Node, ...]:
    return tuple(changes.get(n.name.replace(".", "_"), n) for n in g.nodes)


def _broken_graphs():
    g = small_graph()
    mm, r, gi = g.node("a.mm"), g.node("a.r"), g.node("b.g")
    yield "duplicate name", replace(g, nodes=(*g.nodes, r)), ["duplicate node name %a.r"]
    swapped = list(g.nodes)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    yield (
        "use before def",
        replace(g, nodes=tuple(swapped)),
        ["%a.r reads %a.mm, which is defined later"],
    )
    yield (
        "undefined input",
        replace(g, nodes=_nodes(g, a_r=replace(r, args=(Ref("a.zz"),)))),
        ["%a.r reads %a.zz, which is defined nowhere"],
    )
    yield (
        "cross-tenant edge",
        replace(
            g,
            nodes=_nodes(
                g, b_g=replace(gi, op="relax.add", args=(Ref("b.y"), Ref("a.r")), attrs=None)
            ),
        ),
        ["%b.g (tenant b) reads %a.r of tenant a: a cross-tenant edge no pass declared"],
    )
    yield "missing constant", replace(g, constants={}), [f"%a.mm reads missing constant @{WKEY}"]
    yield (
        "get_item of a non-tuple",
        replace(g, nodes=_nodes(g, b_g=replace(gi, args=(Ref("b.y"),)))),
        ["%b.g takes item 0 of %b.y of type f32[2,3]"],
    )
    yield (
        "get_item out of range",
        replace(g, nodes=_nodes(g, b_g=replace(gi, attrs=2))),
        ["%b.g takes item 2 of %b.t of type (f32[2,3], f32[2,3])"],
    )
    yield (
        "get_item type mismatch",
        replace(g, nodes=_nodes(g, b_g=replace(gi, ty=F24))),
        ["%b.g has type f32[2,4], item 0 of %b.t is f32[2,3]"],
    )
    yield (
        "get_item arity",
        replace(g, nodes=_nodes(g, b_g=replace(gi, args=(Ref("b.t"), Ref("b.t"))))),
        ["get_item %b.g needs one tuple argument and an integer index"],
    )
    yield (
        "tuple length",
        replace(g, nodes=_nodes(g, b_t=replace(g.node("b.t"), ty=TupleTy((F23,))))),
        ["tuple %b.t has 2 items but type (f32[2,3])"],
    )
    yield (
        "output not defined",
        replace(g, tenants=dict(g.tenants, a=TenantIO(g.tenants["a"].inputs, (Ref("a.gone"),)))),
        ["tenant a: output %a.gone is not defined"],
    )
    yield (
        "output constant missing",
        replace(
            g, tenants=dict(g.tenants, a=TenantIO(g.tenants["a"].inputs, (ConstRef("feedbeef"),)))
        ),
        ["tenant a: output constant @feedbeef is missing"],
    )
    yield (
        "unknown tenant",
        replace(g, nodes=_nodes(g, a_r=replace(r, tenants=("a", "zz")))),
        ["%a.r names unknown tenant(s) ['zz']"],
    )
    yield (
        "no tenant",
        replace(g, nodes=_nodes(g, a_r=replace(r, tenants=()))),
        ["%a.r serves no tenant"],
    )
    yield (
        "input not an input node",
        replace(g, tenants=dict(g.tenants, a=TenantIO((("x", "a.mm"),), (Ref("a.r"),)))),
        ["tenant a: input 'x' is not an input node (%a.mm)"],
    )
    yield (
        "input of another tenant",
        replace(g, tenants=dict(g.tenants, b=TenantIO((("y", "a.x"),), (Ref("b.g"),)))),
        ["tenant b: input node %a.x does not serve it"],
    )
    yield (
        "input not a tensor",
        replace(g, nodes=_nodes(g, a_x=replace(g.node("a.x"), ty=OtherTy("R.Shape([2])")))),
        ["input %a.x is not a tensor: R.Shape([2])"],
    )
    del mm


BROKEN = list(_broken_graphs())


@pytest.mark.parametrize(("case", "g", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_verifier_catches(case, g, expected):
    problems = verify_problems(g)
    for e in expected:
        assert any(e in p for p in problems), (e, problems)
    with pytest.raises(VerifyError) as info:
        g.verify()
    msg = str(info.value)
    assert msg.startswith("graph verification failed:")
    assert expected[0] in msg
    assert "--- graph ---\n" + str(g) in msg  # the error prints the graph


def test_verifier_accepts_valid_graph_and_declared_sharing(graph):
    assert verify_problems(graph) == []
    # A node serving two tenants may read a node serving both (a pass shared it on purpose).
    x = Node("s.x", INPUT, (), F23, ("s", "u"))
    y = Node("s.y", "relax.nn.relu", (Ref("s.x"),), F23, ("s", "u"))
    z = Node("u.z", "relax.nn.relu", (Ref("s.y"),), F23, ("u",))
    g = Graph(
        (x, y, z),
        {
            "s": TenantIO((("x", "s.x"),), (Ref("s.y"),)),
            "u": TenantIO((("x", "s.x"),), (Ref("u.z"),)),
        },
    )
    assert verify_problems(g) == []
    # ...but a node serving one tenant must not feed a node serving more.
    bad = replace(g, nodes=(x, replace(y, tenants=("s",)), replace(z, tenants=("s", "u"))))
    assert any("cross-tenant edge" in p for p in verify_problems(bad))


def test_verifier_truncates_huge_graphs():
    x = Node("a.x", INPUT, (), F23, ("a",))
    nodes = [x] + [
        Node(f"a.n{i}", "relax.nn.relu", (Ref("a.x"),), F23, ("a",)) for i in range(2000)
    ]
    g = Graph(tuple(nodes), {"a": TenantIO((("x", "a.x"),), (Ref("a.missing"),))})
    with pytest.raises(VerifyError, match="output %a.missing is not defined") as info:
        g.verify()
    assert str(info.value).endswith("... (graph truncated)")
    assert len(str(info.value)) < 21000


# --------------------------------------------------------------------------- views and helpers


def test_networkx_view(graph):
    nxg = graph.to_networkx()
    assert list(nxg.nodes) == [n.name for n in graph.nodes]
    assert set(nxg.edges) == {("a.x", "a.mm"), ("a.mm", "a.r"), ("b.y", "b.t"), ("b.t", "b.g")}
    assert nxg.nodes["a.mm"] == {"op": "relax.matmul", "tenants": ("a",), "ty": "f32[2,3]"}
    assert nxg.nodes["b.t"]["ty"] == "(f32[2,3], f32[2,3])"


def test_users_outputs_and_stats(graph):
    assert graph.users() == {
        "a.x": ["a.mm"],
        "a.mm": ["a.r"],
        "a.r": [],
        "b.y": ["b.t", "b.t"],
        "b.t": ["b.g"],
        "b.g": [],
    }
    assert graph.output_names() == {"a.r", "b.g"}
    assert graph.used_constants() == {WKEY}
    assert [n.name for n in graph.tenant_nodes("b")] == ["b.y", "b.t", "b.g"]
    assert graph.node("b.t").inputs == ["b.y", "b.y"]
    assert "a.r" in graph and "a.zz" not in graph and len(graph) == 6
    s = graph.stats()
    assert s["nodes"] == 6 and s["constants"] == 1 and s["weight_bytes"] == 48
    assert s["nodes_per_tenant"] == {"a": 3, "b": 3}
    assert s["ops"] == {INPUT: 2, "relax.matmul": 1, "relax.nn.relu": 1, TUPLE: 1, GET_ITEM: 1}


def test_const_key():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert const_key(a) == const_key(a.copy())
    assert const_key(a) == const_key(np.asfortranarray(a))  # layout does not matter
    assert const_key(a) == const_key(a.T.T)
    others = [
        a.astype(np.float64),  # dtype
        a.view(np.int32),  # dtype, same bytes
        a.reshape(3, 2),  # shape, same bytes
        a.reshape(6),
        np.where(a == 5, np.nextafter(a, np.float32(9)), a),  # one element, one ulp
    ]
    keys = {const_key(o) for o in others}
    assert len(keys) == len(others) and const_key(a) not in keys


def test_with_nodes_drops_unused_constants(graph):
    extra = np.ones(3, np.float32)
    g = replace(graph, constants={**graph.constants, const_key(extra): extra})
    assert len(g.constants) == 2
    kept = g.with_nodes(g.nodes)
    assert set(kept.constants) == {WKEY}
    # Dropping the only reader of W drops W too; tenants can be replaced at the same time.
    r = replace(g.node("a.r"), args=(Ref("a.x"),), ty=F24)
    no_w = g.with_nodes(
        [g.node("a.x"), r, *g.tenant_nodes("b")], {"a": g.tenants["a"], "b": g.tenants["b"]}
    )
    assert no_w.constants == {}
    no_w.verify()
    assert g.constants.keys() == {WKEY, const_key(extra)}  # the original is untouched
    # A constant a tenant returns directly is still used.
    out_const = g.with_nodes(
        g.nodes, dict(g.tenants, b=TenantIO(g.tenants["b"].inputs, (ConstRef(const_key(extra)),)))
    )
    assert set(out_const.constants) == {WKEY, const_key(extra)}


# --------------------------------------------------------------------------- parse back


def _round_trip(g: Graph) -> Graph:
    text = str(g)
    back = parse_graph(text, g.constants)
    assert graph_diff(g, back) == [] and str(back) == text
    return back


def test_printed_graph_parses_back_equal(graph):
    back = _round_trip(graph)
    back.verify()
    assert back.constants.keys() == graph.constants.keys()  # constants by key prefix
    assert back.node("b.g").attrs == 0 and back.node("a.mm").attrs.text == "out_dtype=float32"


def test_parse_back_library_calls_symbolic_dims_shared_nodes_and_ty_args():
    batch = Sym("n", 1, 8, (("n", 1, 8),))
    four = Sym("n * 4", 4, 32, (("n", 1, 8),))
    x = Node("s.x", INPUT, (), TensorTy((batch, 4), "float32"), ("s", "u"))
    call = LibraryCall(
        "native",
        "conv2d",
        bias=True,
        epilogue="add_relu",
        conv=ConvParams((2, 1), (0, 1, 1, 2), (1, 2), 2),
    )
    c = Node(
        "s.c",
        LIBRARY_CALL,
        (Ref("s.x"), ConstRef(WKEY), ConstRef(WKEY), Ref("s.x")),
        TensorTy((four,), "float32"),
        ("s", "u"),
        call,
        group="g0",
    )
    t = Node(
        "s.t",
        "relax.concat",
        ((Ref("s.c"), Ref("s.c")),),
        TensorTy((2,), "int64"),
        ("s", "u"),
        ty_args=(OtherTy("R.Tensor((2,), dtype=int64)"),),
    )
    g = Graph(
        (x, c, t),
        {
            "s": TenantIO((("x", "s.x"),), (Ref("s.t"),)),
            "u": TenantIO((("x", "s.x"),), (ConstRef(WKEY),)),
        },
        {WKEY: W},
    )
    assert str(g).splitlines()[:2] == ["dim n = [1, 8] n:1:8", "dim n * 4 = [4, 32] n:1:8"]
    back = _round_trip(g)
    assert back.node("s.c").attrs == call and back.node("s.c").attrs.symbol == (
        "mtcompile.native.conv2d_bias_add_relu"
    )
    assert back.node("s.c").ty.shape[0] == four


def test_assert_graph_lists_what_differs(graph):
    text = str(graph)
    assert_graph(graph, text)
    with pytest.raises(AssertionError, match=r"node 2:\n  - %a.r = nn.relu") as e:
        assert_graph(graph, text.replace("nn.relu", "nn.gelu"))
    assert "+ %a.r = nn.gelu(%a.mm)" in str(e.value)
    with pytest.raises(ParseError, match="not a node"):
        parse_graph("tenant a(x=%a.x)\nwhat is this")
    with pytest.raises(ParseError, match="symbolic dim 'm' has no 'dim' line"):
        parse_graph("%a.x = input() {tenant=a} : f32[m,2]")


def _merged_and_optimized(set_name: str) -> tuple[Graph, Graph]:
    from mtcompile.backend.kernels import resolve_providers
    from mtcompile.frontend.importers import import_tenant
    from mtcompile.frontend.lift import lift
    from mtcompile.frontend.merge import merge
    from mtcompile.models import get_set
    from mtcompile.pass_infra import PassContext, run_passes
    from mtcompile.passes import build_pipeline

    tenants = get_set(set_name)
    graphs = []
    for t in tenants:
        it = import_tenant(t)
        graphs.append(lift(it.mod["main"], t.name, it.input_names))
    merged = merge(graphs, {t.name: t.shared_inputs for t in tenants if t.shared_inputs})
    from mtcompile.backend.emitted import kernel_dag

    ctx = PassContext("llvm", resolve_providers("llvm", None), cores=2, kernel_model=kernel_dag)
    return merged, run_passes(merged, build_pipeline(), ctx)[0]


@pytest.mark.slow  # imports every demo set (bert4: minutes on a busy host)
@pytest.mark.parametrize(
    "set_name", ["heterogeneous", "same-arch", "shared-backbone", "bert4", "mixed"]
)
def test_demo_sets_merged_graphs_parse_back_equal(set_name):
    """Every demo set's merged graph, and the graph the default pipeline makes of it (library
    calls, fusion groups, shared and batched nodes), prints and parses back equal."""
    for g in _merged_and_optimized(set_name):
        _round_trip(g)
