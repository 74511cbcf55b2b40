"""Problem files used only by the runner tests (loaded by module path: ``bilevel run problems_for_tests.x``)."""
