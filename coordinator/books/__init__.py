"""The coordinator's books: the stores that own the run's tables and their SQL, in one package."""
