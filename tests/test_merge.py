"""Merge: tenant graphs -> one graph, names namespaced per tenant, equal constants stored once."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from conftest import linear_relu, small_graph, tiny_conv

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import TenantError
from mtcompile.frontend.importers import import_tenant
from mtcompile.frontend.lift import lift
from mtcompile.frontend.merge import constant_bytes_before_merge, merge
from mtcompile.ir.graph import Graph, TenantIO


def _graph(name: str, model, inputs) -> Graph:
    it = import_tenant(Tenant(name, model, example_inputs=inputs))
    return lift(it.mod["main"], name, it.input_names)


def test_names_are_namespaced_per_tenant():
    m, x = linear_relu(0)
    ga, gb = _graph("a", m, x), _graph("b", copy.deepcopy(m), x)
    merged = merge([ga, gb])
    merged.verify()
    assert list(merged.tenants) == ["a", "b"]
    assert [n.name for n in merged.nodes] == [n.name for n in ga.nodes + gb.nodes]
    # The same local names appear once per tenant, each under its tenant's prefix.
    locals_a = [n.name.removeprefix("a.") for n in merged.tenant_nodes("a")]
    locals_b = [n.name.removeprefix("b.") for n in merged.tenant_nodes("b")]
    assert locals_a == locals_b
    assert all(n.tenants == (n.name.split(".")[0],) for n in merged.nodes)
    assert merged.tenants["b"].inputs == (("x", "b.x"),)


def test_equal_constants_are_stored_once():
    m, x = tiny_conv(0)
    ga, gb = _graph("a", m, x), _graph("b", copy.deepcopy(m), x)
    merged = merge([ga, gb])
    assert set(merged.constants) == set(ga.constants) == set(gb.constants)
    assert merged.weight_bytes() == ga.weight_bytes()
    assert constant_bytes_before_merge([ga, gb]) == 2 * ga.weight_bytes()
    # Both tenants read the one copy.
    assert merged.used_constants() == set(ga.constants)


def test_different_weights_are_kept_apart():
    (ma, xa), (mb, _) = tiny_conv(0), tiny_conv(1)
    ga, gb = _graph("a", ma, xa), _graph("b", mb, xa)
    merged = merge([ga, gb])
    # BatchNorm's default weight (ones) and bias (zeros) are equal in both; the rest differ.
    shared = set(ga.constants) & set(gb.constants)
    assert len(shared) == 2
    assert all(np.all(ga.constants[k] == ga.constants[k].flat[0]) for k in shared)
    assert len(merged.constants) == len(ga.constants) + len(gb.constants) - len(shared)
    assert merged.weight_bytes() == constant_bytes_before_merge([ga, gb]) - sum(
        ga.constants[k].nbytes for k in shared
    )


@pytest.mark.slow  # compiles a bundle of its own
def test_compile_reports_weight_bytes_before_and_after_merge():
    m, x = linear_relu(0)
    tenants = [
        Tenant("a", m, example_inputs=x),
        Tenant("b", copy.deepcopy(m), example_inputs=x),
        Tenant("c", linear_relu(1)[0], example_inputs=x),
    ]
    # without fuse-horizontal, whose stacked copies of the weights add bytes (tested there)
    g = mtcompile.compile(tenants, passes=["dedup", "eliminate-dead-nodes"]).manifest.graph
    one = (8 * 4 + 4) * 4  # bytes of one Linear(8, 4)
    assert g.weight_bytes_before_merge == 3 * one
    assert g.weight_bytes == 2 * one
    assert g.constants == 4


def test_duplicate_tenant_names_are_rejected():
    g = small_graph()
    with pytest.raises(
        TenantError,
        match=r"duplicate tenant name 'a': every tenant needs its "
        r"own name",
    ):
        merge([g, g])
    m, x = linear_relu(0)
    with pytest.raises(TenantError, match=r"duplicate tenant name\(s\) \['a'\]"):
        mtcompile.compile(
            [
                Tenant("a", m, example_inputs=x),
                Tenant("b", m, example_inputs=x),
                Tenant("a", m, example_inputs=x),
            ]
        )


def test_node_name_clash_is_rejected():
    g = small_graph()
    a_only = g.with_nodes(g.tenant_nodes("a"), {"a": g.tenants["a"]})
    renamed = replace(
        a_only, tenants={"c": TenantIO(a_only.tenants["a"].inputs, a_only.tenants["a"].outputs)}
    )
    with pytest.raises(TenantError, match=r"node names \['a.mm', 'a.r', 'a.x'\] appear in two"):
        merge([a_only, renamed])


def test_merge_keeps_order_and_verifies():
    g = small_graph()
    a_only = g.with_nodes(g.tenant_nodes("a"), {"a": g.tenants["a"]})
    b_only = g.with_nodes(g.tenant_nodes("b"), {"b": g.tenants["b"]})
    assert b_only.constants == {}
    merged = merge([b_only, a_only])
    assert list(merged.tenants) == ["b", "a"]
    assert str(merged).splitlines()[:2] == ["tenant b(y=%b.y)", "tenant a(x=%a.x)"]
    assert set(merged.constants) == set(g.constants)
