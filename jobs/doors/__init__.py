"""Front doors: the HTTP API, the CLI, the bench and the GPU check. They call the lifecycle."""
