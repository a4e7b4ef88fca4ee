"""The recipes and evaluation suites that ship inside the wheel: `recipes` and `eval` here are links to the
repository's top-level folders, which packaging copies in (pyproject.toml package-data). Read them through
`posttrain.resources`, never by path arithmetic."""
