"""The import graph of the package (pigeon.tools.layers): no cycle, every module in a layer, and no
upward import."""

from pigeon.tools import layers


def test_cycles_are_found_in_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert layers.cycles(graph) == [["a", "b", "c"]]
    assert layers.cycles({"x": {"y"}, "y": set()}) == []


def test_the_package_has_no_import_cycle_and_every_module_has_a_layer():
    graph = layers.module_graph()
    assert "training.loop" in graph and "evaluation.chain" in graph["training.loop"]
    assert layers.cycles(graph) == []
    for module in graph:
        layers.layer_of(module)  # raises for a module in no layer


def test_upward_imports_are_found_in_a_known_graph_and_the_package_has_none(monkeypatch):
    monkeypatch.setattr(layers, "LAYERS", (("low",), ("high",)))
    graph = {"low": {"high"}, "high": {"low"}, "low.part": {"low"}}
    assert layers.upward_imports(graph) == [("low", "high")]
    monkeypatch.undo()
    assert layers.upward_imports(layers.module_graph()) == []
    assert layers.main([]) == 0
