"""EmbedDeck cluster: start, stop and scale Spark workers, and report what they do."""
