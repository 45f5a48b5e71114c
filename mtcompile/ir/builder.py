"""Build graph nodes by calling Relax op constructors on typed placeholders.

TVM infers the result type and builds the attrs, so a pass that creates nodes writes no
type rules of its own: ``make(typeof, name, tenants, relax.op.permute_dims, [Ref(x)],
axes=[0, 2, 1])`` returns the Node, its type and attrs filled in; ``typeof`` gives the
type of each Ref/ConstRef argument.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from mtcompile.ir.graph import ConstRef, Graph, Node, Opaque, Ref, Sym, TensorTy
from mtcompile.ir.relax_types import lift_type, opaque, relax_type, ty_bounds


def graph_types(
    graph: Graph, extra_nodes: dict | None = None, extra_constants: dict | None = None
) -> Callable:
    """``typeof`` over a graph, plus nodes and constants a pass is adding."""
    nodes = extra_nodes if extra_nodes is not None else {}  # live views: the pass adds to them
    consts = extra_constants if extra_constants is not None else {}

    def typeof(arg) -> TensorTy:
        if isinstance(arg, ConstRef):
            a = consts[arg.key] if arg.key in consts else graph.constants[arg.key]
            return TensorTy(tuple(a.shape), str(a.dtype))
        return nodes[arg.name].ty if arg.name in nodes else graph.node(arg.name).ty

    return typeof


def make(
    typeof: Callable, name: str, tenants: tuple[str, ...], fn: Callable, args: list, **kwargs
) -> Node:
    """The node ``fn(*args, **kwargs)`` (a Relax op constructor) over graph values `args`."""
    placeholders, back, tys = [], {}, []
    for i, a in enumerate(args):
        if isinstance(a, Ref | ConstRef):
            tys.append(typeof(a))
            v = relax.Var(f"a{i}", relax_type(tys[-1]))
            back[v] = a
            placeholders.append(v)
        elif isinstance(a, list):  # a list of graph values (stack, concat)
            tys += [typeof(x) for x in a]
            vs = [relax.Var(f"a{i}_{j}", relax_type(typeof(x))) for j, x in enumerate(a)]
            back.update(zip(vs, a, strict=True))
            placeholders.append(vs)
        else:
            placeholders.append(a)
    # a shape given with symbolic dims (``shape=[*ty.shape]``): their TVM expressions
    kwargs = {
        k: [d.obj if isinstance(d, Sym) else d for d in v]
        if isinstance(v, list | tuple) and any(isinstance(d, Sym) for d in v)
        else v
        for k, v in kwargs.items()
    }
    call = relax.BlockBuilder().normalize(fn(*placeholders, **kwargs))

    def to_arg(e):
        if isinstance(e, relax.Var):
            return back[e]
        if isinstance(e, relax.Tuple):
            return tuple(to_arg(f) for f in e.fields)
        return opaque(e)

    assert isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
    return Node(
        name,
        call.op.name,
        tuple(to_arg(a) for a in call.args),
        lift_type(call.ty, name, ty_bounds(*tys)),
        tenants,
        opaque(call.attrs) if call.attrs is not None else None,
        tuple(opaque(t) for t in call.ty_args),
    )


def op_of(node: Node) -> Callable:
    """A constructor applying `node`'s operator, attrs and type arguments to new arguments."""
    attrs = node.attrs.obj if isinstance(node.attrs, Opaque) else None

    def fn(*xs):
        return relax.Call(tvm.ir.Op.get(node.op), list(xs), attrs, [t.obj for t in node.ty_args])

    return fn
