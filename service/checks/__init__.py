"""The staged checks, one module per stage, and the catalog of every code they emit."""
