"""The package's shape: no import cycles between its modules (the layers themselves are import-linter
contracts, run by CI; a cycle inside one layer would pass them)."""
import grimp


def test_no_module_of_the_package_imports_itself_back():
    graph = grimp.build_graph("harness", exclude_type_checking_imports=True)  # typing-only back-references are fine
    modules = sorted(m for m in graph.modules if m.startswith("harness"))
    cycles = sorted({tuple(sorted((a, b))) for a in modules for b in graph.find_modules_directly_imported_by(a)
                     if b.startswith("harness") and graph.chain_exists(importer=b, imported=a)})
    assert len(modules) > 60 and cycles == []
