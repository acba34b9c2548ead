"""EmbedDeck jobs: everything that defines, drives and stores an embedding run."""
