"""Integer divisions whose divisor may be 0 when the model runs: lowering checks their
divisors in a kernel before the division (an integer divide by 0 stops the process with
SIGFPE; PyTorch raises). A divisor that is a constant is checked here, at build time."""

from __future__ import annotations

from mtcompile.errors import LoweringError
from mtcompile.ir.graph import INPUT, ConstRef, Graph, Node, Ref, TensorTy

# integer division and remainder (floor and truncating): the second argument divides
DIVISIONS = {"relax.floor_divide", "relax.divide", "relax.floor_mod", "relax.mod"}


def _integer(graph: Graph, n: Node) -> bool:
    return isinstance(n.ty, TensorTy) and n.ty.dtype.startswith(("int", "uint"))


def divisors(graph: Graph) -> list[str]:
    """The integer divisions of `graph` whose divisor is computed (an input, or computed
    from inputs). One dividing by a constant holding 0 is refused (`LoweringError`)."""
    out = []
    for n in graph.nodes:
        if n.op not in DIVISIONS or len(n.args) != 2 or not _integer(graph, n):
            continue
        b = n.args[1]
        if isinstance(b, ConstRef):
            if (graph.constants[b.key] == 0).any():
                raise LoweringError(
                    f"tenant '{n.tenant}': %{n.name} = {n.op} divides by a constant holding 0"
                )
        elif isinstance(b, Ref):
            out.append(n.name)
    return out


def divisor_inputs(graph: Graph, n: Node) -> list[str]:
    """The input nodes the divisor of `n` is computed from, in graph order."""
    seen: set[str] = set()
    stack = [n.args[1].name]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.node(name).inputs)
    return [m.name for m in graph.nodes if m.name in seen and m.op == INPUT]
