"""The language: query text to a syntax tree with positions.

``parser`` (lark grammar ``grammar/kql.lark`` to :mod:`.ast` nodes), ``parse_errors`` (every
lark error as one line with its line and column). Imports nothing above :mod:`kql.errors`.
"""
