"""The real data sets of the demo, tests and benchmarks (see ``SOURCES.md`` beside this file).

Data, not code: this file only makes the folder the package ``backbeat_data`` (the name
``pyproject.toml`` maps onto ``data/``), so the files ship in the wheel and are found with
``importlib.resources`` (:mod:`infra.resources`) wherever backbeat is installed.
"""
