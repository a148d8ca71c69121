"""Imports run one way: the layout the README's "How the code is laid out" describes stays true.

Every module of the project is parsed (nothing is imported), each of its imports of a project
module is resolved (relative ones, imports inside functions and under TYPE_CHECKING included: a
type-only import is a dependency too), and checked against the tables below. A module that imports
upward (currency from budget, the purchase flow from the RPC surface, one bench from another) fails
here with its file, line and the rule it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's own packages.
PACKAGES = ("common", "currency", "budget", "exchange_client", "rpc_server", "reference_exchange",
            "broker", "bench", "tests", "ramp")
# Generated from proto/: every package may import it, and it imports none of the others.
GENERATED = "ramp"
EVERYTHING = frozenset(PACKAGES) - {"tests"}

# Which packages each package may import (besides itself, the generated code and third-party code).
PACKAGE_RULES: dict[str, frozenset[str]] = {
    GENERATED: frozenset(),
    "common": frozenset(),
    "currency": frozenset({"common"}),
    "budget": frozenset({"currency", "common"}),
    "exchange_client": frozenset({"currency", "common"}),
    "rpc_server": frozenset({"common"}),
    "reference_exchange": frozenset({"rpc_server", "currency", "common"}),
    "broker": frozenset({"budget", "currency", "exchange_client", "rpc_server", "reference_exchange",
                         "common"}),
    # Benches drive everything, and borrow the tests' Redis Cluster helper.
    "bench": EVERYTHING | {"tests"},
    "tests": EVERYTHING | {"tests"},
}

# Inside broker/: each part (a subpackage, or one of the modules beside them) and the other parts it
# may import. The purchase flow knows nothing of how it is served; the RPC surface is a thin layer
# over it; only the command line (operator/) may import the composition root, app.py.
BROKER_RULES: dict[str, frozenset[str]] = {
    "config": frozenset(),
    "wire": frozenset(),
    "refusals": frozenset(),
    "observe": frozenset({"config"}),
    "purchase": frozenset({"config", "wire", "refusals", "observe"}),
    "rpc": frozenset({"config", "wire", "refusals", "observe", "purchase"}),
    "app": frozenset({"config", "wire", "refusals", "observe", "purchase", "rpc"}),
    # A client of a running broker over HTTP: it decides nothing about money.
    "mcp": frozenset({"wire"}),
    "operator": frozenset({"config", "wire", "refusals", "observe", "purchase", "rpc", "app", "mcp"}),
}
# Packages outside broker/ a part may import, where it is fewer than broker's own list.
BROKER_OUTSIDE: dict[str, frozenset[str]] = {
    "mcp": frozenset({"currency", "common"}),
}
# Only the command line starts the reference Exchange (`ramp-broker exchange`).
REFERENCE_EXCHANGE_USERS = frozenset({"operator"})

# Inside budget/: the stores know no layer; durability (journal, intents, memory) knows the stores'
# contract; the layers (the modules directly in budget/) may use both.
BUDGET_RULES: dict[str, frozenset[str]] = {
    "stores": frozenset(),
    "durability": frozenset({"stores"}),
    "layers": frozenset({"stores", "durability"}),
}

# Inside bench/: the benches share bench/common.py and never import each other.
BENCH_SHARED = "bench.common"


@dataclass(frozen=True, slots=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the project module imported, dotted
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" not in path.parts:
                modules[module_name(path)] = path
    return modules


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `source`)."""
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    # A package's own __init__ is its level-1 base; a module's is its package.
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_in(source: str, tree: ast.AST, modules: dict[str, Path], *, is_package: bool = False,
               filename: str = "") -> Iterator[Import]:
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield Import(source, alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(source, is_package, node)
            if module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                # `from broker import wire` imports the module broker.wire, not the package broker.
                candidate = f"{module}.{alias.name}"
                yield Import(source, candidate if candidate in modules else module, where)


def imports_of(source: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    yield from imports_in(source, tree, modules, is_package=path.name == "__init__.py",
                          filename=str(path.relative_to(ROOT)))


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def _part(module: str) -> str:
    """The part of its package a module belongs to: a subpackage, or one of the modules beside them."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _budget_part(module: str) -> str:
    part = _part(module)
    return part if part in ("stores", "durability") else "layers"


def broken_rule(imp: Import) -> str | None:
    """Why `imp` runs the wrong way, or None when it is allowed."""
    source_pkg, target_pkg = imp.source.split(".")[0], imp.target.split(".")[0]
    allowed = PACKAGE_RULES[source_pkg] | ({GENERATED} if source_pkg != GENERATED else set())
    if source_pkg != target_pkg and target_pkg not in allowed:
        return f"{source_pkg}/ may import only {sorted(PACKAGE_RULES[source_pkg]) or 'none of the project'}"
    if source_pkg == "broker":
        part = _part(imp.source)
        if target_pkg == "broker":
            other = _part(imp.target)
            if other and other != part and other not in BROKER_RULES[part]:
                return f"broker/{part} may import only {sorted(BROKER_RULES[part])} of broker/"
        elif part in BROKER_OUTSIDE and target_pkg not in BROKER_OUTSIDE[part] | {GENERATED}:
            return f"broker/{part} may import only {sorted(BROKER_OUTSIDE[part])} outside broker/"
        elif target_pkg == "reference_exchange" and part not in REFERENCE_EXCHANGE_USERS:
            return "only broker/operator (ramp-broker exchange) may import reference_exchange/"
    if source_pkg == target_pkg == "budget":
        part, other = _budget_part(imp.source), _budget_part(imp.target)
        if other != part and other not in BUDGET_RULES[part]:
            return f"budget/{part} may import only {sorted(BUDGET_RULES[part]) or 'nothing'} of budget/"
    if source_pkg == target_pkg == "bench" and imp.source != imp.target and imp.target != BENCH_SHARED:
        return f"a bench may import only {BENCH_SHARED} of bench/"
    return None


def test_every_import_runs_the_way_the_layout_says() -> None:
    imports = all_imports()
    assert len(imports) > 500, "the walk found too few imports: is the tree where it should be?"
    broken = [f"{imp}: {rule}" for imp in imports if (rule := broken_rule(imp)) is not None]
    assert not broken, "imports that run the wrong way:\n" + "\n".join(dict.fromkeys(broken))


def test_every_rule_names_a_part_that_exists() -> None:
    """A rule for a room that was renamed would allow nothing and check nothing."""
    modules = project_modules()
    broker_parts = {_part(m) for m in modules if m.startswith("broker.")}
    assert broker_parts == set(BROKER_RULES)
    assert {_budget_part(m) for m in modules if m.startswith("budget.")} == set(BUDGET_RULES)
    assert BENCH_SHARED in modules
    assert {m.split(".")[0] for m in modules} == set(PACKAGES)


def test_an_upward_import_is_caught() -> None:
    """The checker itself: each kind of wrong-way import is named (as a new module would write it)."""
    modules = project_modules()

    def check(source: str, code: str) -> str | None:
        rules = [broken_rule(imp) for imp in imports_in(source, ast.parse(code), modules)]
        return next((r for r in rules if r is not None), None)

    assert check("currency.ecb", "from budget.periods import to_ms") is not None
    assert check("common.clock", "from currency.money import Money") is not None
    assert check("budget.period", "from broker.config import BrokerConfig") is not None
    assert check("exchange_client.ramp", "from budget.stores.contract import Store") is not None
    assert check("reference_exchange.catalog", "from broker.config import check_address") is not None
    assert check("broker.purchase.flow", "from broker.rpc.errors import ErrorMapping") is not None
    assert check("broker.purchase.flow", "from broker.app import build_broker") is not None
    assert check("broker.rpc.service", "from broker.operator.console import run") is not None
    assert check("broker.mcp.server", "from broker.purchase.selection import choose") is not None
    assert check("broker.mcp.server", "from budget.layers import Snapshot") is not None
    assert check("broker.rpc.service", "from reference_exchange.service import ReferenceExchange") is not None
    assert check("budget.stores.sqlite", "from budget.periods import to_ms") is not None
    assert check("budget.stores.sqlite", "from budget.durability.journal import Journal") is not None
    assert check("budget.durability.journal", "from budget.leases import LeaseBook") is not None
    assert check("bench.budget", "from bench.purchases import ITEM_PRICE") is not None
    assert check("ramp.v1.ramp_pb2", "from currency.money import Money") is not None
    # and what is allowed stays allowed
    assert check("broker.purchase.flow", "from broker.observe.metrics import Metrics") is None
    assert check("broker.purchase.flow", "from . import order") is None
    assert check("broker.rpc.service", "from ..purchase.flow import Purchaser") is None
    assert check("budget.period", "from budget.durability.journal import Journal") is None
    assert check("bench.budget", "from bench.common import ITEM_PRICE") is None
    assert check("common.clock", "from ramp.v1 import ramp_pb2") is None
