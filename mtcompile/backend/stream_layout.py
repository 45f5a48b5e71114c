"""How run_all's kernels split into one Relax function per stream (``run_all__s{i}``): per
stream the nodes to emit stage by stage, the values it takes from and hands to other
streams, its outputs and its event points. Lowering (`_Emitter.stream_function`) emits it."""

from __future__ import annotations

from mtcompile.abi import ARENA_FN, RUN_ALL, StreamFunctions
from mtcompile.analysis.schedule import KernelDAG, tensors_of
from mtcompile.analysis.streams import happens_before
from mtcompile.errors import LoweringError, MTCompileError
from mtcompile.ir.graph import GET_ITEM, INPUT, TUPLE, Graph, Ref, TensorTy


def run_all_params(graph: Graph) -> list[tuple[str, list[tuple[str, str]]]]:
    """``run_all``'s parameters in order: (input node, the (tenant, input name) pairs it
    serves). An input shared by several tenants is one parameter."""
    params: dict[str, list[tuple[str, str]]] = {}
    for t, io in graph.tenants.items():
        for local, node in io.inputs:
            params.setdefault(node, []).append((t, local))
    return list(params.items())


class StreamLayout:
    """How run_all's kernels are split into stream functions (``run_all__s{i}``): per
    stream the nodes to emit (per kernel, in stream order, each preceded by the free nodes
    it needs: views, tuples, items, constant-only values), the run_all inputs it reads, the
    values it imports from and exports to other streams, its tenant outputs (indices into
    run_all's flat outputs), and the event points: sync `e` = (producer, consumer) is
    signalled after the producer's stage and waited for before the consumer's."""

    def __init__(self, graph: Graph, dag: KernelDAG):
        a = graph.analyses["streams"]
        self.graph, self.assignment = graph, a
        self.dag = dag  # the kernels the assignment and the plan were made on
        self.functions = [f"{RUN_ALL}__s{i}" for i in range(a.num_streams)]
        self._own_kernels()
        live = graph.live_nodes()
        self.groups: dict[str, list] = {}
        for nd in graph.nodes:
            if nd.group is not None and nd.name in live:
                self.groups.setdefault(nd.group, []).append(nd)
        self.group_of = {nd.name: nd.group for nd in graph.nodes if nd.group is not None}
        self._place_outputs()
        self._before = happens_before(a)
        self._plan_streams()
        self._place_events()

    def _own_kernels(self) -> None:
        """The stream that computes each node (`owner`), the kernel it is part of
        (`kernel_of`) and each kernel's nodes (`kernel_nodes`)."""
        stream_of, dag = self.assignment.stream_of, self.dag
        # nodes of kernels that compute (views are free: re-emitted where needed)
        self.owner = {
            node: stream_of[k.name] for k in dag.kernels if k.kind != "view" for node in k.nodes
        }
        self.kernel_of = kernel_of = {node: k.name for k in dag.kernels for node in k.nodes}
        # a kernel's nodes, plus the items of its tuple result: computed on its stream, so
        # another stream imports a field (a tensor), never the tuple
        self.kernel_nodes = {k.name: list(k.nodes) for k in dag.kernels}
        for nd in self.graph.nodes:
            src = nd.inputs[0] if nd.op == GET_ITEM and nd.inputs else None
            if src in self.owner and nd.name not in self.owner and isinstance(nd.ty, TensorTy):
                self.owner[nd.name] = self.owner[src]
                kernel_of[nd.name] = kernel_of[src]
                self.kernel_nodes[kernel_of[src]].append(nd.name)

    def _place_outputs(self) -> None:
        """Each tenant output on the stream owning the tensor it holds (inputs and constants:
        stream 0): per stream its `outputs` and their indices into run_all's flat outputs."""
        graph, n = self.graph, len(self.functions)
        self.outputs: list[list] = [[] for _ in range(n)]
        self.output_index: list[list[int]] = [[] for _ in range(n)]
        outputs = [o for t in graph.tenants for o in graph.tenants[t].outputs]
        for j, o in enumerate(outputs):
            s = 0
            if isinstance(o, Ref):
                srcs = [
                    self.owner[t]
                    for t in tensors_of(graph, o.name, self.dag.alias)
                    if t in self.owner
                ]
                s = srcs[0] if srcs else 0
            self.outputs[s].append(o)
            self.output_index[s].append(j)

    def _plan_streams(self) -> None:
        """Per stream: the run_all inputs it reads (`inputs`, `input_index`), the values it
        imports, its nodes to emit per stage (`emission`) and the values it exports, each
        value that crosses streams with an id (`value_id`)."""
        n = len(self.functions)
        params = [node for node, _ in run_all_params(self.graph)]
        self.inputs: list[list[str]] = []
        self.imports: list[list[str]] = []
        self.emission: list[list[list[str]]] = []
        self.exports: list[list[str]] = [[] for _ in range(n)]
        self.value_id: dict[str, int] = {}
        for i in range(n):
            ins, imp, stages = self._stream_nodes(i)
            self.inputs.append(sorted(ins, key=params.index))
            self.imports.append(imp)
            self.emission.append(stages)
        for imp in self.imports:
            for x in imp:
                s = self.owner[x]
                if x not in self.value_id:
                    self.value_id[x] = len(self.value_id)
                    self.exports[s].append(x)
        self.input_index = [[params.index(x) for x in ins] for ins in self.inputs]

    def _place_events(self) -> None:
        """Event `e` of sync `e` = (producer, consumer): per stream, the events signalled
        after each stage (`signals`) and waited for before it (`waits`), by stage index;
        each event's (signalling, waiting) streams (`event_streams`)."""
        a, n = self.assignment, len(self.functions)
        stream_of = a.stream_of
        pos = [{k: j for j, k in enumerate(ks)} for ks in a.streams]
        self.waits: list[dict[int, list[int]]] = [{} for _ in range(n)]
        self.signals: list[dict[int, list[int]]] = [{} for _ in range(n)]
        self.event_streams = []
        for e, (p, c) in enumerate(a.syncs):
            sp, sc = stream_of[p], stream_of[c]
            self.signals[sp].setdefault(pos[sp][p], []).append(e)
            self.waits[sc].setdefault(pos[sc][c], []).append(e)
            self.event_streams.append((sp, sc))

    def _stream_nodes(self, i: int) -> tuple[list[str], list[str], list[list[str]]]:
        """Stream `i`'s run_all inputs, imports, and nodes to emit per stage (one stage per
        kernel, in stream order; a last one for outputs that are views)."""
        graph, kernels = self.graph, self.assignment.streams[i]
        done: set[str] = set()
        ins: list[str] = []
        imp: list[str] = []

        def need(name: str, order: list[str], stage_kernel: str | None) -> None:
            if name in done:
                return
            nd = graph.node(name)
            if nd.op == INPUT:
                ins.append(name)
                done.add(name)
                return
            if self.owner.get(name, i) != i:  # computed on another stream: imported
                if not isinstance(nd.ty, TensorTy):
                    raise LoweringError(
                        f"stream {i} reads %{name}, a {nd.ty} computed on "
                        f"stream {self.owner[name]}: only tensors cross streams"
                    )
                producer = self.kernel_of[name]
                if stage_kernel is None or not self._before(producer, stage_kernel):
                    raise LoweringError(
                        f"stream {i} reads %{name} of kernel {producer} "
                        f"(stream {self.owner[name]}) where no event orders "
                        "it first"
                    )
                imp.append(name)
                done.add(name)
                return
            members = self.groups[nd.group] if nd.group is not None else [nd]
            for r in self.reads(name):
                need(r, order, stage_kernel)
            order.append(members[-1].name)
            done.update(m.name for m in members)

        stages: list[list[str]] = []
        for k in kernels:
            order: list[str] = []
            for node in self.kernel_nodes[k]:
                need(node, order, k)
            stages.append(order)
        tail: list[str] = []
        for o in self.outputs[i]:
            if isinstance(o, Ref):
                need(o.name, tail, kernels[-1])
        if tail:
            stages.append(tail)
        return ins, imp, stages

    def reads(self, name: str) -> list[str]:
        """The nodes that emitting node `name` reads (for a group's last node: what the
        group reads from outside); a field of a tuple node reads that field only."""
        nd = self.graph.node(name)
        members = self.groups[nd.group] if nd.group is not None else [nd]
        inside = {m.name for m in members}
        out = []
        for m in members:
            field = tuple_field(self.graph, m)
            ins = m.inputs if field is None else ([field.name] if isinstance(field, Ref) else [])
            out += [r for r in ins if r not in inside]
        return out

    def manifest(self) -> StreamFunctions:
        """What the runtime needs to run the stream functions (the manifest's ``streams.run``)."""
        a = self.assignment
        kernel_tenant = {}  # VM symbol of a fused kernel -> its tenant(s)
        for s, ks in enumerate(a.streams):
            for k in ks:
                kn = self.dag.kernel(k)
                group = self.group_of.get(kn.nodes[-1])
                if group is not None:
                    kernel_tenant[f"{self.functions[s]}_{group}"] = kn.tenant
        return StreamFunctions(
            functions=tuple(self.functions),
            arena_function=ARENA_FN,
            num_events=a.num_syncs,
            event_streams=tuple(map(tuple, self.event_streams)),
            stream_inputs=tuple(map(tuple, self.input_index)),
            stream_outputs=tuple(map(tuple, self.output_index)),
            stream_tenants=tuple(
                "+".join(dict.fromkeys(t for k in ks for t in self.dag.kernel(k).tenants)) or "?"
                for ks in a.streams
            ),
            kernel_tenant=kernel_tenant,
        )


def tuple_field(graph: Graph, node):
    """For ``get_item(t, i)`` of a tuple node ``t`` built in the graph: its field ``i`` (a
    Ref or ConstRef), which emission uses directly, so that a reader of one field does not
    need the others (they may come from other streams, ordered only for the field read).
    None for any other node."""
    if node.op != GET_ITEM or not node.inputs:
        return None
    src = graph.node(node.inputs[0])
    return src.args[int(node.attrs)] if src.op == TUPLE else None


def stream_layout(graph: Graph, dag: KernelDAG | None = None) -> StreamLayout | None:
    """The stream functions to emit, when the graph carries an assignment of > 1 stream
    and a memory plan (the one arena all streams share), made for that very assignment,
    over `dag`: the kernels they were made on (default: those TVM emits on llvm)."""
    a = graph.analyses.get("streams")
    plan = graph.analyses.get("memory")
    if a is None or a.num_streams <= 1:
        return None
    if plan is None:  # running one stream instead would silently ignore what was asked
        raise MTCompileError(
            f"assign-streams assigned run_all's kernels to {a.num_streams} streams "
            f"(policy {a.policy!r}), but no plan-memory ran after it: the streams run over "
            "one planned arena. Run plan-memory after assign-streams, or ask for one stream "
            "(streams=1 or policy='sequential')."
        )
    if plan.streams != a.fingerprint():
        made_for = "program order" if plan.streams is None else f"assignment {plan.streams}"
        raise MTCompileError(
            f"run_all's memory plan was made for {made_for}, not for the {a.num_streams}-stream "
            f"assignment {a.fingerprint()} to lower: tensors live at once on two streams could "
            "share bytes. Run plan-memory after assign-streams."
        )
    if dag is None:
        from mtcompile.backend.emitted import kernel_dag  # emitted imports this module

        dag = kernel_dag(graph)
    return StreamLayout(graph, dag)
