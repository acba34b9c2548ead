"""EmbedDeck tests: a package, so that pytest and the test modules import conftest once, as tests.conftest."""
